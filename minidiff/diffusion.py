"""The forward process, its posterior, the three predictions (eps, x, v) and the training loss.

Notation: z_t = alpha_t x + sigma_t eps (VP, alpha_t^2 + sigma_t^2 = 1), lambda_t = log-SNR,
v = alpha_t eps - sigma_t x. In DDPM's symbols alpha-bar_t = alpha_t^2 and x_t = z_t.
Coefficients are computed in float64 and applied in the dtype of the data.
"""

from __future__ import annotations

import torch

from .schedules import DiscreteSchedule, NoiseSchedule

__all__ = [
    "NonFiniteLossError",
    "expand_like",
    "randn_like",
    "PREDICTIONS",
    "WEIGHTINGS",
    "q_sample",
    "q_step",
    "transition",
    "posterior",
    "predict_x",
    "predict_eps",
    "predict_v",
    "loss_weight",
    "training_loss",
]

PREDICTIONS = ("eps", "x", "v")
WEIGHTINGS = ("eps", "snr", "x", "truncated_snr", "snr+1", "sqrt_snr")


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite."""


# ----------------------------------------------------------------------------- helpers


def _times(t, z: torch.Tensor, name: str = "t") -> torch.Tensor:
    """t as a float64 tensor: 0-d for a scalar (shared by the batch), else checked to be (B,)."""
    device = z.device if z.device.type != "mps" else torch.device("cpu")  # MPS has no float64
    t = torch.as_tensor(t, dtype=torch.float64, device=device)  # python floats keep full precision
    if t.ndim != 0 and t.shape != (z.shape[0],):
        raise ValueError(f"{name} must be a scalar or have shape (B,) = ({z.shape[0]},) to match the "
                         f"batch of shape {tuple(z.shape)}; got shape {tuple(t.shape)}.")
    return t


def expand_like(coef, z: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) coefficient to (B, 1, ..., 1) in z's dtype and device, to multiply z per example.

    A 0-d coefficient, or one that already has z's number of dimensions, is only cast.
    """
    coef = torch.as_tensor(coef).to(dtype=z.dtype, device=z.device)
    if coef.ndim == 1 and z.ndim > 1:
        coef = coef.reshape(-1, *([1] * (z.ndim - 1)))
    return coef


def randn_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like x (dtype and device of x).

    With a generator the noise is drawn on the generator's device and then moved, so one CPU
    generator gives the same numbers whatever device the model runs on.
    """
    device = x.device if generator is None else generator.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes must match; got {tuple(a.shape)} and {tuple(b.shape)}.")


# ----------------------------------------------------------------------------- forward process


def q_sample(schedule: NoiseSchedule, x: torch.Tensor, t, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw z_t ~ q(z_t | x) = N(alpha_t x, sigma_t^2 I) (Ho et al. 2020, eq. (4)).

    Returns (z_t, noise) with z_t = alpha_t x + sigma_t noise. `t` is a scalar or (B,).
    """
    alpha, sigma = schedule.alpha_sigma(_times(t, x))
    if noise is None:
        noise = randn_like(x, generator)
    _check_same_shape(noise, x, "q_sample(noise, x)")
    return expand_like(alpha, x) * x + expand_like(sigma, x) * noise, noise


def transition(schedule: NoiseSchedule, s, t) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients of the one-step kernel q(z_t | z_s) = N(alpha_{t|s} z_s, sigma_{t|s}^2 I), s < t.

    alpha_{t|s} = alpha_t / alpha_s and sigma_{t|s}^2 = (1 - e^{lambda_t - lambda_s}) sigma_t^2
    (Salimans & Ho 2022, Sec. 2); on DDPM's grid this is eq. (2): sqrt(1 - beta_t) and beta_t.
    Returns float64 tensors shaped like the broadcast of s and t.
    """
    s, t = torch.as_tensor(s, dtype=torch.float64), torch.as_tensor(t, dtype=torch.float64)
    if not bool((s < t).all()):
        raise ValueError("need s < t (s is the less noisy time); got s >= t somewhere.")
    alpha_s, _ = schedule.alpha_sigma(s)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    one_minus_ratio = -torch.expm1(schedule.logsnr(t) - schedule.logsnr(s))  # 1 - e^{lambda_t - lambda_s}
    return alpha_t / alpha_s, one_minus_ratio * sigma_t**2


def q_step(schedule: NoiseSchedule, z_s: torch.Tensor, s, t,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw z_t ~ q(z_t | z_s) for s < t (the one-step kernel; Ho et al. 2020, eq. (2) on the grid)."""
    alpha_ts, var_ts = transition(schedule, _times(s, z_s, "s"), _times(t, z_s))
    noise = randn_like(z_s, generator)
    return expand_like(alpha_ts, z_s) * z_s + expand_like(var_ts.sqrt(), z_s) * noise


