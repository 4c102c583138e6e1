"""Identities of the noise schedules (minidiff.schedules)."""

import copy
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
    with pytest.raises(ValueError, match="unknown side 'below'"):
        get_schedule("linear").dlogsnr_dt(0.5, side="below")
    with pytest.raises(ValueError, match="unknown side"):
        CosineSchedule().dlogsnr_dt(0.5, side="up")


def test_discrete_dlogsnr_dt_is_one_sided_at_grid_points():
    """lambda_t has a kink at every grid point i/T: side="left" is the slope of the cell below,
    side="right" that of the cell above; between grid points both are the cell's slope (Chapter 3 §4)."""
    schedule = get_schedule("linear", T=10)
    lab = schedule._log_alpha_bar_grid
    for i in range(0, 11):
        t = torch.tensor(i / 10, dtype=F64)
        abar = lab[i].exp()
        lo, hi = max(i, 1), min(i + 1, 10)  # the cells below and above i/10 (one cell at the ends)
        below, above = (lab[lo] - lab[lo - 1]) * 10, (lab[hi] - lab[hi - 1]) * 10
        left, right = schedule.dlogsnr_dt(t), schedule.dlogsnr_dt(t, side="right")
        if i > 0:
            torch.testing.assert_close(left, below / (1 - abar), rtol=1e-12, atol=0)
            torch.testing.assert_close(right, above / (1 - abar), rtol=1e-12, atol=0)
        assert (i in (0, 10)) == bool(left == right)  # two different slopes inside the grid
    # inside a cell both sides agree, and agree with a central difference of logsnr
    t = torch.tensor(0.43, dtype=F64)
    h = 1e-6
    fd = (schedule.logsnr(t + h) - schedule.logsnr(t - h)) / (2 * h)
    assert schedule.dlogsnr_dt(t) == schedule.dlogsnr_dt(t, side="right")
    torch.testing.assert_close(schedule.dlogsnr_dt(t), fd, rtol=1e-6, atol=0)
    # a formula is smooth: the side changes nothing
    assert CosineSchedule().dlogsnr_dt(0.3, side="right") == CosineSchedule().dlogsnr_dt(0.3)


