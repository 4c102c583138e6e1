"""Identities of the noise schedules (minidiff.schedules)."""

import math

import pytest
import torch

from minidiff.schedules import (
    SCHEDULES,
    CosineSchedule,
    DiscreteSchedule,
    LinearVPSchedule,
    cosine_betas,
    discretize,
    get_schedule,
    linear_betas,
)

T = 1000
ALL = [get_schedule(name) for name in SCHEDULES]
IDS = list(SCHEDULES)
F64 = torch.float64


def grid(T):
    return torch.arange(T + 1, dtype=F64) / T


@pytest.mark.parametrize("schedule", ALL, ids=IDS)
def test_variance_preserving_and_logsnr_decreasing(schedule):
    t = torch.linspace(0, 1, 2001, dtype=F64)
    alpha, sigma = schedule.alpha_sigma(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t), rtol=0, atol=1e-12)
    lam = schedule.logsnr(t)
    assert (lam[1:] <= lam[:-1]).all()
    inside = (lam < 19.9) & (lam > -19.9)  # strictly decreasing where the clip is not active
    assert (lam[1:][inside[1:]] < lam[:-1][inside[1:]]).all()
    torch.testing.assert_close(schedule.snr(t[1:]), lam[1:].exp())
    # logsnr agrees with alpha and sigma
    mid = slice(1, -1)
    torch.testing.assert_close(lam[mid], torch.log(alpha[mid] ** 2 / sigma[mid] ** 2), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("schedule", ALL, ids=IDS)
def test_dtype_and_scalars(schedule):
    t32 = torch.tensor([0.25, 0.5], dtype=torch.float32)
    assert schedule.alpha(t32).dtype == torch.float32
    assert schedule.sigma(t32.double()).dtype == F64
    assert schedule.logsnr(0.5).dtype == torch.get_default_dtype() and schedule.logsnr(0.5).ndim == 0
    torch.testing.assert_close(schedule.alpha(t32), schedule.alpha(t32.double()).float())


def test_discrete_schedule_matches_ddpm_alphas_cumprod():
    schedule = get_schedule("linear", T=T)
    betas = linear_betas(T)
    alpha_bar = torch.cumprod(1 - betas, 0)
    i = torch.arange(1, T + 1, dtype=F64)
    torch.testing.assert_close(schedule.alpha(i / T) ** 2, alpha_bar, rtol=1e-12, atol=0)
    torch.testing.assert_close(schedule.alphas_cumprod, alpha_bar, rtol=0, atol=0)
    assert schedule.alpha(0.0) == 1 and schedule.sigma(0.0) == 0 and schedule.logsnr(0.0) == math.inf
    # float32 times on the grid hit the grid values too
    torch.testing.assert_close(schedule.alpha((i / T).float()) ** 2, alpha_bar.float())
    assert schedule.T == T and torch.equal(schedule.alphas, 1 - betas)


def test_discrete_interpolates_log_alpha_bar_linearly():
    schedule = DiscreteSchedule(linear_betas(10))
    log_abar = torch.cat([torch.zeros(1, dtype=F64), torch.log(schedule.alphas_cumprod)])
    for i in range(10):
        for frac in (0.25, 0.5, 0.9):
            t = (i + frac) / 10
            expected = (1 - frac) * log_abar[i] + frac * log_abar[i + 1]
            torch.testing.assert_close(2 * torch.log(schedule.alpha(torch.tensor(t, dtype=F64))), expected)


def test_index_of_and_t_of():
    schedule = get_schedule("cosine", T=50)
    assert schedule.t_of(10) == 0.2
    assert schedule.index_of(0.2) == 10 and schedule.index_of(torch.tensor(0.98)) == 49
    assert torch.equal(schedule.index_of(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([0, 25, 50]))
    with pytest.raises(ValueError, match="grid"):
        schedule.index_of(0.011)


def test_linear_and_cosine_betas():
    b = linear_betas(T)
    assert b[0] == 1e-4 and abs(b[-1] - 0.02) < 1e-15 and len(b) == T
    c = cosine_betas(T)
    assert len(c) == T and (c > 0).all() and c.max() == 0.999  # the last beta is clipped
    f = torch.cos(0.5 * math.pi * (grid(T) + 0.008) / 1.008) ** 2
    torch.testing.assert_close(torch.cumprod(1 - c, 0)[:-1], (f / f[0])[1:-1], rtol=1e-10, atol=1e-14)


def test_cosine_schedule_formula_and_clipping():
    schedule = CosineSchedule()
    assert schedule.logsnr(0.0) == 20.0 and schedule.logsnr(1.0) == -20.0
    t = torch.linspace(0.05, 0.95, 19, dtype=F64)
    alpha = torch.cos(0.5 * math.pi * (t + 0.008) / 1.008) / math.cos(0.5 * math.pi * 0.008 / 1.008)
    torch.testing.assert_close(schedule.alpha(t), alpha, rtol=1e-12, atol=0)
    torch.testing.assert_close(schedule.logsnr(t), torch.log(alpha**2 / (1 - alpha**2)))
    tight = CosineSchedule(logsnr_min=-5, logsnr_max=5)
    lam = tight.logsnr(torch.linspace(0, 1, 101, dtype=F64))
    assert lam.max() == 5 and lam.min() == -5
    # finite and sensible at both ends (see ContinuousSchedule)
    a, s = schedule.alpha_sigma(torch.tensor([0.0, 1.0], dtype=F64))
    assert torch.isfinite(a).all() and torch.isfinite(s).all()
    assert 0 < s[0] < 1e-4 and 0 < a[1] < 1e-4


def test_linear_vp_formula():
    schedule = LinearVPSchedule(beta_min=0.1, beta_max=20)
    t = torch.linspace(0.01, 1, 100, dtype=F64)
    alpha2 = torch.exp(-(0.1 * t + 0.5 * (20 - 0.1) * t**2))
    torch.testing.assert_close(schedule.alpha(t) ** 2, alpha2, rtol=1e-12, atol=0)
    assert schedule.logsnr(0.0) == 20.0 and torch.isfinite(schedule.logsnr(1.0))


@pytest.mark.parametrize("name", ["linear_vp", "cosine_continuous"])
def test_discretize_continuous_round_trip(name):
    continuous = get_schedule(name)
    discrete = discretize(continuous, 100)
    t = grid(100)[1:]
    torch.testing.assert_close(discrete.alpha(t), continuous.alpha(t), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(discrete.logsnr(t), continuous.logsnr(t), rtol=1e-9, atol=1e-9)


def test_discretize_discrete_round_trip():
    schedule = get_schedule("linear", T=T)
    again = discretize(schedule, T)
    torch.testing.assert_close(again.betas, schedule.betas, rtol=1e-10, atol=0)
    # the linear VP schedule is the continuum limit of DDPM's linear betas (beta_i ~ beta(t_i) / T)
    vp = discretize(LinearVPSchedule(), T)
    torch.testing.assert_close(vp.betas, schedule.betas, rtol=0.02, atol=2e-5)


def test_bad_inputs_raise_useful_errors():
    with pytest.raises(ValueError, match="unknown schedule 'quadratic'.*linear.*cosine"):
        get_schedule("quadratic")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        get_schedule("linear").alpha(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        CosineSchedule().logsnr(-0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        CosineSchedule().logsnr(torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="takes no T"):
        get_schedule("linear_vp", T=10)
    with pytest.raises(ValueError, match="positive integer"):
        get_schedule("linear", T=0)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        DiscreteSchedule(torch.tensor([0.1, 1.0]))
