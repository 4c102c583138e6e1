"""Fast samplers: respacing, DDIM, ancestral-gamma, probability-flow ODE solvers, inversion, slerp."""

import math

import pytest
import torch

from minidiff.diffusion import posterior, predict_eps, predict_x, transition
from minidiff.samplers import (
    AncestralGammaStep,
    DDIMStep,
    DDPMStep,
    DPMSolverPP2MStep,
    EulerStep,
    HeunStep,
    PredictorCorrectorStep,
    ReverseSDEStep,
    ddim_invert,
    ddim_update,
    probability_flow_velocity,
    sample,
    slerp,
)
from minidiff.schedules import (
    CosineSchedule,
    DiscreteSchedule,
    get_schedule,
    respace,
    respace_indices,
    respaced_schedule,
)

F64 = torch.float64
MU, STD = torch.tensor([0.5, -0.25], dtype=F64), 0.4


class ExactDenoiser:
    """The optimal denoiser for x ~ N(mu, std^2 I): z_t ~ N(alpha mu, v I), v = alpha^2 std^2 + sigma^2,
    x-hat = mu + alpha std^2 (z - alpha mu) / v and eps-hat = sigma (z - alpha mu) / v.

    prediction="eps" uses the closed form of eps-hat, finite at sigma = 0 (there eps-hat = 0);
    prediction="x" returns x-hat, well conditioned where alpha -> 0 (t = 1 on a cosine schedule,
    where x-hat = (z - sigma eps-hat) / alpha would divide rounding errors by alpha ~ 1e-16).
    """

    def __init__(self, schedule, prediction="x", mu=MU, std=STD):
        self.schedule, self.prediction, self.mu, self.std = schedule, prediction, mu, std

    def __call__(self, z, t):
        alpha, sigma = self.schedule.alpha_sigma(t[0].to(F64))
        v = alpha**2 * self.std**2 + sigma**2
        if self.prediction == "x":
            return (self.mu + alpha * self.std**2 * (z - alpha * self.mu) / v).to(z.dtype)
        return (sigma * (z - alpha * self.mu) / v).to(z.dtype)


def ode_solution(schedule, z, t_from, t_to, mu=MU, std=STD):
    """The exact probability-flow map for Gaussian data: the PF-ODE transports
    N(alpha mu, (alpha^2 std^2 + sigma^2) I) by z_t = alpha_t mu + sqrt(alpha_t^2 std^2 + sigma_t^2) xi,
    xi fixed (check: dz/dt = alpha' mu + v'/(2v) (z - alpha mu), which is eq. (6) with f = alpha'/alpha,
    g^2 = (sigma^2)' - 2 f sigma^2 and score -(z - alpha mu)/v). At t = 0: x = mu + std xi."""
    a1, s1 = schedule.alpha_sigma(torch.tensor(float(t_from), dtype=F64))
    a0, s0 = schedule.alpha_sigma(torch.tensor(float(t_to), dtype=F64))
    xi = (z - a1 * mu) / torch.sqrt(a1**2 * std**2 + s1**2)
    return a0 * mu + torch.sqrt(a0**2 * std**2 + s0**2) * xi


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ----------------------------------------------------------------------------- respacing


def test_respace_conventions():
    assert respace_indices(1000, 10, "leading").tolist() == list(range(1, 1000, 100))
    assert respace_indices(1000, 10, "trailing").tolist() == list(range(100, 1001, 100))
    assert respace_indices(1000, 10, "linspace").tolist() == [1, 112, 223, 334, 445, 556, 667, 778, 889, 1000]
    assert respace_indices(10, 3, "trailing").tolist() == [3, 7, 10]  # round(10, 6.67, 3.33)
    assert respace_indices(10, 3, "leading").tolist() == [1, 4, 7]
    ts = respace(1000, 10, "trailing")
    assert ts.dtype == F64 and len(ts) == 11 and ts[0] == 1.0 and ts[-1] == 0.0
    assert bool((ts[1:] < ts[:-1]).all())
    assert respace(1000, 10, "leading")[0] == pytest.approx(0.901)  # leading misses t = 1
    for spacing in ("leading", "trailing", "linspace"):  # steps = T gives the full DDPM grid
        assert torch.equal(respace(20, 20, spacing), torch.arange(20, -1, -1, dtype=F64) / 20)
        idx = respace_indices(1000, 7, spacing)
        assert len(idx.unique()) == 7 and idx.min() >= 1 and idx.max() <= 1000