@pytest.mark.parametrize("schedule", ALL, ids=IDS)
def test_memoized_schedule_answers_bit_for_bit_from_memory(schedule):
    """schedule.memoized() (kept per schedule, asked by every sampling run) gives the very tensors the
    schedule gives, computing each scalar time once; other inputs go through unchanged."""
    schedule = copy.copy(schedule)  # a schedule no other test has memoized
    memo = schedule.memoized()
    assert type(memo) is type(schedule) and memo._memo == {} and schedule._memo is None
    assert schedule.memoized() is memo and memo.memoized() is memo  # one copy per schedule, kept
    for t in (0.0, 0.25, 1.0, 0.999):
        t64 = torch.tensor(t, dtype=F64)
        for method in ("alpha_sigma", "logsnr", "dlogsnr_dt"):
            first, again = getattr(memo, method)(t64), getattr(memo, method)(torch.tensor(t, dtype=F64))
            assert first is again  # from memory
            direct = getattr(schedule, method)(t64)
            for a, b in zip(first if isinstance(first, tuple) else [first],
                            direct if isinstance(direct, tuple) else [direct], strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # NaN: linear_vp at 0
        assert memo.dlogsnr_dt(t64, side="right") is memo.dlogsnr_dt(t64, side="right")
        assert memo.alpha_sigma(t64.float())[0].dtype == torch.float32  # the dtype is part of the key
    ts = grid(8)
    assert torch.equal(memo.alpha(ts), schedule.alpha(ts)) and len(memo._memo) == 4 * 3 + 4 + 4
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        memo.logsnr(torch.tensor(1.5, dtype=F64))


def test_memoized_schedule_serves_later_runs_and_stays_bounded(monkeypatch):
    """A second sampling run on the same schedule evaluates no formula (its grid is in memory) and gives
    the same samples bit for bit; the memory starts afresh at MEMO_LIMIT answers."""
    from minidiff import samplers
    from minidiff import schedules as schedules_module

    schedule = DiscreteSchedule(torch.linspace(1e-4, 0.02, 100, dtype=F64))
    ts = schedules_module.respace(100, 10, "trailing")
    net = lambda z, t: 0.1 * z  # noqa: E731
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    first = samplers.sample(net, schedule, ts, samplers.HeunStep(), z=z, progress=False).x
    calls = {"n": 0}
    original = DiscreteSchedule._alpha_sigma64

    def counted(self, t):
        calls["n"] += 1
        return original(self, t)

    monkeypatch.setattr(DiscreteSchedule, "_alpha_sigma64", counted)
    again = samplers.sample(net, schedule, ts, samplers.HeunStep(), z=z, progress=False).x
    assert calls["n"] == 0 and torch.equal(first, again)
    monkeypatch.setattr(schedules_module, "MEMO_LIMIT", 3)
    memo = DiscreteSchedule(torch.linspace(1e-4, 0.02, 100, dtype=F64)).memoized()
    for t in (0.1, 0.2, 0.3, 0.4, 0.5):
        memo.alpha_sigma(torch.tensor(t, dtype=F64))
    assert 1 <= len(memo._memo) <= 3


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_grid_points_are_looked_up_bit_for_bit(name):
    """At t = i/T a DiscreteSchedule looks alpha, sigma, lambda and lambda' up in a table computed once
    (the sampler's fast path). The table must hold exactly what the interpolating formulas give there,
    for every grid point, for float64 and float32 times alike."""
    schedule = get_schedule(name, T=1000)
    lab_grid = schedule._log_alpha_bar_grid
    for dtype, every in ((F64, 1), (torch.float32, 7)):
        for i in range(0, 1001, every):
            t = torch.tensor(i / 1000, dtype=dtype)
            lab = schedule._log_alpha_bar(t.to(F64))  # the interpolation, lerp with weight 0 (or 1)
            assert torch.equal(lab, lab_grid[i])
            alpha, sigma = schedule.alpha_sigma(t)
            assert torch.equal(alpha, (0.5 * lab).exp().to(dtype))
            assert torch.equal(sigma, (-torch.expm1(lab)).sqrt().to(dtype))
            assert torch.equal(schedule.logsnr(t), (lab - torch.log(-torch.expm1(lab))).to(dtype))
            a64, s64 = (0.5 * lab).exp(), (-torch.expm1(lab)).sqrt()
            for side, cell in (("left", min(max(i, 1), 1000)), ("right", min(i + 1, 1000))):
                slope = (lab_grid[cell] - lab_grid[cell - 1]) * 1000
                dlam = slope / -torch.expm1(lab)
                assert torch.equal(schedule.dlogsnr_dt(t, side=side), dlam.to(dtype))
                d_alpha, d_sigma = schedule.alpha_sigma_dt(t, side=side)  # NaN at t = 0 (0 * inf) alike
                exact = {"rtol": 0, "atol": 0, "equal_nan": True}
                torch.testing.assert_close(d_alpha, (0.5 * s64**2 * dlam * a64).to(dtype), **exact)
                torch.testing.assert_close(d_sigma, (-0.5 * a64**2 * dlam * s64).to(dtype), **exact)


@pytest.mark.parametrize("schedule", ALL, ids=IDS)
def test_alpha_sigma_dt_are_the_derivatives_of_alpha_and_sigma(schedule):
    """alpha_sigma_dt = (d alpha/dt, d sigma/dt) (eqs. (8)-(9)), by central differences inside a cell."""
    for t in (0.2345, 0.6789):
        h = 1e-7
        up, down = (schedule.alpha_sigma(torch.tensor(t + d, dtype=F64)) for d in (h, -h))
        d_alpha, d_sigma = schedule.alpha_sigma_dt(torch.tensor(t, dtype=F64))
        torch.testing.assert_close(d_alpha, (up[0] - down[0]) / (2 * h), rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(d_sigma, (up[1] - down[1]) / (2 * h), rtol=1e-5, atol=1e-9)
        assert schedule.alpha_sigma_dt(t, side="right")[0] == schedule.alpha_sigma_dt(t)[0]  # no kink here
    with pytest.raises(ValueError, match="unknown side"):
        schedule.alpha_sigma_dt(0.5, side="middle")
