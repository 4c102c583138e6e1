"""One sampling loop and the step rules that plug into it (Chapter 1 §6, Chapter 2 §4, Chapter 3 §3-§6).

The loop (:func:`sample`) walks down a decreasing list of times t_0 > t_1 > ... > t_N. At each
pair (t, s) it calls the model once at z_t, turns the output into (x-hat, eps-hat)
(``diffusion.denoise``), and hands them to a *step rule* that returns z_s:

    step(z_t, t, s, x_hat, eps_hat, schedule, generator) -> z_s          (t, s floats, s < t)

The two contracts, the model's and the step rule's with its optional parts (``needs_denoise``
and ``denoise=``, ``init_state()`` and ``state=``, ``invertible``), are written down as
``typing.Protocol`` classes in ``minidiff.contracts``. NFE counts network evaluations: a model
wrapper that calls the network twice per call declares ``nfe_per_call = 2``. A run's state
(a multistep solver's history) lives in the run, not on the step object. Each run asks the
schedule's memoized copy (``schedule.memoized()``), so every time of a grid is evaluated once per
schedule, with bit-for-bit the same numbers.

Step rules here: :class:`DDPMStep` (ancestral), :class:`DDIMStep` (Song et al. 2021, eq. (12);
per-example times too), :class:`AncestralGammaStep` (Salimans & Ho 2022, eqs. (4)-(5)) and solvers
of the probability-flow ODE (eqs. (6)-(9)): :class:`EulerStep`, :class:`HeunStep` (Karras et al.
2022) and :class:`DPMSolverPP2MStep` (Lu et al. 2022b); and of the reverse-time SDE (Song et al. 2021,
eq. (6)): :class:`ReverseSDEStep` (Euler-Maruyama) and :class:`PredictorCorrectorStep` (Langevin corrector).
With ``sample(..., increasing=True)`` an
``invertible`` step rule (deterministic DDIM) walks from data to noise: :func:`ddim_invert`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .contracts import init_state, is_invertible, needs_denoise, network_evaluations
from .diffusion import (
    PREDICTIONS,
    denoise,
    expand_like,
    posterior_coefficients,
    precedes,
    randn_like,
    scale_for,
    transition,
)
from .schedules import NoiseSchedule

__all__ = [
    "SampleResult",
    "DDPMStep",
    "DDIMStep",
    "AncestralGammaStep",
    "EulerStep",
    "HeunStep",
    "DPMSolverPP2MStep",
    "ReverseSDEStep",
    "PredictorCorrectorStep",
    "ddim_update",
    "probability_flow_velocity",
    "reverse_sde_drift",
    "diffusion_coefficient_sq",
    "ddpm_timesteps",
    "sample",
    "ddim_invert",
    "slerp",
]


@functools.lru_cache(maxsize=1 << 16)
def _time_tensor(t: float) -> torch.Tensor:
    """The 0-d float64 tensor of t, made once per value (a memoized schedule answers it from memory)."""
    return torch.full((), t, dtype=torch.float64)


def _scalar(t) -> torch.Tensor:
    """A time as a 0-d float64 CPU tensor; one shared tensor per value (never modified in place)."""
    return _time_tensor(float(t))


def _time64(t) -> torch.Tensor:
    """A step's time as float64: 0-d on the CPU for a number, else the tensor (per-example times, (B,))."""
    return torch.as_tensor(t, dtype=torch.float64) if isinstance(t, torch.Tensor) else _scalar(t)


def _at_data(s: torch.Tensor) -> bool:
    """Whether every time in s is 0 (the step ends on the data)."""
    return float(s) == 0 if s.ndim == 0 else bool((s == 0).all())


def _noise(scale: torch.Tensor, s: torch.Tensor, z_t: torch.Tensor, generator) -> torch.Tensor | None:
    """scale * noise, with no noise where s = 0 (Ho et al. 2020, Algorithm 2 line 3); None (and no draw
    from the generator) when every s is 0. `scale` is already in z's dtype, shaped to broadcast."""
    if _at_data(s):
        return None
    if s.ndim > 0 and bool((s == 0).any()):
        scale = scale * expand_like(s != 0, z_t)
    return scale * randn_like(z_t, generator)