def test_respaced_schedule_keeps_the_alpha_bars():
    schedule = get_schedule("cosine", T=1000)
    idx = respace_indices(1000, 8, "trailing")
    small = respaced_schedule(schedule, idx)
    assert isinstance(small, DiscreteSchedule) and small.T == 8
    torch.testing.assert_close(small.alphas_cumprod, schedule.alphas_cumprod[idx - 1], rtol=1e-9, atol=1e-15)
    # step k of the small schedule is step idx[k] of the big one: the DDPM step agrees
    z, x_hat = randn(6, 2, seed=1), randn(6, 2, seed=2)
    for k in range(1, 9):
        t_big, s_big = idx[k - 1].item() / 1000, (idx[k - 2].item() / 1000 if k > 1 else 0.0)
        a = DDPMStep()(z, k / 8, (k - 1) / 8, x_hat, None, small, torch.Generator().manual_seed(k))
        b = DDPMStep()(z, t_big, s_big, x_hat, None, schedule, torch.Generator().manual_seed(k))
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- DDIM and ancestral-gamma


def test_ddim_eta_one_is_ddpm_posterior_on_a_respaced_grid():
    schedule = get_schedule("linear", T=1000)
    ts = respace(1000, 10, "trailing")
    model = ExactDenoiser(schedule, "eps")
    runs = [sample(model, schedule, ts, step, shape=(256, 2), generator=torch.Generator().manual_seed(5),
                   progress=False).x.to(F64) for step in (DDIMStep(1.0), DDPMStep("posterior"))]
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-5)


def test_ddim_eta_zero_is_deterministic():
    schedule = get_schedule("cosine", T=1000)
    model = ExactDenoiser(schedule, "eps")
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    outs = [sample(model, schedule, respace(1000, 10, "trailing"), DDIMStep(0.0), z=z, generator=gen,
                   progress=False).x for gen in (g, torch.Generator().manual_seed(2), None)]
    assert torch.equal(g.get_state(), state)  # no noise drawn
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_discrete_eq12_and_continuous_forms_agree(eta):
    schedule = get_schedule("linear", T=1000)
    abar = schedule.alphas_cumprod
    z, eps_hat = randn(8, 3, seed=0), randn(8, 3, seed=1)
    for i, j in [(1000, 900), (500, 499), (101, 1), (10, 0)]:
        t, s = i / 1000, j / 1000
        alpha_t, sigma_t = schedule.alpha_sigma(torch.tensor(t, dtype=F64))
        x_hat = predict_x(eps_hat, "eps", z, alpha_t, sigma_t)
        got = DDIMStep(eta)(z, t, s, x_hat, eps_hat, schedule, torch.Generator().manual_seed(i))
        noise = randn(8, 3, seed=i) if j > 0 else None
        abar_prev = abar[j - 1] if j > 0 else torch.tensor(1.0, dtype=F64)
        expected = ddim_update(z, eps_hat, abar[i - 1], abar_prev, eta, noise)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_ddim_eta_zero_is_salimans_ho_eq_11():
    schedule = CosineSchedule()
    z, x_hat = randn(5, 2, seed=0), randn(5, 2, seed=1)
    t, s = 0.7, 0.3
    (alpha_t, sigma_t), (alpha_s, _) = (schedule.alpha_sigma(torch.tensor(u, dtype=F64)) for u in (t, s))
    eps_hat = predict_eps(x_hat, "x", z, alpha_t, sigma_t)
    lam_t, lam_s = (schedule.logsnr(torch.tensor(u, dtype=F64)) for u in (t, s))
    ratio = ((lam_t - lam_s) / 2).exp()
    expected = ratio * alpha_s / alpha_t * z + (1 - ratio) * alpha_s * x_hat
    torch.testing.assert_close(DDIMStep()(z, t, s, x_hat, eps_hat, schedule), expected)


