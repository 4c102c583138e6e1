"""One sampling loop and the step rules that plug into it.

The loop (:func:`sample`) walks down a decreasing list of times t_0 > t_1 > ... > t_N. At each
pair (t, s) it calls the network once at z_t, turns the output into (x-hat, eps-hat), and hands
them to a *step rule* that returns z_s:

    step(z_t, t, s, x_hat, eps_hat, schedule, generator) -> z_s          (t, s floats, s < t)

A step rule is any callable with that signature. Two optional attributes extend it without
changing the loop:

* ``needs_denoise = True``: the loop also passes ``denoise=`` a function
  ``(z, t) -> (x_hat, eps_hat)`` that calls the network and counts each call in the NFE
  (for solvers with several evaluations per step, e.g. Heun).
* ``reset()``: called once before the loop (for multistep solvers that keep a history).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .diffusion import PREDICTIONS, expand_like, posterior, predict_eps, predict_x, randn_like, transition
from .schedules import NoiseSchedule

__all__ = ["SampleResult", "DDPMStep", "ddpm_timesteps", "sample"]


def ddpm_timesteps(T: int) -> torch.Tensor:
    """The DDPM grid in continuous time: [1, (T-1)/T, ..., 1/T, 0] (length T+1, float64)."""
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive integer; got {T!r}.")
    return torch.arange(T, -1, -1, dtype=torch.float64) / T


@dataclass(frozen=True)
class DDPMStep:
    """Ancestral step z_s ~ N(mu-tilde_{s|t}(z_t, x-hat), var I) (Ho et al. 2020, Algorithm 2 line 4).

    mu-tilde is the posterior mean of q(z_s | z_t, x) with x = x-hat (Salimans & Ho 2022, eq. (2)),
    which on DDPM's grid equals eq. (11): 1/sqrt(alpha_t) (z_t - beta_t / sqrt(1 - abar_t) eps-hat).
    variance="posterior": var = sigma-tilde^2_{s|t} (beta-tilde_t, eq. (7));
    variance="beta":      var = sigma^2_{t|s} = 1 - abar_t / abar_s (beta_t).
    No noise is added at s = 0.
    """

    variance: str = "posterior"

    def __post_init__(self):
        if self.variance not in ("posterior", "beta"):
            raise ValueError(f"unknown DDPM variance {self.variance!r}; choose 'posterior' or 'beta'.")

    def __call__(self, z_t, t, s, x_hat, eps_hat, schedule, generator=None):
        mean, var = posterior(schedule, z_t, x_hat, t, s)
        if float(s) == 0:
            return mean
        if self.variance == "beta":
            var = expand_like(transition(schedule, s, t)[1], z_t)
        return mean + var.sqrt() * randn_like(z_t, generator)


@dataclass
class SampleResult:
    """Output of :func:`sample`: the final samples, the number of network evaluations, and
    (with return_trajectory=True) z at every time in `timesteps` and x-hat at every model call,
    stored on the CPU."""

    x: torch.Tensor
    nfe: int
    trajectory: list[torch.Tensor] | None = None
    x_hats: list[torch.Tensor] | None = None


def _check_timesteps(timesteps) -> list[float]:
    ts = torch.as_tensor(timesteps, dtype=torch.float64).detach().cpu()
    if ts.ndim != 1 or len(ts) < 2:
        raise ValueError(f"timesteps must be a 1-D sequence of at least 2 times, e.g. ddpm_timesteps(T); "
                         f"got shape {tuple(ts.shape)}.")
    if not bool(((ts >= 0) & (ts <= 1)).all()):
        raise ValueError("timesteps must lie in [0, 1] (1 = noise, 0 = data).")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError("timesteps must be strictly decreasing (from noise towards data), "
                         "e.g. [1.0, 0.5, 0.0]; reverse them or remove repeated times.")
    return ts.tolist()


def _initial_z(model, shape, z, generator, device) -> torch.Tensor:
    if (shape is None) == (z is None):
        raise ValueError("give exactly one of `shape` (to draw z ~ N(0, I)) or `z` (a starting tensor).")
    if z is not None:
        return z
    if device is None:
        param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        device = param.device if param is not None else "cpu"
    return randn_like(torch.empty(tuple(shape), device=device), generator)


def sample(model: Callable, schedule: NoiseSchedule, timesteps: Sequence[float] | torch.Tensor,
           step: Callable, shape: Sequence[int] | None = None, z: torch.Tensor | None = None,
           prediction: str = "eps", generator: torch.Generator | None = None, cond: dict | None = None,
           progress: bool = True, return_trajectory: bool = False, clip_x: float | None = None,
           device: torch.device | str | None = None) -> SampleResult:
    """Run the reverse process from z at timesteps[0] down to timesteps[-1] with one step rule.

    model(z, t, **cond) -> output of type `prediction` ("eps", "x" or "v"), t a float tensor (B,).
    z starts as N(0, I) of `shape` (on `device`, default the model's) or as the given `z`.
    Noise comes from `generator` (drawn on its device, see diffusion.randn_like).
    clip_x clips x-hat to [-clip_x, clip_x] (eps-hat is then recomputed from the clipped x-hat).
    Runs under torch.no_grad(). NFE counts every network call, including a step rule's extra ones.
    """
    ts = _check_timesteps(timesteps)
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}.")
    cond = cond or {}
    nfe = 0

    def denoise(z_t: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One network call at (z_t, t) -> (x_hat, eps_hat)."""
        nonlocal nfe
        out = model(z_t, torch.full((z_t.shape[0],), float(t), dtype=z_t.dtype, device=z_t.device), **cond)
        nfe += 1
        if out.shape != z_t.shape:
            raise ValueError(f"the model must return a tensor shaped like z {tuple(z_t.shape)}; "
                             f"got {tuple(out.shape)}.")
        alpha, sigma = schedule.alpha_sigma(torch.tensor(float(t), dtype=torch.float64))
        x_hat = predict_x(out, prediction, z_t, alpha, sigma)
        if clip_x is None:
            return x_hat, predict_eps(out, prediction, z_t, alpha, sigma)
        x_hat = x_hat.clamp(-clip_x, clip_x)
        return x_hat, predict_eps(x_hat, "x", z_t, alpha, sigma)

    extra = {"denoise": denoise} if getattr(step, "needs_denoise", False) else {}
    if hasattr(step, "reset"):
        step.reset()
    with torch.no_grad():
        z = _initial_z(model, shape, z, generator, device)
        trajectory = [z.detach().cpu()] if return_trajectory else None
        x_hats = [] if return_trajectory else None
        pairs = list(zip(ts[:-1], ts[1:], strict=True))  # (t, s): from t down to s
        for t, s in tqdm(pairs, desc="sampling", disable=not progress, leave=False):
            x_hat, eps_hat = denoise(z, t)
            z = step(z, t, s, x_hat, eps_hat, schedule, generator, **extra)
            if return_trajectory:
                trajectory.append(z.detach().cpu())
                x_hats.append(x_hat.detach().cpu())
    return SampleResult(x=z, nfe=nfe, trajectory=trajectory, x_hats=x_hats)