def posterior(schedule: NoiseSchedule, z_t: torch.Tensor, x: torch.Tensor, t, s
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(z_s | z_t, x) for 0 <= s < t (Salimans & Ho 2022, eqs. (1)-(3)).

        mean = e^{lambda_t - lambda_s} (alpha_s / alpha_t) z_t + (1 - e^{lambda_t - lambda_s}) alpha_s x
        var  = (1 - e^{lambda_t - lambda_s}) sigma_s^2

    On DDPM's grid (s = (i-1)/T, t = i/T) these are mu-tilde and beta-tilde of Ho et al. 2020,
    eqs. (6)-(7). `var` has shape (B, 1, ..., 1) so it broadcasts against z.
    """
    _check_same_shape(z_t, x, "posterior(z_t, x)")
    s, t = _times(s, z_t, "s"), _times(t, z_t)
    if not bool((s < t).all()):
        raise ValueError("posterior needs s < t (z_s is less noisy than z_t); got s >= t somewhere.")
    alpha_s, sigma_s = schedule.alpha_sigma(s)
    alpha_t, _ = schedule.alpha_sigma(t)
    dlam = schedule.logsnr(t) - schedule.logsnr(s)  # lambda_t - lambda_s <= 0 (-inf when s = 0, discrete)
    ratio, one_minus_ratio = dlam.exp(), -torch.expm1(dlam)  # e^{lambda_t - lambda_s}, 1 - e^{...}
    coef_z = ratio * alpha_s / alpha_t
    coef_x = one_minus_ratio * alpha_s
    var = one_minus_ratio * sigma_s**2
    mean = expand_like(coef_z, z_t) * z_t + expand_like(coef_x, z_t) * x
    return mean, expand_like(var, z_t)


# ----------------------------------------------------------------------------- predictions


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}.")


def predict_x(pred: torch.Tensor, prediction: str, z_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The data estimate x-hat from a network output of type `prediction`.

    eps: x = (z - sigma eps) / alpha;  v: x = alpha z - sigma v;  x: unchanged.
    alpha, sigma: scalars, (B,) or broadcastable to z.
    """
    _check_prediction(prediction)
    _check_same_shape(pred, z_t, "prediction and z_t")
    alpha, sigma = expand_like(alpha, z_t), expand_like(sigma, z_t)
    if prediction == "x":
        return pred
    if prediction == "eps":
        return (z_t - sigma * pred) / alpha
    return alpha * z_t - sigma * pred


def predict_eps(pred: torch.Tensor, prediction: str, z_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The noise estimate eps-hat from a network output of type `prediction`.

    x: eps = (z - alpha x) / sigma;  v: eps = sigma z + alpha v;  eps: unchanged.
    """
    _check_prediction(prediction)
    _check_same_shape(pred, z_t, "prediction and z_t")
    alpha, sigma = expand_like(alpha, z_t), expand_like(sigma, z_t)
    if prediction == "eps":
        return pred
    if prediction == "x":
        return (z_t - alpha * pred) / sigma
    return sigma * z_t + alpha * pred


def predict_v(pred: torch.Tensor, prediction: str, z_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The velocity estimate v-hat = alpha eps-hat - sigma x-hat (Salimans & Ho 2022, Sec. 4)."""
    if prediction == "v":
        _check_same_shape(pred, z_t, "prediction and z_t")
        return pred
    x_hat = predict_x(pred, prediction, z_t, alpha, sigma)
    eps_hat = predict_eps(pred, prediction, z_t, alpha, sigma)
    return expand_like(alpha, z_t) * eps_hat - expand_like(sigma, z_t) * x_hat


# ----------------------------------------------------------------------------- loss


def _check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}.")


def loss_weight(weighting: str, logsnr: torch.Tensor) -> torch.Tensor:
    """Weight w(lambda) such that the loss is w(lambda) ||x-hat - x||^2 (Salimans & Ho 2022, Sec. 4).

    "eps"           SNR           ||eps-hat - eps||^2 = SNR ||x-hat - x||^2 (DDPM's L_simple, eq. (14))
    "snr"           SNR           the same weight, named as in Salimans & Ho
    "x"             1             plain x-MSE
    "truncated_snr" max(SNR, 1)   = max(x-MSE, eps-MSE)
    "snr+1"         SNR + 1       = ||v-hat - v||^2
    "sqrt_snr"      sqrt(SNR)     PDM (Luhman & Luhman 2023, eq. (3): gamma_t = sqrt(abar / (1 - abar)))
    """
    _check_weighting(weighting)
    lam = torch.as_tensor(logsnr)
    snr = lam.to(torch.float64).exp()
    if weighting in ("eps", "snr"):
        w = snr
    elif weighting == "x":
        w = torch.ones_like(snr)
    elif weighting == "truncated_snr":
        w = snr.clamp(min=1.0)
    elif weighting == "snr+1":
        w = snr + 1
    else:
        w = snr.sqrt()
    return w.to(lam.dtype if lam.is_floating_point() else torch.get_default_dtype())


def _sample_times(schedule: NoiseSchedule, batch: int, x: torch.Tensor,
                  generator: torch.Generator | None) -> torch.Tensor:
    """t ~ U{1/T, ..., 1} on a discrete schedule, else t ~ U(0, 1]."""
    device = x.device if generator is None else generator.device
    if isinstance(schedule, DiscreteSchedule):
        i = torch.randint(1, schedule.T + 1, (batch,), generator=generator, device=device)
        return (i.to(x.dtype) / schedule.T).to(x.device)
    return (1 - torch.rand(batch, generator=generator, dtype=x.dtype, device=device)).to(x.device)


def training_loss(model, schedule: NoiseSchedule, x: torch.Tensor, prediction: str = "eps",
                  weighting: str = "eps", t=None, generator: torch.Generator | None = None,
                  cond: dict | None = None, reduction: str = "mean") -> torch.Tensor:
    """The denoising loss mean_b( w(lambda_t) * mean_pixels((x-hat - x)^2) ).

    t ~ U(0, 1] (or on the grid i/T of a DiscreteSchedule) unless given; z_t = q_sample(x, t);
    out = model(z_t, t, **cond) is read as a `prediction` and converted to x-hat. With
    prediction="eps" and weighting="eps" this is DDPM's L_simple, mean((eps-hat - eps)^2)
    (Ho et al. 2020, eq. (14); eq. (12) would add the weight beta_t^2 / (2 sigma_t^2 alpha_t (1-abar_t))).
    Random draws, in this order: t (if not given), then the noise, both from `generator`
    (drawn on the generator's device, see randn_like).
    reduction: "mean" (scalar) or "none" (per-example losses, shape (B,)).
    """
    _check_prediction(prediction)
    _check_weighting(weighting)
    if reduction not in ("mean", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; choose 'mean' or 'none'.")
    if t is None:
        t = _sample_times(schedule, x.shape[0], x, generator)
    else:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if not bool((t > 0).all()):
            raise ValueError("training times must lie in (0, 1]; at t=0 there is no noise to remove.")
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
    t64 = _times(t, x)
    z_t, _ = q_sample(schedule, x, t64, generator=generator)
    out = model(z_t, t, **(cond or {}))
    if out.shape != x.shape:
        raise ValueError(f"the model must return a tensor shaped like its input {tuple(x.shape)}; "
                         f"got {tuple(out.shape)}.")
    alpha, sigma = schedule.alpha_sigma(t64)
    x_hat = predict_x(out, prediction, z_t, alpha, sigma)
    per_example = (x_hat - x).pow(2).reshape(len(x), -1).mean(dim=1)  # mean over pixels
    loss = loss_weight(weighting, schedule.logsnr(t64)).to(x.dtype) * per_example
    if reduction == "mean":
        loss = loss.mean()
    if not bool(torch.isfinite(loss).all()):
        raise NonFiniteLossError(
            f"the training loss is not finite ({loss.detach().flatten()[:4].tolist()}). Lower the learning "
            "rate or clip gradients, check that the data is finite and scaled to [-1, 1], and check the "
            "model output for NaN. With x-prediction and the 'eps'/'snr' weighting the weight SNR grows "
            "without bound as t -> 0; try 'truncated_snr' or 'snr+1'."
        )
    return loss