@pytest.mark.parametrize("gamma,variance", [(0.0, "posterior"), (1.0, "beta")])
def test_ancestral_gamma_ends_are_the_ddpm_variances(gamma, variance):
    schedule = get_schedule("cosine", T=1000)
    z, x_hat = randn(8, 2, seed=0), randn(8, 2, seed=1)
    for t, s in [(1.0, 0.9), (0.5, 0.499), (0.2, 0.0)]:
        a = AncestralGammaStep(gamma)(z, t, s, x_hat, None, schedule, torch.Generator().manual_seed(3))
        b = DDPMStep(variance)(z, t, s, x_hat, None, schedule, torch.Generator().manual_seed(3))
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_ancestral_gamma_interpolates_log_variance():
    schedule = get_schedule("linear", T=100)
    x_hat = torch.zeros(20_000, 1, dtype=F64)
    z = torch.zeros_like(x_hat)
    t, s = 0.5, 0.3
    var_post = posterior(schedule, z, x_hat, t=t, s=s)[1].flatten()[0]
    var_fwd = transition(schedule, s=s, t=t)[1]
    out = AncestralGammaStep(0.5)(z, t, s, x_hat, None, schedule, torch.Generator().manual_seed(0))
    assert out.var().item() == pytest.approx((var_post * var_fwd).sqrt().item(), rel=0.05)


def test_ancestral_step_takes_per_example_times():
    """AncestralGammaStep with t, s of shape (B,): each row's mean and variance are its own posterior's
    (eqs. (1)-(5)), one noise draw for the batch, none for the rows that end at s = 0."""
    schedule = get_schedule("linear", T=1000)
    z, x_hat = randn(5, 2, seed=0), randn(5, 2, seed=1)
    t = torch.tensor([1.0, 0.5, 0.3, 0.01, 0.2], dtype=F64)
    s = torch.tensor([0.9, 0.0, 0.1, 0.0, 0.19], dtype=F64)
    gamma = 0.3
    got = AncestralGammaStep(gamma)(z, t, s, x_hat, None, schedule, torch.Generator().manual_seed(2))
    mean, var_post = posterior(schedule, z, x_hat, t=t, s=s)
    var_fwd = transition(schedule, s=s, t=t)[1][:, None]
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    expected = mean + (var_post ** (1 - gamma) * var_fwd**gamma).sqrt() * (s != 0).to(F64)[:, None] * noise
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[[1, 3]], x_hat[[1, 3]])  # at s = 0 on a discrete schedule: x-hat, no noise


# ----------------------------------------------------------------------------- exact denoiser


@pytest.mark.parametrize("step", [DDPMStep(), DDIMStep(1.0), DDIMStep(0.5), AncestralGammaStep(0.3),
                                  AncestralGammaStep(1.0)],
                         ids=["ddpm", "ddim1", "ddim0.5", "gamma0.3", "gamma1"])
def test_stochastic_samplers_give_the_data_distribution(step):
    """250 of 1000 steps: the bias of the std is about 0.013 (0.003 with all 1000 steps);
    standard errors are 0.004 (mean) and 0.003 (std)."""
    schedule = get_schedule("linear", T=1000)
    result = sample(ExactDenoiser(schedule, "eps"), schedule, respace(1000, 250, "trailing"), step,
                    shape=(10_000, 2), generator=torch.Generator().manual_seed(0), progress=False)
    x = result.x.to(F64)
    torch.testing.assert_close(x.mean(0), MU, rtol=0, atol=0.02)
    torch.testing.assert_close(x.std(0), torch.full((2,), STD, dtype=F64), rtol=0, atol=0.02)


@pytest.mark.parametrize("step,nfe,tol", [(DDIMStep(), 1000, 1e-2), (EulerStep(), 1000, 1e-2),
                                          (HeunStep(), 1999, 3e-5), (DPMSolverPP2MStep(), 1000, 1e-3)],
                         ids=["ddim", "euler", "heun", "dpm++2m"])
