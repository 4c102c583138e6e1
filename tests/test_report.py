"""minidiff.report and metrics.toy_quality."""

import pytest
import torch

from minidiff import data, metrics
from minidiff.report import markdown_table


def test_markdown_table():
    rows = [("DDIM", 10, 0.12345), ("data", None, 0.1)]
    text = markdown_table(["name", "NFE", "W2"], rows, [None, "d", ".3f"])
    assert text.splitlines() == ["| name | NFE | W2 |", "|---|---|---|", "| DDIM | 10 | 0.123 |",
                                 "| data | - | 0.100 |"]
    with pytest.raises(ValueError, match="columns"):
        markdown_table(["a", "b"], [(1,)])
    with pytest.raises(ValueError, match="formats"):
        markdown_table(["a", "b"], [(1, 2)], [None])


def test_toy_quality_of_fresh_data_is_near_perfect():
    gen = torch.Generator().manual_seed(0)
    a = data.toy_dataset("25gaussians", 1000, generator=gen)
    b = data.toy_dataset("25gaussians", 1000, generator=gen)
    q = metrics.toy_quality(a, b)
    assert q["modes_covered"] == 25 and q["high_quality_rate"] > 0.97 and 0 < q["w2"] < 0.2
    collapsed = torch.zeros(1000, 2)
    q = metrics.toy_quality(collapsed, b)
    assert q["modes_covered"] <= 1 and q["w2"] > 0.5


def test_save_results_writes_the_markdown_and_the_numbers(tmp_path, capsys):
    import json

    from minidiff.report import save_results

    save_results(tmp_path / "sub" / "bench", "| a |\n|---|\n| 1 |", {"rows": [{"a": 1}]})
    assert (tmp_path / "sub" / "bench.md").read_text() == "| a |\n|---|\n| 1 |\n"
    assert json.loads((tmp_path / "sub" / "bench.json").read_text()) == {"rows": [{"a": 1}]}
    assert "| 1 |" in capsys.readouterr().out
