"""Table rows over several seeds, with common random numbers, reported as mean ± sd.

Every row of a measured table (chapter 1 §7 onwards) runs with the same seeds, and within a seed
every row starts from the same initial noise (``initial_noise``): with these common random
numbers a difference between two rows is a difference between the methods, not between draws.
``over_seeds`` runs one row and returns a :class:`MeanSD` per metric; ``report.markdown_table``
prints a MeanSD cell as "mean ± sd" with the column's format.

    seeds = (0, 1, 2)
    def ddim_row(seed):
        z = initial_noise(seed, (1000, 2))
        x = sample(model, schedule, grid, DDIMStep(), z=z, generator=seed_generator(seed)).x
        return metrics.toy_metrics(x, reference, name="25gaussians")
    row = over_seeds(ddim_row, seeds)   # {"mmd2": MeanSD(...), ...}
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["DEFAULT_SEEDS", "MeanSD", "over_seeds", "rank", "initial_noise", "seed_generator"]

DEFAULT_SEEDS = (0, 1, 2)
"""The seeds of every table in the book (at least 3, DESIGN.md "Evaluation")."""

_NOISE_STREAM = 1_000_003
"""Offset between the initial-noise stream and the sampler's noise stream of one seed."""


class MeanSD(NamedTuple):
    """Mean and sample standard deviation (ddof = 1) of one metric over seeds, with the values.

    ``format(m, ".3f")`` gives "0.123 ± 0.004" (both numbers in the format; a "d" format prints them
    with one decimal, since a mean of integers is not one). With a single seed, sd is NaN and only
    the mean is printed.
    """

    mean: float
    sd: float
    values: tuple[float, ...]

    @property
    def n(self) -> int:
        """Number of seeds."""
        return len(self.values)

    def __format__(self, spec: str) -> str:
        if spec == "":
            spec = ".4g"
        elif spec.endswith("d"):
            spec = spec[:-1] + ".1f"
        if self.n < 2:
            return format(self.mean, spec)
        return f"{format(self.mean, spec)} ± {format(self.sd, spec)}"

    def __str__(self) -> str:
        return format(self, "")


def _number(value, key: str, seed) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise ValueError(f"fn({seed!r}) returned {key!r} = {value!r}; over_seeds averages numbers only, so "
                         "return one number per metric (drop lists such as mode_stats' 'counts').")
    return float(value)


def over_seeds(fn: Callable[[int], Mapping], seeds: Sequence[int] = DEFAULT_SEEDS) -> dict[str, MeanSD]:
    """Run one table row ``fn(seed)`` for every seed and return {metric: MeanSD(mean, sd, values)}.

    ``fn(seed)`` returns a dict of numbers (e.g. ``metrics.toy_metrics``) and must take all its
    randomness from ``seed`` (``initial_noise``, ``seed_generator``). Use the same ``seeds`` for
    every row of a table (common random numbers). The sd is the sample sd (ddof = 1) across seeds,
    NaN for a single seed. Keys keep fn's order; every call must return the same keys.
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds is empty; give at least one seed, e.g. seeds=(0, 1, 2) (the book uses 3).")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise ValueError(f"seeds must be integers, got {s!r}.")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}: a repeated seed repeats the same draw.")
    columns: dict[str, list[float]] | None = None
    for s in seeds:
        result = fn(int(s))
        if not isinstance(result, Mapping):
            raise ValueError(f"fn({s!r}) must return a dict of metrics, got {type(result).__name__}.")
        if columns is None:
            columns = {key: [] for key in result}
        elif set(result) != set(columns):
            raise ValueError(f"fn({s!r}) returned keys {list(result)}, but the first seed gave "
                             f"{list(columns)}; every seed must report the same metrics.")
        for key, value in result.items():
            columns[key].append(_number(value, key, s))
    out = {}
    for key, values in columns.items():
        arr = np.asarray(values, dtype=np.float64)
        sd = float(arr.std(ddof=1)) if len(arr) > 1 else math.nan
        out[key] = MeanSD(float(arr.mean()), sd, tuple(values))
    return out


def rank(a: Mapping[str, MeanSD], b: Mapping[str, MeanSD], key: str, directions: Mapping[str, str]) -> int:
    """+1 if row a beats row b on `key` by more than the two seed spreads together (sd_a + sd_b), -1 if
    it loses by that much, 0 if the difference is within the spread or there is a single seed: then
    the rows are not ranked (DESIGN.md, "no ranking inside the seed spread"). directions[key] is
    "higher" or "lower" (which is better), as in ``metrics.TOY_METRICS``."""
    if directions.get(key) not in ("higher", "lower"):
        raise ValueError(f"directions must say 'higher' or 'lower' for {key!r}; got {directions.get(key)!r}.")
    sign = 1 if directions[key] == "higher" else -1
    diff, spread = sign * (a[key].mean - b[key].mean), a[key].sd + b[key].sd
    return 0 if not spread >= 0 or abs(diff) <= spread else (1 if diff > 0 else -1)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    return int(seed)


def initial_noise(seed: int, shape: Sequence[int], device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The initial noise z ~ N(0, I) of one seed, the same for every row of a table.

    Drawn on the CPU from its own generator seeded with ``seed`` (then moved to ``device``), so it
    is bit-for-bit the same whatever the device and whatever else the row draws. Pass it to
    ``samplers.sample(..., z=initial_noise(seed, shape))``.
    """
    g = torch.Generator().manual_seed(_check_seed(seed))
    return torch.randn(tuple(shape), generator=g, dtype=dtype).to(device)


def seed_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for the rest of a row's randomness (stochastic steps, latents), one stream per seed.

    It is seeded apart from :func:`initial_noise`'s stream, so a stochastic sampler's per-step noise
    does not repeat the initial noise.
    """
    return torch.Generator(device).manual_seed(_check_seed(seed) + _NOISE_STREAM)