def test_ode_samplers_give_the_exact_ode_solution(step, nfe, tol):
    """All 1000 steps of DDPM's linear schedule, z_1 -> x. Measured max errors: DDIM 4.6e-3, Euler 4.2e-3
    (both first order), Heun 1.0e-5, DPM-Solver++(2M) 1.6e-4."""
    schedule = get_schedule("linear", T=1000)
    z1 = randn(256, 2, seed=0)
    result = sample(ExactDenoiser(schedule, "x"), schedule, respace(1000, 1000, "trailing"), step, z=z1,
                    prediction="x", progress=False)
    assert result.nfe == nfe  # Heun: 2 per step, 1 on the last (s = 0, Euler)
    assert result.seconds > 0
    exact = ode_solution(schedule, z1, 1.0, 0.0)
    assert (result.x - exact).abs().max().item() < tol


def test_heun_is_second_order_on_a_discrete_schedule():
    """DDPM's 1000-step linear schedule, trailing grids, the exact denoiser: Heun's global error falls by
    about 4 whenever the steps double. log alpha-bar is linear on each cell of the grid, so lambda_t has
    a kink at every grid point; the second slope must be the one from above s (inside the step).
    Taken from the cell below s, the error stalled near 5e-3 (2.6e-3 at 100 steps, 5.4e-3 at 1000).
    Measured: 4.2e-2, 1.1e-2, 2.6e-3, 6.1e-4, 6.6e-5, 8.8e-6 at 25, 50, ..., 800 steps; 1.0e-5 at 1000."""
    schedule = get_schedule("linear", T=1000)
    z1 = randn(256, 2, seed=0)
    exact = ode_solution(schedule, z1, 1.0, 0.0)
    steps = [25, 50, 100, 200, 400, 800]
    errors = []
    for n in steps:
        x = sample(ExactDenoiser(schedule, "x"), schedule, respace(1000, n, "trailing"), HeunStep(), z=z1,
                   prediction="x", progress=False).x
        errors.append((x - exact).abs().max().item())
    ratios = [a / b for a, b in zip(errors, errors[1:], strict=False)]
    assert all(3.5 < r < 5.0 for r in ratios[:3]), (ratios, errors)  # 25 -> 200: second order
    assert all(r > 3.5 for r in ratios), (ratios, errors)            # and at least that beyond
    assert errors[-1] < 2e-5, errors


def test_probability_flow_velocity_is_eq_6():
    schedule = CosineSchedule()
    z, x_hat = randn(4, 2, seed=0), randn(4, 2, seed=1)
    t = torch.tensor(0.4, dtype=F64)
    alpha, sigma = schedule.alpha_sigma(t)
    eps_hat = predict_eps(x_hat, "x", z, alpha, sigma)
    h = 1e-6  # f and g^2 by central differences, eqs. (8)-(9)
    log_alpha = [schedule.alpha(t + d).log() for d in (h, -h)]
    sigma2 = [schedule.sigma(t + d) ** 2 for d in (h, -h)]
    f = (log_alpha[0] - log_alpha[1]) / (2 * h)
    g2 = (sigma2[0] - sigma2[1]) / (2 * h) - 2 * f * sigma**2
    expected = f * z - 0.5 * g2 * (-eps_hat / sigma)
    torch.testing.assert_close(probability_flow_velocity(schedule, 0.4, x_hat, eps_hat), expected,
                               rtol=1e-6, atol=1e-8)


# The convergence test integrates from t = 1 to t_min = 0.05 on a continuous cosine schedule whose
# logsnr clip (-80) is not reached on [t_min, 1] (unclipped lambda_1 = -74.7), so the ODE is smooth
# there; near t = 0, sigma_t ~ sqrt(t) and the ODE's coefficients are singular, hence t_min > 0.
# The denoiser returns x-hat: with eps-prediction, x-hat = (z - sigma eps)/alpha at t = 1
# (alpha ~ 6e-17) is pure rounding noise, yet it enters the Euler-in-t slope with weight alpha'_1 ~ 1.6,
# an O(h) error that would make Heun and DPM-Solver++ look first order.
CONV_SCHEDULE = CosineSchedule(logsnr_min=-80.0)
CONV_STEPS = [16, 32, 64, 128, 256]
CONV_T_MIN = 0.05


