"""Keep every chapter's Colab badge and Colab install command in line with ``_config.yml``.

The repository address is one variable, ``repository.url`` (with ``repository.branch``) in
``_config.yml``, which the book's own launch and repository buttons read as well. A notebook opened in
Colab cannot read that file, so each chapter carries the address twice, written from it:

- the first cell's badge, ``[![Open in Colab](../book/images/colab-badge.svg)](<Colab URL of the
  notebook>)``, whose image ships with the book so that it renders offline;
- the set-up cell's ``!pip install -q "minidiff @ git+<url>@<branch>"``, which keeps Colab's own torch
  and NumPy (minidiff asks for ``torch>=2.1``).

A fork changes ``repository.url`` and runs ``python tools/sync_colab.py``; ``--check`` only reports
(exit 1 on a mismatch; tests/test_colab.py runs it). Only those two lines of a notebook change.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
BADGE_IMAGE = "../book/images/colab-badge.svg"     # relative to notebooks/
BADGE_LINE = re.compile(r"^\[!\[Open [Ii]n Colab\]\([^)]*\)\]\([^)]*\)[ \t]*$", re.MULTILINE)
INSTALL_LINE = re.compile(r"^(?P<indent>[ \t]*)!pip install [^\n]*minidiff[^\n]*$", re.MULTILINE)


def repository(config_path: Path = ROOT / "_config.yml") -> tuple[str, str]:
    """(url, branch) of ``repository`` in the book's ``_config.yml``: a GitHub https address."""
    repo = (yaml.safe_load(config_path.read_text()) or {}).get("repository") or {}
    url, branch = str(repo.get("url", "")).rstrip("/"), str(repo.get("branch", "main"))
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url):
        raise ValueError(f"{config_path}: repository.url must be https://github.com/<owner>/<name>, "
                         f"got {url!r}")
    return url, branch


def install_command(url: str, branch: str) -> str:
    """The Colab set-up cell's pip command: a PEP 508 direct reference to the repository's branch."""
    return f'!pip install -q "minidiff @ git+{url}@{branch}"'


def badge(url: str, branch: str, notebook: str) -> str:
    """The first cell's badge: the shipped image, linked to the notebook in Colab."""
    path = url.removeprefix("https://github.com/")
    colab = f"https://colab.research.google.com/github/{path}/blob/{branch}/notebooks/{notebook}"
    return f"[![Open in Colab]({BADGE_IMAGE})]({colab})"


def synced(nb, name: str, url: str, branch: str) -> list[str]:
    """Rewrite the badge and the install line of a notebook in place; return what changed."""
    changes = []
    first = nb.cells[0]
    new_badge = badge(url, branch, name)
    if not BADGE_LINE.search(first.source):
        raise ValueError(f"{name}: the first cell has no '[![Open in Colab](...)](...)' line")
    text = BADGE_LINE.sub(new_badge, first.source, count=1)
    if text != first.source:
        first.source, changes = text, [*changes, "badge"]
    setups = [c for c in nb.cells if c.cell_type == "code" and INSTALL_LINE.search(c.source)]
    if len(setups) != 1:
        raise ValueError(f"{name}: expected one set-up cell with '!pip install ... minidiff', "
                         f"found {len(setups)}")
    cell = setups[0]
    text = INSTALL_LINE.sub(lambda m: m["indent"] + install_command(url, branch), cell.source, count=1)
    if text != cell.source:
        cell.source, changes = text, [*changes, "install"]
    return changes


def sync(root: Path = ROOT, check: bool = False) -> dict[str, list[str]]:
    """Bring every notebook under ``root/notebooks`` in line with ``root/_config.yml``; with ``check``,
    change nothing and only report. Returns {notebook: changed parts} for the notebooks that differ."""
    url, branch = repository(root / "_config.yml")
    out = {}
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        changes = synced(nb, path.name, url, branch)
        if changes:
            out[path.name] = changes
            if not check:
                nbformat.write(nb, path)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="report, change nothing; exit 1 on a mismatch")
    args = parser.parse_args(argv)
    changed = sync(check=args.check)
    for name, parts in changed.items():
        print(f"{name}: {' and '.join(parts)} {'differ from' if args.check else 'updated from'} _config.yml")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
