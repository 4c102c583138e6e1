"""minidiff.analytic: the exact Gaussian-mixture denoiser and the Gaussian flow map."""

import pytest
import torch

from minidiff.analytic import GaussianMixtureDenoiser, gaussian_flow_map
from minidiff.data import toy_modes
from minidiff.samplers import probability_flow_velocity
from minidiff.schedules import CosineSchedule, get_schedule

F64 = torch.float64


def mixture_log_density(z, centers, std, weights, alpha, sigma):
    """log p_t(z) of the noisy mixture, written out independently of the module."""
    v = alpha**2 * std**2 + sigma**2
    d = z.shape[-1]
    sq = ((z[:, None, :] - alpha * centers[None]) ** 2).sum(-1)
    comp = -sq / (2 * v) - 0.5 * d * torch.log(2 * torch.pi * v)
    return torch.logsumexp(weights.log()[None] + comp, dim=1)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_tweedie_formula_on_the_25_gaussians(t):
    """alpha x* = z + sigma^2 grad log p_t(z) (Tweedie), eps* = -sigma grad log p_t(z)."""
    centers, std = toy_modes("25gaussians")
    schedule = CosineSchedule()
    weights = torch.rand(25, generator=torch.Generator().manual_seed(0), dtype=F64) + 0.1
    den = GaussianMixtureDenoiser(centers, std, schedule, "x", weights=weights)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=F64).requires_grad_(True)
    alpha, sigma = schedule.alpha_sigma(torch.tensor(t, dtype=F64))
    logp = mixture_log_density(z, centers.to(F64), std, weights / weights.sum(), alpha, sigma)
    score, = torch.autograd.grad(logp.sum(), z)
    x, eps = den.posterior_mean(z.detach(), torch.tensor(t))
    torch.testing.assert_close(alpha * x, z.detach() + sigma**2 * score)
    torch.testing.assert_close(eps, -sigma * score)