def _loglog_slope(steps, errors):
    x, y = torch.tensor(steps, dtype=F64).log(), torch.tensor(errors, dtype=F64).log()
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x * x).sum())


def convergence_slope(make_step, steps=CONV_STEPS):
    z1 = randn(64, 2, seed=0)
    exact = ode_solution(CONV_SCHEDULE, z1, 1.0, CONV_T_MIN)
    errors = []
    for n in steps:
        ts = torch.linspace(1.0, CONV_T_MIN, n + 1, dtype=F64)
        x = sample(ExactDenoiser(CONV_SCHEDULE, "x"), CONV_SCHEDULE, ts, make_step(), z=z1, prediction="x",
                   progress=False).x
        errors.append((x - exact).abs().max().item())
    return _loglog_slope(steps, errors), errors


@pytest.mark.parametrize("make_step,low,high", [(DDIMStep, -1.2, -0.85), (EulerStep, -1.2, -0.85),
                                                (HeunStep, -2.2, -1.85), (DPMSolverPP2MStep, -2.2, -1.8)],
                         ids=["ddim", "euler", "heun", "dpm++2m"])
def test_global_error_falls_with_the_order_of_the_solver(make_step, low, high):
    slope, errors = convergence_slope(make_step)
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert low < slope < high, (slope, errors)


def test_dpm_solver_first_step_is_ddim_and_every_run_starts_fresh():
    schedule = get_schedule("cosine", T=1000)
    model = ExactDenoiser(schedule, "eps")
    z = randn(16, 2, seed=3)
    one = [1.0, 0.5]
    a = sample(model, schedule, one, DPMSolverPP2MStep(), z=z, progress=False).x
    b = sample(model, schedule, one, DDIMStep(), z=z, progress=False).x
    torch.testing.assert_close(a, b)
    step = DPMSolverPP2MStep()
    ts = respace(1000, 6, "trailing")
    first = sample(model, schedule, ts, step, z=z, progress=False).x
    second = sample(model, schedule, ts, step, z=z, progress=False).x  # a new run, a new state
    assert torch.equal(first, second)
    assert not torch.allclose(first, sample(model, schedule, ts, DDIMStep(), z=z, progress=False).x)
    # called by hand without a state, every step is first order (DDIM)
    x_hat = randn(16, 2, seed=4)
    alpha, sigma = schedule.alpha_sigma(torch.tensor(0.7, dtype=F64))
    eps_hat = predict_eps(x_hat, "x", z, alpha, sigma)
    for _ in range(2):
        torch.testing.assert_close(step(z, 0.7, 0.4, x_hat, eps_hat, schedule),
                                   DDIMStep()(z, 0.7, 0.4, x_hat, eps_hat, schedule), rtol=1e-12, atol=1e-12)


class RunsInside:
    """A model whose every call also runs a whole inner sampling run, with the step object of the outer
    run: two runs interleaved through the one loop. Returns the inner model's output unchanged."""

    def __init__(self, model, schedule, step, timesteps, z):
        self.model, self.schedule, self.step, self.timesteps, self.z = model, schedule, step, timesteps, z
        self.inner = []

    def __call__(self, z, t, **cond):
        run = sample(self.model, self.schedule, self.timesteps, self.step, z=self.z, progress=False)
        self.inner.append(run.x)
        return self.model(z, t)