def ddpm_timesteps(T: int) -> torch.Tensor:
    """The DDPM grid in continuous time: [1, (T-1)/T, ..., 1/T, 0] (length T+1, float64)."""
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive integer; got {T!r}.")
    return torch.arange(T, -1, -1, dtype=torch.float64) / T


def _ancestral_step(gamma: float, z_t, t, s, x_hat, schedule, generator) -> torch.Tensor:
    """The body of :class:`AncestralGammaStep` (and of :class:`DDPMStep`, its two ends)."""
    t64, s64 = _time64(t), _time64(s)
    # 1. the posterior q(z_s | z_t, x = x-hat): mean mu-tilde_{s|t}, variance sigma-tilde^2_{s|t} (eqs. 1-3)
    coef_z, coef_x, var_post = posterior_coefficients(schedule, t=t64, s=s64)
    mean = expand_like(coef_z, z_t) * z_t + expand_like(coef_x, z_t) * x_hat
    if _at_data(s64):
        return mean  # no noise at s = 0
    # 2. the variance of eq. (5): (sigma-tilde^2_{s|t})^(1-gamma) (sigma^2_{t|s})^gamma; an end needs one term
    if gamma == 0:
        var = expand_like(var_post, z_t)
    else:
        var_fwd = expand_like(transition(schedule, s=s64, t=t64)[1], z_t)  # sigma^2_{t|s}, DDPM's beta_t
        var = var_fwd if gamma == 1 else expand_like(var_post, z_t) ** (1 - gamma) * var_fwd**gamma
    # 3. z_s = mu-tilde_{s|t} + sqrt(var) noise, eq. (4) (no noise where s = 0)
    noise = _noise(var.sqrt(), s64, z_t, generator)
    return mean if noise is None else mean + noise


@dataclass(frozen=True)
class DDPMStep:
    """Ancestral step z_s ~ N(mu-tilde_{s|t}(z_t, x-hat), var I) (Ho et al. 2020, Algorithm 2 line 4;
    Chapter 1 §6).

    mu-tilde is the posterior mean of q(z_s | z_t, x) with x = x-hat (Salimans & Ho 2022, eq. (2)),
    which on DDPM's grid equals eq. (11): 1/sqrt(alpha_t) (z_t - beta_t / sqrt(1 - abar_t) eps-hat).
    variance="posterior": var = sigma-tilde^2_{s|t} (beta-tilde_t, eq. (7));
    variance="beta":      var = sigma^2_{t|s} = 1 - abar_t / abar_s (beta_t).
    No noise is added at s = 0. These are the two ends of :class:`AncestralGammaStep` (gamma 0 and 1),
    which does the work.
    """

    variance: str = "posterior"

    def __post_init__(self):
        if self.variance not in ("posterior", "beta"):
            raise ValueError(f"unknown DDPM variance {self.variance!r}; choose 'posterior' or 'beta'.")

    @property
    def gamma(self) -> float:
        """The equivalent gamma of :class:`AncestralGammaStep`: 0 (posterior) or 1 (beta)."""
        return 0.0 if self.variance == "posterior" else 1.0

    def __call__(self, z_t, t, s, x_hat, eps_hat, schedule, generator=None):
        return _ancestral_step(self.gamma, z_t, t, s, x_hat, schedule, generator)


