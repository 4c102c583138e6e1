"""The Colab path: every chapter's badge and install command come from ``_config.yml`` (one variable), the
command is a well-formed pip requirement for that address, a fork changes one line, and installing
minidiff into an environment that already has torch and NumPy keeps them (fresh venv, ``pip check``)."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import sync_colab  # noqa: E402


def _install_line(nb) -> str:
    lines = [m.group(0).strip() for c in nb.cells if c.cell_type == "code"
             for m in sync_colab.INSTALL_LINE.finditer(c.source)]
    assert len(lines) == 1, lines
    return lines[0]


def test_notebooks_follow_the_config():
    assert sync_colab.sync(check=True) == {}, "run python tools/sync_colab.py"


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_install_command_is_a_pip_requirement_for_the_configured_repository(path):
    url, branch = sync_colab.repository()
    nb = nbformat.read(path, as_version=4)
    args = shlex.split(_install_line(nb).removeprefix("!"))
    assert args[:2] == ["pip", "install"] and len([a for a in args if not a.startswith("-")]) == 3, args
    requirement = Requirement(args[-1])
    assert requirement.name == "minidiff" and requirement.url == f"git+{url}@{branch}"
    assert "torch" not in args[-1] and "-r" not in args
    # the badge: the shipped image, linked to this very notebook on the configured repository
    badge = sync_colab.BADGE_LINE.search(nb.cells[0].source).group(0)
    assert "(../book/images/colab-badge.svg)" in badge and "http" not in badge.split("](")[1].split(")")[0]
    assert badge.rstrip().endswith(f"{url.removeprefix('https://github.com/')}/blob/{branch}/notebooks/{path.name})")


def test_the_readme_shows_the_same_command():
    url, branch = sync_colab.repository()
    assert sync_colab.install_command(url, branch) in (ROOT / "README.md").read_text()


def test_a_fork_changes_one_line(tmp_path):
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    config = (ROOT / "_config.yml").read_text()
    assert config.count("url: https://github.com/minidiff/minidiff") == 1
    (tmp_path / "_config.yml").write_text(config.replace("url: https://github.com/minidiff/minidiff",
                                                         "url: https://github.com/a-fork/minidiff"))
    changed = sync_colab.sync(tmp_path)
    assert set(changed) == {p.name for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert all(parts == ["badge", "install"] for parts in changed.values())
    assert sync_colab.sync(tmp_path, check=True) == {}
    nb = nbformat.read(tmp_path / "notebooks" / "01_ddpm.ipynb", as_version=4)
    assert "git+https://github.com/a-fork/minidiff@main" in _install_line(nb)
    assert "github/a-fork/minidiff/blob/main/notebooks/01_ddpm.ipynb" in nb.cells[0].source
    original = nbformat.read(ROOT / "notebooks" / "01_ddpm.ipynb", as_version=4)
    assert sum(a != b for c, o in zip(nb.cells, original.cells, strict=True)
               for a, b in zip(c.source.splitlines(), o.source.splitlines(), strict=True)) == 2


def test_bad_repository_address_is_refused(tmp_path):
    (tmp_path / "_config.yml").write_text("repository:\n  url: git@github.com:x/y.git\n")
    with pytest.raises(ValueError, match="https://github.com/<owner>/<name>"):
        sync_colab.repository(tmp_path / "_config.yml")


def test_badge_image_ships_with_the_book():
    path = ROOT / "book" / "images" / "colab-badge.svg"
    svg = ET.parse(path).getroot()
    assert svg.tag.endswith("svg") and float(svg.get("width")) > 50
    assert not re.search(r"https?://(?!www\.w3\.org)", path.read_text())     # nothing to fetch


def _local_torch_wheel() -> Path | None:
    for folder in os.environ.get("PIP_FIND_LINKS", "").split():
        wheels = sorted(Path(folder).glob("torch-*.whl"))
        if wheels:
            return wheels[-1]
    return None


@pytest.mark.slow
def test_install_keeps_the_torch_and_numpy_already_there(tmp_path):
    """A fresh venv with the local CPU torch wheel and an older NumPy (2.3, the book pins 2.4.6), then
    ``pip install`` of minidiff: neither is replaced, and ``pip check`` is clean. (Only this torch
    version exists as a CPU wheel offline; another version would pull gigabytes of CUDA wheels.)"""
    wheel = _local_torch_wheel()
    if wheel is None:
        if os.environ.get("CI"):
            pytest.fail("no local torch wheel in PIP_FIND_LINKS")
        pytest.skip("no local torch wheel in PIP_FIND_LINKS")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-q", str(wheel), "numpy<2.4"], check=True, timeout=900)

    def versions():
        out = subprocess.run([*pip, "list", "--format", "json"], check=True, capture_output=True, text=True)
        return {p["name"].lower(): p["version"] for p in json.loads(out.stdout)}

    before = versions()
    source = tmp_path / "src"                    # the package alone, so the build leaves the checkout alone
    shutil.copytree(ROOT / "minidiff", source / "minidiff", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([*pip, "install", "-q", str(source)], check=True, timeout=900)
    after = versions()
    assert after["torch"] == before["torch"] and after["numpy"] == before["numpy"], (before, after)
    assert after["numpy"].startswith("2.3") and "minidiff" in after
    assert not any(name.startswith("nvidia") for name in after)
    check = subprocess.run([*pip, "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    imported = subprocess.run([str(venv / "bin" / "python"), "-c",
                               "import minidiff, torch; print(torch.__version__)"],
                              capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == before["torch"]