def test_interleaved_runs_with_one_dpm_solver_equal_separate_runs():
    """The history lives in each run's state, not on the DPMSolverPP2MStep: two runs interleaved step by
    step (by hand, and through the loop itself) give bit for bit what two separate runs give."""
    schedule = get_schedule("linear", T=1000)
    model = ExactDenoiser(schedule, "eps")
    step = DPMSolverPP2MStep()
    ts_a, ts_b = respace(1000, 8, "trailing"), respace(1000, 12, "leading")
    z_a, z_b = randn(16, 2, seed=1), randn(16, 2, seed=2)
    alone_a = sample(model, schedule, ts_a, step, z=z_a, progress=False).x
    alone_b = sample(model, schedule, ts_b, step, z=z_b, progress=False).x
    # by hand: one step of a, one step of b, ... each run with its own state
    runs = [[ts_a.tolist(), z_a, step.init_state()], [ts_b.tolist(), z_b, step.init_state()]]
    for k in range(max(len(ts_a), len(ts_b)) - 1):
        for run in runs:
            ts, z, state = run
            if k + 1 < len(ts):
                a, s_ = schedule.alpha_sigma(torch.tensor(ts[k], dtype=F64))
                eps = model(z, torch.full((16,), ts[k], dtype=F64))
                x_hat = predict_x(eps, "eps", z, a, s_)
                run[1] = step(z, ts[k], ts[k + 1], x_hat, eps, schedule, state=state)
    assert torch.equal(runs[0][1], alone_a) and torch.equal(runs[1][1], alone_b)
    # through the loop: the outer run's model runs a whole inner run with the same step object at every call
    nested = RunsInside(model, schedule, step, ts_b, z_b)
    outer = sample(nested, schedule, ts_a, step, z=z_a, progress=False).x
    assert torch.equal(outer, alone_a)
    assert len(nested.inner) == 8 and all(torch.equal(x, alone_b) for x in nested.inner)


def test_ddim_step_takes_per_example_times():
    """DDIMStep with t, s of shape (B,) gives each row what the step with that row's scalar times gives,
    and draws no noise for the rows that end at s = 0 (distillation's teacher steps; Chapter 5 §3)."""
    schedule = get_schedule("linear", T=1000)
    z, x_hat = randn(6, 3, seed=0), randn(6, 3, seed=1)
    t = torch.tensor([1.0, 0.9, 0.5, 0.3, 0.1, 0.002], dtype=F64)
    s = torch.tensor([0.8, 0.0, 0.25, 0.299, 0.0, 0.001], dtype=F64)
    a_t, sg_t = schedule.alpha_sigma(t)
    eps_hat = predict_eps(x_hat, "x", z, a_t[:, None], sg_t[:, None])
    rows = torch.cat([DDIMStep()(z[k:k + 1], t[k].item(), s[k].item(), x_hat[k:k + 1], eps_hat[k:k + 1],
                                 schedule) for k in range(6)])
    torch.testing.assert_close(DDIMStep()(z, t, s, x_hat, eps_hat, schedule), rows, rtol=1e-12, atol=1e-12)
    # eta > 0: the deterministic part per row, plus c noise with c = 0 where s = 0
    eta = 0.7
    got = DDIMStep(eta)(z, t, s, x_hat, eps_hat, schedule, torch.Generator().manual_seed(3))
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    a_s, sg_s = schedule.alpha_sigma(s)
    c2 = eta**2 * -torch.expm1(schedule.logsnr(t) - schedule.logsnr(s)) * sg_s**2
    expected = (a_s[:, None] * x_hat + (sg_s**2 - c2).sqrt()[:, None] * eps_hat
                + torch.where(s == 0, 0.0, c2.sqrt())[:, None] * noise)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[[1, 4]], x_hat[[1, 4]])  # alpha_0 = 1, sigma_0 = 0: x-hat, no noise
    with pytest.raises(ValueError, match="needs s < t"):
        DDIMStep(0.5)(z, t, t, x_hat, eps_hat, schedule)


# ----------------------------------------------------------------------------- inversion and slerp


def test_ddim_inversion_reconstructs_with_error_falling_in_steps():
    schedule = get_schedule("linear", T=1000)
    model = ExactDenoiser(schedule, "eps")
    x = MU + STD * randn(128, 2, seed=4)
    errors = []
    for steps in (10, 50, 250, 1000):
        ts = respace(1000, steps, "trailing")
        z1, nfe = ddim_invert(model, schedule, x, ts, "eps")
        assert nfe == steps
        back = sample(model, schedule, ts, DDIMStep(), z=z1, progress=False).x
        errors.append((back - x).abs().max().item())
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)) and errors[-1] < 0.02, errors
    # the inverted noise is the exact ODE's noise for the data point, up to the same error
    z1, _ = ddim_invert(model, schedule, x, respace(1000, 1000, "trailing"), "eps")
    x_again = ode_solution(schedule, z1, 1.0, 0.0)
    assert (x_again - x).abs().max().item() < 0.02


