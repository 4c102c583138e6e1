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