def ddim_update(x_t: torch.Tensor, eps_hat: torch.Tensor, abar_t, abar_prev, eta: float = 0.0,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM in DDPM's alpha-bar notation (Song et al. 2021, eq. (12) with sigma from eq. (16); Chapter 2 §4):

        x_prev = sqrt(abar_prev) (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
                 + sqrt(1 - abar_prev - sigma^2) eps + sigma noise,
        sigma  = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev).

    abar_t, abar_prev: scalars (alpha-bar of the current and the next, less noisy, step).
    A reference form for the book's check against the paper; the sampler's step is :class:`DDIMStep`,
    which computes the same in the alpha/sigma/lambda notation.
    """
    abar_t = torch.as_tensor(abar_t, dtype=torch.float64)
    abar_prev = torch.as_tensor(abar_prev, dtype=torch.float64)
    sigma = eta * ((1 - abar_prev) / (1 - abar_t)).sqrt() * (1 - abar_t / abar_prev).sqrt()
    x0 = (x_t - expand_like((1 - abar_t).sqrt(), x_t) * eps_hat) / expand_like(abar_t.sqrt(), x_t)
    coef_eps = (1 - abar_prev - sigma**2).sqrt()
    out = expand_like(abar_prev.sqrt(), x_t) * x0 + expand_like(coef_eps, x_t) * eps_hat
    if noise is not None and eta > 0:
        out = out + expand_like(sigma, x_t) * noise
    return out


@dataclass(frozen=True)
class DDIMStep:
    """DDIM step (Song et al. 2021, eq. (12); sigma from eq. (16); Chapter 2 §4), in continuous form:

        z_s = alpha_s x-hat + sqrt(sigma_s^2 - c^2) eps-hat + c noise,   c = eta sigma-tilde_{s|t},

    sigma-tilde^2_{s|t} = (1 - e^{lambda_t - lambda_s}) sigma_s^2 (Salimans & Ho 2022, eq. (3)),
    which is eq. (16)'s sigma^2 with alpha-bar = alpha^2 (see :func:`ddim_update`).
    eta=0: deterministic (Salimans & Ho eq. (10)); no noise is drawn. eta=1: the ancestral DDPM
    step with posterior variance, on any grid. No noise at s = 0. With eta=0 the step also runs
    upwards (s > t, inversion; Song et al. 2021 Sec. 5.4). eta must be >= 0 and
    eta sigma-tilde_{s|t} <= sigma_s (always so for eta <= 1).
    t and s may be floats or per-example (B,) tensors, as inside a distillation batch (Chapter 5 §3):
    this is the library's one DDIM step.
    """

    eta: float = 0.0

    def __post_init__(self):
        if not self.eta >= 0:  # also catches NaN
            raise ValueError(f"DDIM's eta must be >= 0 (0 = deterministic, 1 = DDPM); got {self.eta}.")

    @property
    def invertible(self) -> bool:
        """A deterministic step can also run from data to noise (sample(..., increasing=True))."""
        return self.eta == 0

    def __call__(self, z_t, t, s, x_hat, eps_hat, schedule, generator=None):
        s64 = _time64(s)
        # 1. alpha_s and sigma_s: eq. (12)'s sqrt(alpha_{t-1}) and sqrt(1 - alpha_{t-1})
        alpha_s, sigma_s = schedule.alpha_sigma(s64)
        if self.eta == 0:
            # 2. deterministic: "predicted x_0" times alpha_s plus the "direction pointing to x_t", eq. (12)
            return expand_like(alpha_s, z_t) * x_hat + expand_like(sigma_s, z_t) * eps_hat
        t64 = _time64(t)
        if not precedes(s64, t64):
            raise ValueError(f"a stochastic DDIM step (eta={self.eta}) needs s < t; got s={s}, t={t}.")
        # 3. c^2 = eta^2 sigma-tilde^2_{s|t} = eta^2 (1 - e^{lambda_t - lambda_s}) sigma_s^2, eq. (16)
        dlam = schedule.logsnr(t64) - schedule.logsnr(s64)
        var_s = sigma_s**2
        c2 = self.eta**2 * -torch.expm1(dlam) * var_s
        rest = var_s - c2
        if float(rest.min()) < -1e-12:
            raise ValueError(f"eta={self.eta} is too large at (t={t}, s={s}): eta sigma-tilde_{{s|t}} "
                             "exceeds sigma_s; use eta <= 1.")
        # 4. alpha_s x-hat plus the "direction pointing to x_t", sqrt(sigma_s^2 - c^2) eps-hat, eq. (12)
        out = expand_like(alpha_s, z_t) * x_hat + expand_like(rest.clamp(min=0).sqrt(), z_t) * eps_hat
        # 5. the random noise c eps_t of eq. (12), none at s = 0
        noise = _noise(expand_like(c2.sqrt(), z_t), s64, z_t, generator)
        return out if noise is None else out + noise


@dataclass(frozen=True)
class AncestralGammaStep:
    """Ancestral step with interpolated variance (Salimans & Ho 2022, eqs. (4)-(5); Chapter 3 §3):

        z_s = mu-tilde_{s|t}(z_t, x-hat) + sqrt((sigma-tilde^2_{s|t})^(1-gamma) (sigma^2_{t|s})^gamma) noise.

    gamma=0: posterior variance (DDPMStep("posterior")); gamma=1: sigma^2_{t|s} (DDPMStep("beta")).
    gamma must lie in [0, 1]. No noise at s = 0. At gamma = 0 the forward variance sigma^2_{t|s} is not
    computed (it would be raised to the power 0).
    """

    gamma: float

    def __post_init__(self):
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must lie in [0, 1] (0 = posterior variance, 1 = sigma^2_{{t|s}}); "
                             f"got {self.gamma}.")

    def __call__(self, z_t, t, s, x_hat, eps_hat, schedule, generator=None):
        return _ancestral_step(self.gamma, z_t, t, s, x_hat, schedule, generator)


def probability_flow_velocity(schedule: NoiseSchedule, t, x_hat: torch.Tensor, eps_hat: torch.Tensor, *,
                              side: str = "left") -> torch.Tensor:
    """dz/dt of the probability-flow ODE (Salimans & Ho 2022, eqs. (6)-(9); Chapter 3 §4) at time t.

    With lambda' = d lambda/dt: f = d log alpha/dt = sigma^2 lambda' / 2 (eq. (8)),
    g^2 = d sigma^2/dt - 2 f sigma^2 = -sigma^2 lambda' (eq. (9)), score = -eps-hat / sigma
    = (alpha x-hat - z) / sigma^2 (eq. (7)), so eq. (6) reads dz/dt = lambda'/2 (sigma^2 z - sigma eps-hat).
    With z = alpha x-hat + sigma eps-hat this equals

        dz/dt = alpha'_t x-hat + sigma'_t eps-hat,
        alpha' = sigma^2 lambda' alpha / 2,  sigma' = -alpha^2 lambda' sigma / 2,

    the form computed here (no cancellation where alpha -> 0 and lambda' -> -inf), with alpha' and
    sigma' from ``schedule.alpha_sigma_dt``.
    side: where lambda_t has a kink (every grid point i/T of a DiscreteSchedule) the one-sided
    derivative from below t ("left") or from above ("right"); see ``DiscreteSchedule.dlogsnr_dt``.
    """
    d_alpha, d_sigma = schedule.alpha_sigma_dt(_scalar(t), side=side)
    return (scale_for(d_alpha, x_hat) * x_hat).add_(scale_for(d_sigma, x_hat) * eps_hat)


@dataclass(frozen=True)
class EulerStep:
    """Explicit Euler in t on the probability-flow ODE (Salimans & Ho 2022, eq. (6); Chapter 3 §6):
    z_s = z_t + (s - t) dz/dt(z_t, t) (see :func:`probability_flow_velocity`). Order 1, 1 NFE."""

    def __call__(self, z_t, t, s, x_hat, eps_hat, schedule, generator=None):
        return z_t + (float(s) - float(t)) * probability_flow_velocity(schedule, t, x_hat, eps_hat)


@dataclass(frozen=True)
class HeunStep:
    """Heun's 2nd-order method in t on the probability-flow ODE (Karras et al. 2022, Algorithm 1;
    Chapter 3 §6):

        d_t = dz/dt(z_t, t),  z' = z_t + (s - t) d_t,  z_s = z_t + (s - t) (d_t + dz/dt(z', s)) / 2,

    the second slope from one extra network call at (z', s). Where s == 0 or sigma_s == 0 the
    ODE is singular and the step is the Euler step z' (as in Karras et al.). 2 NFE per step.
    Both slopes are those of the ODE on the step's own interval [s, t]: on a DiscreteSchedule,
    lambda_t has a kink at every grid point, and the slope at s is the one from above s (the
    cell inside the step), not from the next cell below. Taking the cell below s, as a plain
    evaluation at a grid point does, shifts the ODE's coefficients by half a cell and leaves a
    global error of order 1/T that no number of steps removes (Heun stalled near 5e-3 at T = 1000).
    """

    needs_denoise = True

    def __call__(self, z_t, t, s, x_hat, eps_hat, schedule, generator=None, *, denoise=None):
        h = float(s) - float(t)
        # 1. the slope at t, on the step's side of t (Algorithm 1 line 4)
        d_t = probability_flow_velocity(schedule, t, x_hat, eps_hat, side="left")
        # 2. the Euler predictor z' (line 5)
        z_euler = z_t + h * d_t
        # 3. at sigma_s = 0 the ODE is singular: keep the Euler step (line 6)
        if float(s) == 0 or float(schedule.sigma(_scalar(s))) == 0:
            return z_euler
        if denoise is None:
            raise ValueError("HeunStep needs the loop's denoise= function (use it through samplers.sample).")
        # 4. the second slope at (z', s), again on the step's side of s (lines 7-8)
        x_2, eps_2 = denoise(z_euler, s)
        d_s = probability_flow_velocity(schedule, s, x_2, eps_2, side="right")
        # 5. the trapezoid: the mean of the two slopes (line 8), z_t + h (d_t + d_s) / 2 (in place, same bits)
        return z_t + d_t.add_(d_s).mul_(h * 0.5)


def reverse_sde_drift(schedule: NoiseSchedule, t, x_hat: torch.Tensor, eps_hat: torch.Tensor, *,
                      side: str = "left") -> torch.Tensor:
    """The drift of the reverse-time SDE (Song et al. 2021, eq. (6); Chapter 3 §5) at time t,

        dz = [f z - g^2 score] dt + g dw-bar,  score = -eps-hat / sigma (Salimans & Ho 2022, eq. (7)),

    with f, g^2 as in :func:`probability_flow_velocity`. The probability-flow ODE (Song et al. eq. (13))
    has the same f z and half the score term, so the drift is the ODE's velocity plus the other half:
    f z - g^2 score = dz/dt_ODE + (g^2 / 2) eps-hat / sigma, and with g^2 = -sigma^2 lambda'

        drift = alpha'_t x-hat + sigma'_t eps-hat - (sigma_t lambda'_t / 2) eps-hat.
    """
    velocity = probability_flow_velocity(schedule, t, x_hat, eps_hat, side=side)
    sigma = schedule.sigma(_scalar(t))
    dlam = schedule.dlogsnr_dt(_scalar(t), side=side)
    return velocity.sub_(scale_for(0.5 * sigma * dlam, eps_hat) * eps_hat)


def diffusion_coefficient_sq(schedule: NoiseSchedule, t, *, side: str = "left") -> torch.Tensor:
    """g(t)^2 = d sigma^2/dt - 2 f sigma^2 = -sigma_t^2 lambda'_t (Salimans & Ho 2022, eq. (9); Song et al.
    2021, eq. (5)): the forward SDE's noise rate, and the reverse SDE's (Chapter 3 §5)."""
    return -schedule.sigma(_scalar(t)) ** 2 * schedule.dlogsnr_dt(_scalar(t), side=side)


@dataclass(frozen=True)
class ReverseSDEStep:
    """Euler-Maruyama on the reverse-time SDE (Song et al. 2021, eq. (6); Chapter 3 §5): with h = s - t < 0,

        z_s = z_t + h drift(z_t, t) + g(t) sqrt(-h) xi,  xi ~ N(0, I)

    (:func:`reverse_sde_drift`, :func:`diffusion_coefficient_sq`). A step to sigma_s = 0 returns
    alpha_s x-hat with no noise (the last "denoising" step of Song et al.'s code). 1 NFE per step.
    To first order in h it is the ancestral step :class:`DDPMStep`: both have mean and variance that agree
    up to O(h^2) (tests/test_samplers_sde.py), so the ancestral sampler converges to this SDE."""

    def __call__(self, z_t, t, s, x_hat, eps_hat, schedule, generator=None):
        alpha_s, sigma_s = schedule.alpha_sigma(_scalar(s))
        if float(sigma_s) == 0:
            return expand_like(alpha_s, z_t) * x_hat
        h = float(s) - float(t)
        z_s = z_t + h * reverse_sde_drift(schedule, t, x_hat, eps_hat)
        noise = _noise(scale_for((diffusion_coefficient_sq(schedule, t) * -h).sqrt(), z_t), _scalar(s), z_t,
                       generator)
        return z_s if noise is None else z_s + noise            # no noise at s = 0


@dataclass(frozen=True)
class PredictorCorrectorStep:
    """Predictor-corrector sampling (Song et al. 2021, Algorithm 1, with the Langevin corrector of
    Algorithms 4-5; Chapter 3 §5): the predictor's step from t to s, then `corrector_steps` Langevin steps
    at s, each with one network call:

        score = -eps-hat(z, s) / sigma_s,  epsilon = 2 alpha_i (snr ||xi|| / ||score||)^2,
        z <- z + epsilon score + sqrt(2 epsilon) xi,

    the norms averaged over the batch, as in Song et al.'s code (per example, a sample near a mode, where
    the score is near 0, would take a huge step in low dimension), and alpha_i, Algorithm 5's 1 - beta_i
    (the VP form; alpha_i = alpha_t^2 / alpha_s^2 on a respaced grid). No correction at sigma_s = 0.
    1 + corrector_steps NFE per step."""

    predictor: object = ReverseSDEStep()
    corrector_steps: int = 1
    snr: float = 0.16

    needs_denoise = True

    def __post_init__(self):
        if isinstance(self.corrector_steps, bool) or not isinstance(self.corrector_steps, int) \
                or self.corrector_steps < 0:
            raise ValueError(f"corrector_steps must be an integer >= 0; got {self.corrector_steps!r}.")
        if not self.snr > 0:
            raise ValueError(f"snr must be > 0 (Song et al. use 0.16 on CIFAR-10); got {self.snr!r}.")
        if needs_denoise(self.predictor) or init_state(self.predictor) is not None:
            raise ValueError("the predictor must be a one-call step rule without extra calls or state "
                             "(e.g. ReverseSDEStep(), DDPMStep(), DDIMStep()).")

    def __call__(self, z_t, t, s, x_hat, eps_hat, schedule, generator=None, *, denoise=None):
        z = self.predictor(z_t, t, s, x_hat, eps_hat, schedule, generator)
        alpha_s, sigma_s = schedule.alpha_sigma(_scalar(s))
        if float(sigma_s) == 0 or self.corrector_steps == 0:
            return z
        if denoise is None:
            raise ValueError("PredictorCorrectorStep needs the loop's denoise= function "
                             "(use it through samplers.sample).")
        alpha_i = float((schedule.alpha(_scalar(t)) / alpha_s) ** 2)       # 1 - beta of the step, <= 1
        for _ in range(self.corrector_steps):
            _, eps = denoise(z, s)
            score = eps / -expand_like(sigma_s, z)
            xi = randn_like(z, generator)
            ratio = xi.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean().clamp(min=1e-12)
            epsilon = 2 * alpha_i * (self.snr * ratio) ** 2
            z = z + epsilon * score + (2 * epsilon) ** 0.5 * xi
        return z


@dataclass(frozen=True)
class DPMSolverPP2MStep:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2; Chapter 3 §6), multistep in the half log-SNR
    l_t = lambda_t / 2 = log(alpha_t / sigma_t). With h = l_s - l_t:

        z_s = (sigma_s / sigma_t) z_t - alpha_s (e^{-h} - 1) D,
        D = (1 + 1/(2r)) x-hat_t - 1/(2r) x-hat_prev,  r = (l_t - l_prev) / h,

    where x-hat_prev is the previous step's x-hat at time t_prev. The first step (and any step
    whose t is not the previous step's s) uses D = x-hat_t, i.e. DDIM (eq. (10)/(11) of
    Salimans & Ho 2022). A step to sigma_s = 0 (s = 0 on a discrete schedule) is first order
    too: z_s = alpha_s x-hat_t. So is any step to s = 0, as in the official code's ``lower_order_final``:
    on a schedule with a clipped log-SNR, sigma_0 > 0 but l jumps to its maximum in the last step, so
    r = h_prev / h << 1 and the 2M combination would multiply x-hat_t by 1 + 1/(2r) (a 16-step run on the
    clipped cosine schedule lost half the 25 Gaussians' modes that way). 1 NFE per step.

    The history (x-hat_prev, l_prev, t_prev) lives in the run's ``state`` (``init_state()``; the loop
    makes one per run), not on this object: one DPMSolverPP2MStep can serve interleaved runs. Called
    without a state, every step is first order.
    """

    def init_state(self) -> dict:
        """A fresh run: no previous step."""
        return {"prev": None}

    def __call__(self, z_t, t, s, x_hat, eps_hat, schedule, generator=None, *, state=None):
        # 1. alpha and sigma at both times, l_t = lambda_t / 2
        alpha_t, sigma_t = schedule.alpha_sigma(_scalar(t))
        alpha_s, sigma_s = schedule.alpha_sigma(_scalar(s))
        l_t = 0.5 * schedule.logsnr(_scalar(t))
        # 2. the previous step of this run, and this step remembered for the next (Algorithm 2, "buffer")
        prev = None if state is None else state.get("prev")
        if state is not None:
            state["prev"] = (x_hat, l_t, float(s))
        # 3. to sigma_s = 0 the step is z_s = alpha_s x-hat (first order)
        if float(sigma_s) == 0:
            return expand_like(alpha_s, z_t) * x_hat
        # 4. h_i = l_s - l_t
        h = 0.5 * schedule.logsnr(_scalar(s)) - l_t
        # 5. D_i: x-hat_t on a first step, else the 2M combination with r_i = h_{i-1} / h_i
        d = x_hat
        if prev is not None and prev[2] == float(t) and float(s) != 0:   # first order into the data
            x_prev, l_prev, _ = prev
            r = (l_t - l_prev) / h
            d = expand_like(1 + 0.5 / r, z_t) * x_hat - expand_like(0.5 / r, z_t) * x_prev
        # 6. z_s = (sigma_s / sigma_t) z_t - alpha_s (e^{-h_i} - 1) D_i
        return expand_like(sigma_s / sigma_t, z_t) * z_t - expand_like(alpha_s * torch.expm1(-h), z_t) * d


@dataclass
class SampleResult:
    """Output of :func:`sample`: the final samples, the number of network evaluations, the wall time
    of the loop in seconds, and (with return_trajectory=True) z at every time in `timesteps` and
    x-hat at every model call, stored on the CPU."""

    x: torch.Tensor
    nfe: int
    trajectory: list[torch.Tensor] | None = None
    x_hats: list[torch.Tensor] | None = None
    seconds: float = 0.0


def _check_timesteps(timesteps, increasing: bool = False) -> list[float]:
    ts = torch.as_tensor(timesteps, dtype=torch.float64).detach().cpu()
    if ts.ndim != 1 or len(ts) < 2:
        raise ValueError(f"timesteps must be a 1-D sequence of at least 2 times, e.g. ddpm_timesteps(T); "
                         f"got shape {tuple(ts.shape)}.")
    if not bool(((ts >= 0) & (ts <= 1)).all()):
        raise ValueError("timesteps must lie in [0, 1] (1 = noise, 0 = data).")
    if increasing:
        if not bool((ts[1:] > ts[:-1]).all()):
            raise ValueError("with increasing=True timesteps must be strictly increasing (from data "
                             "towards noise), e.g. [0.0, 0.5, 1.0].")
    elif not bool((ts[1:] < ts[:-1]).all()):
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
           device: torch.device | str | None = None, increasing: bool = False) -> SampleResult:
    """Run the reverse process from z at timesteps[0] down to timesteps[-1] with one step rule
    (Ho et al. 2020, Algorithm 2, with the step rule in place of line 4; Chapter 1 §6).

    model(z, t, **cond) -> output of type `prediction` ("eps", "x" or "v"), t a float tensor (B,)
    (``contracts.Model``); step: a ``contracts.StepRule``, with its optional parts.
    z starts as N(0, I) of `shape` (on `device`, default the model's) or as the given `z`.
    Noise comes from `generator` (drawn on its device, see diffusion.randn_like).
    clip_x clips x-hat to [-clip_x, clip_x] (eps-hat is then recomputed from the clipped x-hat).
    Runs under torch.no_grad() (a model may still switch gradients on inside, e.g. for classifier
    guidance). NFE counts network evaluations: every model call, including a step rule's extra ones,
    costs the model's ``nfe_per_call`` (``contracts.network_evaluations``; default 1).
    increasing=True runs the other way, from data to noise (timesteps strictly increasing), for an
    ``invertible`` step rule such as DDIMStep(eta=0); see :func:`ddim_invert`.
    """
    ts = _check_timesteps(timesteps, increasing)
    if increasing and not is_invertible(step):
        raise ValueError("increasing=True (data -> noise) needs an invertible, deterministic step rule "
                         "such as DDIMStep(eta=0).")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}.")
    cost = network_evaluations(model)
    cond = cond or {}
    # the schedule's memoized copy: each time of the grid is evaluated once (bit for bit the same numbers)
    grid = schedule.memoized() if hasattr(schedule, "memoized") else schedule
    nfe = 0

    def counted_denoise(z_t: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One model call at (z_t, t) -> (x_hat, eps_hat), counted in network evaluations."""
        nonlocal nfe
        nfe += cost
        return denoise(model, grid, z_t, _scalar(t), prediction=prediction, cond=cond, clip_x=clip_x)

    extra = {"denoise": counted_denoise} if needs_denoise(step) else {}
    start = time.perf_counter()
    state = init_state(step)  # this run's state (a multistep history), reset for every run
    if state is not None:
        extra["state"] = state
    with torch.no_grad():
        z = _initial_z(model, shape, z, generator, device)
        trajectory = [z.detach().cpu()] if return_trajectory else None
        x_hats = [] if return_trajectory else None
        pairs = list(zip(ts[:-1], ts[1:], strict=True))  # (t, s): from t down to s (up if increasing)
        for t, s in tqdm(pairs, desc="sampling", disable=not progress, leave=False):
            x_hat, eps_hat = counted_denoise(z, t)
            z = step(z, t, s, x_hat, eps_hat, grid, generator, **extra)
            if return_trajectory:
                trajectory.append(z.detach().cpu())
                x_hats.append(x_hat.detach().cpu())
    if z.is_cuda:
        torch.cuda.synchronize(z.device)
    seconds = time.perf_counter() - start
    return SampleResult(x=z, nfe=nfe, trajectory=trajectory, x_hats=x_hats, seconds=seconds)


def ddim_invert(model: Callable, schedule: NoiseSchedule, x: torch.Tensor,
                timesteps: Sequence[float] | torch.Tensor, prediction: str = "eps", cond: dict | None = None,
                progress: bool = False) -> tuple[torch.Tensor, int]:
    """DDIM inversion: run deterministic DDIM (Song et al. 2021, eq. (12) with eta=0, i.e. the
    probability-flow ODE of eq. (14) discretised) from data x up to the largest time.

    `timesteps` is the sampling grid in either order (e.g. respace(T, steps, "trailing")); the
    loop walks it upwards, z_s = alpha_s x-hat(z_t) + sigma_s eps-hat(z_t) for t < s, with the
    network called at the current, less noisy point. Returns (z at the largest time, NFE).
    Sampling with DDIMStep(0) on the same grid from that z reconstructs x up to the
    discretisation error, which falls as the number of steps grows.
    An x-prediction network cannot be called at sigma_t = 0 (eps-hat = (z - alpha x-hat)/0):
    start the grid at its first positive time then.
    """
    ts = torch.as_tensor(timesteps, dtype=torch.float64).detach().cpu().reshape(-1)
    if len(ts) >= 2 and bool(ts[0] > ts[-1]):
        ts = ts.flip(0)
    if prediction == "x" and len(ts) >= 1 and float(schedule.sigma(ts[:1])[0]) == 0:
        raise ValueError("ddim_invert with an x-prediction model cannot start where sigma_t = 0 (t = 0 on a "
                         "discrete schedule); drop t = 0 from the grid or use an eps / v model.")
    result = sample(model, schedule, ts, DDIMStep(0.0), z=x, prediction=prediction, cond=cond,
                    progress=progress, increasing=True)
    return result.x, result.nfe


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation of noises (Shoemake 1985; used for DDIM latents, Song et al. 2021 Sec. 5.3):

        slerp = sin((1 - alpha) theta) / sin(theta) z0 + sin(alpha theta) / sin(theta) z1,
        theta = arccos(<z0, z1> / (|z0| |z1|)),

    per example (all dims but the first; a 1-D input is one vector). alpha in [0, 1] gives z0 at 0
    and z1 at 1; for |z0| = |z1| the norm is preserved. Nearly parallel vectors fall back to lerp.
    """
    if z0.shape != z1.shape:
        raise ValueError(f"slerp needs z0 and z1 of the same shape; got {tuple(z0.shape)} and "
                         f"{tuple(z1.shape)}.")
    alpha = float(alpha)
    if not 0 <= alpha <= 1:
        raise ValueError(f"slerp's alpha must lie in [0, 1]; got {alpha}.")
    a = z0.reshape(len(z0), -1).to(torch.float64) if z0.ndim > 1 else z0.reshape(1, -1).to(torch.float64)
    b = z1.reshape(a.shape).to(torch.float64)
    cos = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp(-1, 1)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    small = sin.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(sin), sin)
    w0 = torch.where(small, torch.full_like(sin, 1 - alpha), torch.sin((1 - alpha) * theta) / safe)
    w1 = torch.where(small, torch.full_like(sin, alpha), torch.sin(alpha * theta) / safe)
    out = w0[:, None] * a + w1[:, None] * b
    return out.reshape(z0.shape).to(z0.dtype)
