"""Wall time of every chapter notebook, cell by cell, at one size: the "2 minutes per chapter" budget.

Runs each notebook top to bottom in a fresh kernel (nbclient, as nbval does) with MINIDIFF_SIZE set,
one torch thread per kernel (as under the two pytest-xdist workers of the test run) and an optional
fresh model cache, then prints and saves a Markdown table (with a JSON copy) under benchmarks/results/:
per chapter the total, the slowest cells, and whether it meets the budget.

Usage:  python benchmarks/chapter_times.py [--size small] [--fresh-cache] [--threads 1] [notebooks ...]
With --fresh-cache the first chapter that needs a pretrained model trains it (as on a fresh CI clone),
so run the chapters in order. Timings depend on the machine's load: run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BUDGET_S = 120.0


def run_notebook(path: Path, timeout: int = 1800) -> list[tuple[int, float, str]]:
    """Execute the notebook in memory; return (cell index, seconds, first source line) per code cell."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    times = []
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            t0 = time.perf_counter()
            client.execute_cell(cell, index)
            first = next((line for line in cell.source.splitlines() if line.strip()), "")
            times.append((index, time.perf_counter() - t0, first[:60]))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="default: notebooks/*.ipynb in order")
    parser.add_argument("--size", default="small", choices=["small", "medium", "full"])
    parser.add_argument("--threads", type=int, default=1, help="OMP/torch threads per kernel (default 1)")
    parser.add_argument("--fresh-cache", action="store_true", help="use an empty MINIDIFF_CACHE")
    args = parser.parse_args()
    paths = [Path(p) for p in args.notebooks] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    os.environ["MINIDIFF_SIZE"] = args.size
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    cache = tempfile.mkdtemp(prefix="minidiff-cache-") if args.fresh_cache else None
    if cache:
        os.environ["MINIDIFF_CACHE"] = cache
    rows = []
    for path in paths:
        t0 = time.perf_counter()
        cells = run_notebook(path)
        total = time.perf_counter() - t0
        slow = sorted(cells, key=lambda c: -c[1])[:3]
        rows.append({"chapter": path.name, "seconds": round(total, 1), "within_budget": total <= BUDGET_S,
                     "slowest": [{"cell": i, "seconds": round(s, 1), "source": src} for i, s, src in slow]})
        summary = ", ".join(f"c{i} {s:.0f} s" for i, s, _ in slow)
        print(f"{path.name}: {total:.1f} s; slowest {summary}", flush=True)
    lines = [f"# Chapter wall times at size {args.size!r}", "",
             f"{platform.node()}, {os.cpu_count()} cores, {args.threads} thread(s) per kernel, "
             f"{'fresh' if cache else 'warm'} model cache, {time.strftime('%Y-%m-%d %H:%M')}; budget "
             f"{BUDGET_S:.0f} s per chapter.", "",
             "| chapter | seconds | within budget | slowest cells (index: seconds) |", "|---|---|---|---|"]
    for r in rows:
        slow = "; ".join(f"c{c['cell']}: {c['seconds']} (`{c['source']}`)" for c in r["slowest"])
        ok = "yes" if r["within_budget"] else "NO"
        lines.append(f"| {r['chapter']} | {r['seconds']} | {ok} | {slow} |")
    lines.append(f"| **total** | {sum(r['seconds'] for r in rows):.1f} | | |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stem = f"chapter_times_{args.size}"
    (RESULTS / f"{stem}.md").write_text(text)
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
