"""Measured tables for the chapters: rows of numbers to a Markdown table (shown with IPython's Markdown)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

__all__ = ["markdown_table", "save_results"]


def _cell(value, fmt: str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if fmt is None:
        return str(value)
    return format(value, fmt)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence],
                   formats: Sequence[str | None] | None = None) -> str:
    """A Markdown table: one header row, then `rows`; numbers are formatted with the column's entry of
    `formats` (e.g. ".3f", ".1%", None for str()); None or a string is printed as is ("-" for None).
    A ``evaluation.MeanSD`` cell (from ``evaluation.over_seeds``) prints as "mean ± sd" in the format."""
    width = len(headers)
    formats = [None] * width if formats is None else list(formats)
    if len(formats) != width:
        raise ValueError(f"formats has {len(formats)} entries for {width} columns.")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * width]
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"row {i} has {len(row)} cells; the table has {width} columns: {row!r}.")
        lines.append("| " + " | ".join(_cell(v, f) for v, f in zip(row, formats, strict=True)) + " |")
    return "\n".join(lines)


def save_results(out, text: str, payload: dict) -> None:
    """A benchmark's results: `text` (its Markdown tables) printed and written to ``out.md``, `payload`
    (the raw numbers) to ``out.json``; the folder is made if needed (``benchmarks/results``)."""
    print(text)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text.rstrip("\n") + "\n")
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
