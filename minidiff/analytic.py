"""Exact answers for Gaussian-mixture data: the optimal denoiser and the Gaussian probability-flow map.

For data x ~ sum_k pi_k N(c_k, s^2 I) and z_t = alpha_t x + sigma_t eps, each component gives
z_t | k ~ N(alpha c_k, v I) with v = alpha^2 s^2 + sigma^2, and by Bayes (Gaussian conditioning)

    E[x | z_t, k] = c_k + (alpha s^2 / v) (z_t - alpha c_k),
    x*(z_t)       = sum_k r_k(z_t) E[x | z_t, k],   r_k ∝ pi_k exp(-|z_t - alpha c_k|^2 / (2 v)),

the posterior-weighted average that minimises the denoising loss (Luhman & Luhman 2022, eq. (4)).
The matching eps* = (z_t - alpha x*) / sigma = sum_k r_k sigma (z_t - alpha c_k) / v is finite at
sigma = 0. Plugging x* into a sampler isolates the sampler's own error from the network's.
"""

from __future__ import annotations

import torch

from .diffusion import PREDICTIONS
from .schedules import NoiseSchedule

__all__ = ["GaussianMixtureDenoiser", "gaussian_flow_map"]


class GaussianMixtureDenoiser(torch.nn.Module):
    """The optimal denoiser of a mixture of isotropic Gaussians, usable as a model(z, t).

    centers: (K, D) component means (D = number of features per example); std: the common
    standard deviation s (0 allowed: point masses); weights: (K,) mixture weights (default equal).
    Returns the `prediction` ("x", "eps" or "v") of the exact posterior mean at (z, t) for `schedule`.
    Computed in float64, returned in z's dtype. A single component is the Gaussian case.
    """

    def __init__(self, centers: torch.Tensor, std: float, schedule: NoiseSchedule, prediction: str = "x",
                 weights: torch.Tensor | None = None):
        super().__init__()
        centers = torch.as_tensor(centers, dtype=torch.float64)
        if centers.ndim != 2:
            raise ValueError(f"centers must be a (K, D) tensor of component means; "
                             f"got shape {tuple(centers.shape)}.")
        if not float(std) >= 0:
            raise ValueError(f"std must be >= 0; got {std}.")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}.")
        if weights is None:
            weights = torch.full((len(centers),), 1.0 / len(centers), dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (len(centers),) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError("weights must be K non-negative numbers (one per center) with a positive sum.")
        self.register_buffer("centers", centers)
        self.register_buffer("log_weights", (weights / weights.sum()).log())
        self.std, self.schedule, self.prediction = float(std), schedule, prediction

    def posterior_mean(self, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x*, eps*) at z (B, ...) and times t (B,) or a scalar, in float64."""
        flat = z.reshape(len(z), -1).to(torch.float64)
        if flat.shape[1] != self.centers.shape[1]:
            raise ValueError(f"z has {flat.shape[1]} features per example but the centers have "
                             f"{self.centers.shape[1]}.")
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(len(z))
        alpha, sigma = self.schedule.alpha_sigma(t.cpu())
        alpha, sigma = alpha.to(flat.device)[:, None], sigma.to(flat.device)[:, None]
        v = alpha**2 * self.std**2 + sigma**2                                       # (B, 1)
        diff = flat[:, None, :] - alpha[:, :, None] * self.centers[None]  # z - alpha c_k, (B, K, D)
        logits = self.log_weights[None] - (diff**2).sum(-1) / (2 * v)
        r = torch.softmax(logits, dim=1)[:, :, None]                                 # responsibilities r_k
        x_k = self.centers[None] + (alpha * self.std**2 / v)[:, :, None] * diff      # E[x | z, k]
        eps_k = (sigma / v)[:, :, None] * diff
        return (r * x_k).sum(1).reshape(z.shape), (r * eps_k).sum(1).reshape(z.shape)

    def forward(self, z: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        x, eps = self.posterior_mean(z, t)
        if self.prediction == "x":
            out = x
        elif self.prediction == "eps":
            out = eps
        else:
            t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(len(z)).cpu()
            shape = (-1,) + (1,) * (z.ndim - 1)
            alpha, sigma = (a.to(x.device).reshape(shape) for a in self.schedule.alpha_sigma(t))
            out = alpha * eps - sigma * x  # v = alpha eps - sigma x
        return out.to(z.dtype)


def gaussian_flow_map(schedule: NoiseSchedule, z: torch.Tensor, t_from, t_to, mean: torch.Tensor,
                      std: float) -> torch.Tensor:
    """The exact probability-flow ODE map for data N(mean, std^2 I) (Salimans & Ho 2022, eq. (6)).

    The marginal at t is N(alpha_t mean, v_t I), v_t = alpha_t^2 std^2 + sigma_t^2, and the flow keeps
    the standardised coordinate xi = (z_t - alpha_t mean) / sqrt(v_t) fixed, so
    z_{t_to} = alpha_{t_to} mean + sqrt(v_{t_to}) xi (at t_to = 0 on a VP schedule: mean + std xi).
    """
    f64 = torch.float64
    mean = torch.as_tensor(mean, dtype=f64)
    a1, s1 = schedule.alpha_sigma(torch.tensor(float(t_from), dtype=f64))
    a0, s0 = schedule.alpha_sigma(torch.tensor(float(t_to), dtype=f64))
    xi = (z.to(f64) - a1 * mean) / torch.sqrt(a1**2 * std**2 + s1**2)
    return (a0 * mean + torch.sqrt(a0**2 * std**2 + s0**2) * xi).to(z.dtype)