def test_predictions_are_consistent_and_one_component_is_the_gaussian_case():
    schedule = get_schedule("linear", T=1000)
    mu, std = torch.tensor([[0.3, -0.2, 0.1]], dtype=F64), 0.5
    z = torch.randn(16, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    t = torch.linspace(0.05, 1.0, 16, dtype=F64)                       # a different time per example
    x, eps, v = (GaussianMixtureDenoiser(mu, std, schedule, p)(z, t) for p in ("x", "eps", "v"))
    alpha, sigma = (a[:, None] for a in schedule.alpha_sigma(t))
    torch.testing.assert_close(alpha * x + sigma * eps, z)            # z = alpha x + sigma eps
    torch.testing.assert_close(v, alpha * eps - sigma * x)
    var = alpha**2 * std**2 + sigma**2
    torch.testing.assert_close(x, mu + alpha * std**2 * (z - alpha * mu) / var)


def test_gaussian_flow_map_solves_the_probability_flow_ode():
    """d/dt of the map equals eq. (6)'s velocity with the exact denoiser (central differences)."""
    schedule = CosineSchedule()
    mu, std = torch.tensor([0.5, -0.25], dtype=F64), 0.4
    den = GaussianMixtureDenoiser(mu[None], std, schedule, "x")
    z1 = torch.randn(32, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    for t in (0.2, 0.5, 0.8):
        z = gaussian_flow_map(schedule, z1, 1.0, t, mu, std)
        h = 1e-5
        dz = (gaussian_flow_map(schedule, z1, 1.0, t + h, mu, std)
              - gaussian_flow_map(schedule, z1, 1.0, t - h, mu, std)) / (2 * h)
        x, eps = den.posterior_mean(z, torch.tensor(t))
        torch.testing.assert_close(dz, probability_flow_velocity(schedule, t, x, eps), atol=1e-7, rtol=1e-6)
    back = gaussian_flow_map(schedule, gaussian_flow_map(schedule, z1, 1.0, 0.0, mu, std), 0.0, 1.0, mu, std)
    torch.testing.assert_close(back, z1)


def test_bad_inputs():
    schedule = CosineSchedule()
    with pytest.raises(ValueError, match="centers"):
        GaussianMixtureDenoiser(torch.zeros(3), 0.1, schedule)
    with pytest.raises(ValueError, match="std"):
        GaussianMixtureDenoiser(torch.zeros(3, 2), -1.0, schedule)
    with pytest.raises(ValueError, match="prediction"):
        GaussianMixtureDenoiser(torch.zeros(3, 2), 0.1, schedule, "score")
    with pytest.raises(ValueError, match="weights"):
        GaussianMixtureDenoiser(torch.zeros(3, 2), 0.1, schedule, weights=torch.ones(2))
    with pytest.raises(ValueError, match="features"):
        GaussianMixtureDenoiser(torch.zeros(3, 2), 0.1, schedule)(torch.zeros(4, 3), torch.ones(4))


# ----------------------------------------------------------------------------- the denoising distribution


def test_reverse_step_against_bayes_on_a_grid():
    """q(z_s|z_t) ∝ q(z_s) q(z_t|z_s), evaluated on a fine 1-D grid, equals the mixture of reverse_step."""
    from minidiff.analytic import mixture_log_prob
    from minidiff.diffusion import transition
    from minidiff.schedules import LinearVPSchedule, discretize

    schedule = discretize(LinearVPSchedule(), 4)
    centers, std = torch.tensor([[-1.0], [0.2], [0.7]], dtype=F64), 0.1
    weights = torch.tensor([0.5, 0.2, 0.3], dtype=F64)
    den = GaussianMixtureDenoiser(centers, std, schedule, weights=weights)
    grid = torch.linspace(-4, 4, 16001, dtype=F64)
    for t, s, z in ((0.5, 0.25, 0.3), (0.25, 0.0, -0.4), (1.0, 0.75, 1.5)):
        w, means, var = den.reverse_step(torch.tensor([[z]], dtype=F64), t, s)
        a_s, sg_s = schedule.alpha_sigma(torch.tensor(s, dtype=F64))
        a_ts, var_ts = transition(schedule, s=s, t=t)
        v_s = a_s**2 * std**2 + sg_s**2
        sq = (grid[:, None] - a_s * centers[:, 0]) ** 2
        log_prior = torch.logsumexp(weights.log() - sq / (2 * v_s), dim=1)
        log_post = log_prior - (z - a_ts * grid) ** 2 / (2 * var_ts)
        p = (log_post - log_post.max()).exp()
        p = p / (p.sum() * (grid[1] - grid[0]))
        q = mixture_log_prob(grid[:, None, None], w, means, var)[:, 0].exp()
        torch.testing.assert_close(q, p, atol=1e-4 * p.max(), rtol=0)   # up to the grid's truncation


def test_reverse_step_against_monte_carlo():
    """Simulate (x, z_s, z_t), keep the z_t near a value, compare the kept z_s with reverse_step's moments."""
    from minidiff.schedules import LinearVPSchedule, discretize

    schedule = discretize(LinearVPSchedule(), 4)
    centers, std, n = torch.tensor([[-0.6], [0.5]], dtype=F64), 0.05, 4_000_000
    den = GaussianMixtureDenoiser(centers, std, schedule)
    g = torch.Generator().manual_seed(0)
    x = centers[torch.randint(2, (n,), generator=g), 0] + std * torch.randn(n, generator=g, dtype=F64)
    for t, s in ((0.5, 0.25), (0.25, 0.0)):
        a_s, sg_s = schedule.alpha_sigma(torch.tensor(s, dtype=F64))
        a_t, sg_t = schedule.alpha_sigma(torch.tensor(t, dtype=F64))
        z_s = a_s * x + sg_s * torch.randn(n, generator=g, dtype=F64)
        noise = torch.randn(n, generator=g, dtype=F64)
        z_t = (a_t / a_s) * z_s + (sg_t**2 - (a_t / a_s) ** 2 * sg_s**2).sqrt() * noise
        keep = (z_t - 0.05).abs() < 0.005
        w, means, var = den.reverse_step(torch.tensor([[0.05]], dtype=F64), t, s)
        mean = (w[0] * means[0, :, 0]).sum()
        second = (w[0] * (means[0, :, 0] ** 2 + var[0])).sum()
        p_pos = (w[0] * torch.special.ndtr(means[0, :, 0] / var[0].sqrt())).sum()   # P(z_s > 0), exact
        assert keep.sum() > 10_000
        assert abs(z_s[keep].mean() - mean) < 0.015
        assert abs(z_s[keep].var() - (second - mean**2)) < 0.015
        assert abs((z_s[keep] > 0).double().mean() - p_pos) < 0.015
    assert 0.2 < w[0, 1] < 0.8 and (means[0, 1, 0] - means[0, 0, 0]) > 8 * var[0].sqrt()  # last step: 2 modes


def test_reverse_step_mean_is_ddpms_step_and_moment_match():
    from minidiff.analytic import moment_match
    from minidiff.diffusion import posterior

    centers, std = toy_modes("25gaussians")
    schedule = get_schedule("linear", T=1000)
    den = GaussianMixtureDenoiser(centers, std, schedule)
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    w, means, var = den.reverse_step(z, 0.3, 0.2)
    mu, cov = moment_match(w, means, var)
    x_star, _ = den.posterior_mean(z, torch.tensor(0.3))
    torch.testing.assert_close(mu, posterior(schedule, z, x_star, t=0.3, s=0.2)[0])  # mu-tilde(z_t, x*)
    dev = means - mu[:, None]
    spread = (w[:, :, None, None] * dev[..., None] * dev[..., None, :]).sum(1)
    expected = var[:, None, None] * torch.eye(2, dtype=F64) + spread
    torch.testing.assert_close(cov, expected)
    w1, m1, v1 = den.reverse_step(z, 0.3, 0.299)                    # a tiny step: close to one Gaussian
    _, cov1 = moment_match(w1, m1, v1)
    assert bool((torch.linalg.eigvalsh(cov1)[:, -1] < 2 * v1).all())
    with pytest.raises(ValueError, match="0 <= s < t"):
        den.reverse_step(z, 0.3, 0.3)


def test_exact_mixture_step_samples_the_mixture_and_its_moment_match():
    """One z_t, many draws: the exact step's sample mean and covariance are the mixture's (= moment_match's),
    and the moment-matched step has the same two moments but is Gaussian (unimodal)."""
    from minidiff import samplers, schedules
    from minidiff.analytic import ExactMixtureStep, GaussianMixtureDenoiser, moment_match

    sched = schedules.get_schedule("linear", T=1000)
    centers = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    den = GaussianMixtureDenoiser(centers, 0.05, sched, "x")
    z = torch.full((40000, 2), 0.0, dtype=torch.float64)
    z[:, 0] = 0.05                                                 # between the modes, undecided
    w, m, v = den.reverse_step(z[:1], 0.3, 0.02)
    mu, cov = moment_match(w, m, v)
    for matched in (False, True):
        out = ExactMixtureStep(den, moment_matched=matched)(z, 0.3, 0.02, None, None, sched,
                                                            torch.Generator().manual_seed(0))
        torch.testing.assert_close(out.mean(0), mu[0], atol=0.01, rtol=0)
        torch.testing.assert_close(torch.cov(out.T), cov[0], atol=0.01, rtol=0.02)
    exact = ExactMixtureStep(den)(z, 0.3, 0.02, None, None, sched, torch.Generator().manual_seed(0))
    near_mean = (exact[:, 0] - mu[0, 0]).abs() < 0.2             # the mixture has no mass at its mean
    matched = ExactMixtureStep(den, True)(z, 0.3, 0.02, None, None, sched, torch.Generator().manual_seed(0))
    assert near_mean.float().mean() < 0.01 < 0.1 < ((matched[:, 0] - mu[0, 0]).abs() < 0.2).float().mean()
    # through the sampler loop, 4 steps end on the data: each point close to a mode
    run = samplers.sample(den, sched, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]),
                          ExactMixtureStep(den), shape=(2000, 2), prediction="x",
                          generator=torch.Generator().manual_seed(1), progress=False)
    assert run.nfe == 4
    dist = (run.x[:, None, :].double() - centers[None]).norm(dim=-1).min(dim=1).values
    assert float((dist < 0.2).float().mean()) > 0.99
    with pytest.raises(ValueError, match="GaussianMixtureDenoiser"):
        ExactMixtureStep(object())