def test_slerp():
    z0, z1 = randn(8, 3, 4, 4, seed=0), randn(8, 3, 4, 4, seed=1)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1)
    # equal norms: the norm is kept all along the arc
    u0 = z0 / z0.flatten(1).norm(dim=1)[:, None, None, None]
    u1 = z1 / z1.flatten(1).norm(dim=1)[:, None, None, None]
    for alpha in (0.25, 0.5, 0.9):
        torch.testing.assert_close(slerp(u0, u1, alpha).flatten(1).norm(dim=1), torch.ones(8, dtype=F64))
    # the midpoint of two orthogonal unit vectors
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(slerp(e0, e1, 0.5), torch.tensor([1.0, 1.0]) / math.sqrt(2))
    torch.testing.assert_close(slerp(e0, e0, 0.3), e0)  # parallel: falls back to lerp


def test_bad_inputs_raise_value_errors():
    schedule = get_schedule("linear", T=10)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        DDIMStep(-0.1)
    with pytest.raises(ValueError, match="gamma must lie"):
        AncestralGammaStep(1.5)
    with pytest.raises(ValueError, match="unknown spacing 'uniform'"):
        respace(10, 5, "uniform")
    with pytest.raises(ValueError, match="steps must be an integer in 1..T"):
        respace(10, 11)
    with pytest.raises(ValueError, match="steps must be an integer in 1..T"):
        respace_indices(10, 0)
    with pytest.raises(ValueError, match="DiscreteSchedule"):
        respaced_schedule(CosineSchedule(), [1, 2])
    with pytest.raises(ValueError, match="1..T"):
        respaced_schedule(schedule, [0, 5])
    with pytest.raises(ValueError, match="repeat"):
        respaced_schedule(schedule, [3, 3])
    with pytest.raises(ValueError, match="same shape"):
        slerp(torch.zeros(2, 3), torch.zeros(3, 2), 0.5)
    model = ExactDenoiser(schedule, "x")
    with pytest.raises(ValueError, match="invertible"):
        sample(model, schedule, [0.0, 0.5, 1.0], DDPMStep(), shape=(2, 2), increasing=True, progress=False)
    with pytest.raises(ValueError, match="strictly increasing"):
        sample(model, schedule, [1.0, 0.5], DDIMStep(), shape=(2, 2), increasing=True, progress=False)
    with pytest.raises(ValueError, match="x-prediction"):
        ddim_invert(model, schedule, torch.zeros(2, 2), [0.0, 0.5, 1.0], "x")
    with pytest.raises(ValueError, match="too large"):
        DDIMStep(5.0)(torch.zeros(2, 2), 0.5, 0.4, torch.zeros(2, 2), torch.zeros(2, 2), schedule)


@pytest.mark.parametrize("make_step", [DDPMStep, lambda: DDIMStep(0.0), lambda: DDIMStep(0.5),
                                       lambda: AncestralGammaStep(0.3), EulerStep, HeunStep,
                                       DPMSolverPP2MStep, ReverseSDEStep, PredictorCorrectorStep],
                         ids=["ddpm", "ddim", "ddim0.5", "gamma0.3", "euler", "heun", "dpm++2m", "sde", "pc"])
def test_every_sampler_takes_all_three_predictions(make_step):
    """The same exact denoiser reporting eps, x or v gives the same samples and the same NFE."""
    from minidiff.analytic import GaussianMixtureDenoiser

    schedule = get_schedule("linear", T=1000)
    z = randn(32, 2, seed=9)
    outs = {}
    for prediction in ("eps", "x", "v"):
        model = GaussianMixtureDenoiser(MU[None], STD, schedule, prediction)
        outs[prediction] = sample(model, schedule, respace(1000, 20, "trailing"), make_step(), z=z,
                                  prediction=prediction, generator=torch.Generator().manual_seed(1),
                                  progress=False)
    for prediction in ("x", "v"):
        torch.testing.assert_close(outs[prediction].x, outs["eps"].x, rtol=0, atol=1e-8)
        assert outs[prediction].nfe == outs["eps"].nfe
