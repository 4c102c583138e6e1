"""minidiff.evaluation: rows over seeds (mean ± sd) with common random numbers."""

import math

import numpy as np
import pytest
import torch

from minidiff import data, metrics
from minidiff.evaluation import DEFAULT_SEEDS, MeanSD, initial_noise, over_seeds, seed_generator
from minidiff.report import markdown_table


def test_over_seeds_mean_and_sample_sd():
    out = over_seeds(lambda s: {"a": s, "b": torch.tensor(2.0 * s), "c": np.float32(1.5)}, seeds=(1, 2, 3, 6))
    assert list(out) == ["a", "b", "c"]
    assert out["a"] == MeanSD(3.0, float(np.std([1, 2, 3, 6], ddof=1)), (1.0, 2.0, 3.0, 6.0))
    assert out["b"].mean == 6.0 and out["b"].n == 4 and out["c"].sd == 0.0
    one = over_seeds(lambda s: {"a": s}, seeds=(5,))
    assert one["a"].mean == 5.0 and math.isnan(one["a"].sd)
    assert DEFAULT_SEEDS == (0, 1, 2)


def test_over_seeds_errors():
    with pytest.raises(ValueError, match="empty"):
        over_seeds(lambda s: {"a": 1}, seeds=())
    with pytest.raises(ValueError, match="distinct"):
        over_seeds(lambda s: {"a": 1}, seeds=(0, 0))
    with pytest.raises(ValueError, match="integers"):
        over_seeds(lambda s: {"a": 1}, seeds=(0.5,))
    with pytest.raises(ValueError, match="same metrics"):
        over_seeds(lambda s: {"a": 1} if s == 0 else {"b": 1}, seeds=(0, 1))
    with pytest.raises(ValueError, match="counts"):
        over_seeds(lambda s: {"counts": [1, 2]}, seeds=(0, 1))
    with pytest.raises(ValueError, match="dict"):
        over_seeds(lambda s: 1.0, seeds=(0, 1))


def test_mean_sd_cells_in_markdown_table():
    m = MeanSD(0.12345, 0.0042, (0.1, 0.2))
    assert format(m, ".3f") == "0.123 ± 0.004"
    assert format(MeanSD(0.594, 0.012, (0.58, 0.6)), ".1%") == "59.4% ± 1.2%"
    assert format(MeanSD(24.5, 0.5, (24, 25)), "d") == "24.5 ± 0.5"
    assert format(MeanSD(3.0, math.nan, (3.0,)), ".2f") == "3.00"
    assert str(m) == "0.1235 ± 0.0042"
    text = markdown_table(["method", "MMD2", "modes"], [("DDIM", m, MeanSD(25.0, 0.0, (25, 25)))],
                          [None, ".3f", "d"])
    assert text.splitlines()[-1] == "| DDIM | 0.123 ± 0.004 | 25.0 ± 0.0 |"


def test_initial_noise_is_common_and_separate_from_the_step_noise():
    z = initial_noise(3, (4, 2))
    assert z.shape == (4, 2) and z.dtype == torch.float32
    assert torch.equal(z, initial_noise(3, (4, 2))) and not torch.equal(z, initial_noise(4, (4, 2)))
    assert torch.equal(initial_noise(3, (4, 2), dtype=torch.float64).float(), z)
    g1, g2 = seed_generator(3), seed_generator(3)
    assert torch.equal(torch.randn(4, 2, generator=g1), torch.randn(4, 2, generator=g2))
    assert not torch.equal(torch.randn(4, 2, generator=seed_generator(3)), z)
    with pytest.raises(ValueError, match="non-negative"):
        initial_noise(-1, (2,))


def test_a_toy_table_row_over_seeds():
    """The use the chapters make of it: every row runs on the same seeds and reference points."""
    reference = data.twenty_five_gaussians(400, generator=torch.Generator().manual_seed(99))

    def row(blur):
        def fn(seed):
            x = data.twenty_five_gaussians(400, generator=seed_generator(seed))
            return metrics.toy_metrics(x + blur * initial_noise(seed, (400, 2)), reference)
        return over_seeds(fn)

    fresh, blurred = row(0.0), row(0.08)
    assert fresh["modes_covered"].values == (25.0, 25.0, 25.0)
    assert blurred["log_density_gap"].mean > fresh["log_density_gap"].mean + 10 * fresh["log_density_gap"].sd
    assert row(0.0) == fresh  # bit for bit on the CPU


def test_rank_orders_rows_only_beyond_the_seed_spread():
    from minidiff.evaluation import MeanSD, rank

    def row(mean, sd):
        return {"m": MeanSD(mean, sd, (mean,) * 3)}

    up = {"m": "higher"}
    assert rank(row(1.0, 0.1), row(0.5, 0.1), "m", up) == 1
    assert rank(row(0.5, 0.1), row(1.0, 0.1), "m", up) == -1
    assert rank(row(1.0, 0.3), row(0.6, 0.2), "m", up) == 0  # inside the spread
    assert rank(row(0.5, 0.1), row(1.0, 0.1), "m", {"m": "lower"}) == 1
    with pytest.raises(ValueError, match="higher"):
        rank(row(1, 0), row(0, 0), "m", {})
