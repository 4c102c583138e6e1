"""The forward process, its posterior, the three predictions (eps, x, v) and the training loss.

Notation: z_t = alpha_t x + sigma_t eps (VP, alpha_t^2 + sigma_t^2 = 1), lambda_t = log-SNR,
v = alpha_t eps - sigma_t x. In DDPM's symbols alpha-bar_t = alpha_t^2 and x_t = z_t.
Coefficients are computed in float64 and applied in the dtype of the data.

The prediction is converted in one place: :func:`convert_prediction` turns a network output
into (x-hat, eps-hat) and :func:`prediction_from` goes back; :func:`denoise` calls a model
(``model(z, t, **cond)``, see ``minidiff.contracts``) and converts its output. The sampler,
the training loss, the distillation loss and the analytic denoisers all go through them.
Functions that take two times take them by keyword (``t=``, ``s=``), so that they cannot be
swapped silently.
"""

from __future__ import annotations

import math

import torch

from .schedules import GRID_TOL, DiscreteSchedule, NoiseSchedule

__all__ = [
    "NonFiniteLossError",
    "expand_like",
    "scale_for",
    "randn_like",
    "PREDICTIONS",
    "WEIGHTINGS",
    "q_sample",
    "q_step",
    "transition",
    "posterior",
    "posterior_coefficients",
    "convert_prediction",
    "prediction_from",
    "denoise",
    "predict_x",
    "predict_eps",
    "predict_v",
    "loss_weight",
    "null_conditioning",
    "check_mask",
    "precedes",
    "sample_training_times",
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
    if isinstance(coef, torch.Tensor) and coef.ndim == 0:
        return coef.to(dtype=z.dtype, device=z.device)
    coef = torch.as_tensor(coef).to(dtype=z.dtype, device=z.device)
    if coef.ndim == 1 and z.ndim > 1:
        coef = coef.reshape(-1, *([1] * (z.ndim - 1)))
    return coef


def scale_for(coef, z: torch.Tensor) -> torch.Tensor:
    """A coefficient ready to multiply z: a 0-d tensor as it is, anything else through :func:`expand_like`.

    A 0-d operand does not promote z's dtype: ``z * c`` casts c to z's dtype inside the product, bit for
    bit the same as ``z * expand_like(c, z)`` (a test checks) without a cast tensor per call. The sampler's
    hot path (:func:`convert_prediction`, ``samplers.probability_flow_velocity``) uses it.
    """
    if isinstance(coef, torch.Tensor) and coef.ndim == 0:
        return coef
    return expand_like(coef, z)


def randn_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like x (dtype and device of x).

    With a generator the noise is drawn on the generator's device and then moved, so one CPU
    generator gives the same numbers whatever device the model runs on.
    """
    device = x.device if generator is None else generator.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def precedes(s: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether s < t everywhere (s the less noisy time); a plain comparison for two scalars."""
    return float(s) < float(t) if s.ndim == 0 and t.ndim == 0 else bool((s < t).all())


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


def transition(schedule: NoiseSchedule, *, s, t) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients of the one-step kernel q(z_t | z_s) = N(alpha_{t|s} z_s, sigma_{t|s}^2 I), s < t.

    alpha_{t|s} = alpha_t / alpha_s and sigma_{t|s}^2 = (1 - e^{lambda_t - lambda_s}) sigma_t^2
    (Salimans & Ho 2022, Sec. 2; Chapter 3 §2); on DDPM's grid this is Ho et al. 2020, eq. (2):
    sqrt(1 - beta_t) and beta_t (Chapter 1 §1). s and t are keyword-only, so that they cannot be
    swapped. Returns float64 tensors shaped like the broadcast of s and t.
    """
    s, t = torch.as_tensor(s, dtype=torch.float64), torch.as_tensor(t, dtype=torch.float64)
    if not precedes(s, t):
        raise ValueError("transition needs s < t (s is the less noisy time); got s >= t somewhere. "
                         "Call it as transition(schedule, s=..., t=...).")
    alpha_s, _ = schedule.alpha_sigma(s)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    one_minus_ratio = -torch.expm1(schedule.logsnr(t) - schedule.logsnr(s))  # 1 - e^{lambda_t - lambda_s}
    return alpha_t / alpha_s, one_minus_ratio * sigma_t**2


def q_step(schedule: NoiseSchedule, z_s: torch.Tensor, *, s, t,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw z_t ~ q(z_t | z_s) for s < t (the one-step kernel :func:`transition`; Ho et al. 2020,
    eq. (2) on the grid; Chapter 1 §1). s and t are keyword-only; each is a scalar or (B,)."""
    alpha_ts, var_ts = transition(schedule, s=_times(s, z_s, "s"), t=_times(t, z_s))
    noise = randn_like(z_s, generator)
    return expand_like(alpha_ts, z_s) * z_s + expand_like(var_ts.sqrt(), z_s) * noise


def posterior_coefficients(schedule: NoiseSchedule, *, t, s
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_z, c_x, var) with q(z_s | z_t, x) = N(c_z z_t + c_x x, var I) for 0 <= s < t
    (Salimans & Ho 2022, eqs. (1)-(3); Chapter 3 §2), float64, shaped like the broadcast of t and s.

        c_z = e^{lambda_t - lambda_s} alpha_s / alpha_t,  c_x = (1 - e^{lambda_t - lambda_s}) alpha_s,
        var = (1 - e^{lambda_t - lambda_s}) sigma_s^2.

    On DDPM's grid these are eq. (7)'s coefficients and beta-tilde_t (Ho et al. 2020; Chapter 1 §2).
    t and s are keyword-only. Step rules use it on scalar times; :func:`posterior` applies it.
    """
    t, s = torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(s, dtype=torch.float64)
    if not precedes(s, t):
        raise ValueError("posterior needs s < t (z_s is less noisy than z_t); got s >= t somewhere. "
                         "Call it as posterior(schedule, z_t, x, t=..., s=...).")
    # 1. the schedule at both times
    alpha_s, sigma_s = schedule.alpha_sigma(s)
    alpha_t, _ = schedule.alpha_sigma(t)
    # 2. e^{lambda_t - lambda_s} <= 1 and 1 - e^{lambda_t - lambda_s} (-inf log-SNR gap at s = 0, discrete)
    dlam = schedule.logsnr(t) - schedule.logsnr(s)
    ratio, one_minus_ratio = dlam.exp(), -torch.expm1(dlam)
    # 3. the posterior mean's coefficients and its variance sigma-tilde^2_{s|t}, eq. (3)
    coef_z = ratio * alpha_s / alpha_t
    coef_x = one_minus_ratio * alpha_s
    var = one_minus_ratio * sigma_s**2
    return coef_z, coef_x, var


def posterior(schedule: NoiseSchedule, z_t: torch.Tensor, x: torch.Tensor, *, t, s
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(z_s | z_t, x) for 0 <= s < t (Salimans & Ho 2022, eqs. (1)-(3);
    Chapter 3 §2):

        mean = e^{lambda_t - lambda_s} (alpha_s / alpha_t) z_t + (1 - e^{lambda_t - lambda_s}) alpha_s x
        var  = (1 - e^{lambda_t - lambda_s}) sigma_s^2

    On DDPM's grid (s = (i-1)/T, t = i/T) these are mu-tilde and beta-tilde of Ho et al. 2020,
    eqs. (6)-(7) (Chapter 1 §2). t and s are keyword-only, each a scalar or (B,). `var` has shape
    (B, 1, ..., 1) (or is 0-d for scalar times) so it broadcasts against z.
    """
    _check_same_shape(z_t, x, "posterior(z_t, x)")
    coef_z, coef_x, var = posterior_coefficients(schedule, t=_times(t, z_t), s=_times(s, z_t, "s"))
    mean = expand_like(coef_z, z_t) * z_t + expand_like(coef_x, z_t) * x
    return mean, expand_like(var, z_t)


# ----------------------------------------------------------------------------- predictions


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}.")


def convert_prediction(output: torch.Tensor, prediction: str, *, z_t: torch.Tensor, alpha, sigma,
                       clip_x: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x-hat, eps-hat) from a network output of type `prediction` at z_t = alpha x + sigma eps: the one
    place where eps / x / v are converted (Chapter 1 §4; Salimans & Ho 2022, Sec. 4 and Appendix D):

        eps: x-hat = (z - sigma eps-hat) / alpha                 (Ho et al. 2020, eq. (4) solved for x)
        x:   eps-hat = (z - alpha x-hat) / sigma
        v:   x-hat = alpha z - sigma v-hat,  eps-hat = sigma z + alpha v-hat   (v = alpha eps - sigma x)

    alpha, sigma: scalars, (B,) or broadcastable to z (keyword-only, so they cannot be swapped).
    clip_x clips x-hat to [-clip_x, clip_x] and recomputes eps-hat from the clipped x-hat (Ho et al.
    2020's sampler clips x_0 to the data range). Coefficients are applied in z's dtype.
    """
    _check_prediction(prediction)
    _check_same_shape(output, z_t, "prediction and z_t")
    alpha, sigma = scale_for(alpha, z_t), scale_for(sigma, z_t)
    if prediction == "x":
        x_hat = output
    elif prediction == "eps":
        x_hat = (z_t - sigma * output) / alpha
        if clip_x is None:
            return x_hat, output
    else:
        x_hat = alpha * z_t - sigma * output
        if clip_x is None:
            return x_hat, sigma * z_t + alpha * output
    if clip_x is not None:
        x_hat = x_hat.clamp(-clip_x, clip_x)
    return x_hat, (z_t - alpha * x_hat) / sigma


def prediction_from(x_hat: torch.Tensor, eps_hat: torch.Tensor, prediction: str, *, alpha, sigma
                    ) -> torch.Tensor:
    """The network output of type `prediction` that :func:`convert_prediction` reads as (x-hat, eps-hat):
    x-hat, eps-hat or v-hat = alpha eps-hat - sigma x-hat (Salimans & Ho 2022, Sec. 4; Chapter 1 §4).
    Used by denoisers that know x-hat and eps-hat (``analytic.GaussianMixtureDenoiser``)."""
    _check_prediction(prediction)
    _check_same_shape(x_hat, eps_hat, "x_hat and eps_hat")
    if prediction == "x":
        return x_hat
    if prediction == "eps":
        return eps_hat
    return expand_like(alpha, x_hat) * eps_hat - expand_like(sigma, x_hat) * x_hat


def _model_times(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Times as a network sees them: (B,) in z's dtype and device."""
    if t.ndim == 0:
        return torch.full((z.shape[0],), float(t), dtype=z.dtype, device=z.device)
    return t.to(device=z.device, dtype=z.dtype)


def denoise(model, schedule: NoiseSchedule, z_t: torch.Tensor, t, *, prediction: str,
            cond: dict | None = None, clip_x: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One call of ``model(z_t, t, **cond)`` (the model contract, ``minidiff.contracts.Model``) read as a
    `prediction` and converted to (x-hat, eps-hat) with :func:`convert_prediction`: the network's
    eps_theta(x_t, t) of Ho et al. 2020, Algorithms 1-2, in any parameterisation (Chapter 1 §4).

    t: a scalar or (B,) times in [0, 1]; the model gets them as a (B,) tensor in z's dtype. Gradients
    flow as the caller's mode allows (the training losses differentiate through it). Raises ValueError
    if the output is not shaped like z_t.
    """
    t64 = torch.as_tensor(t, dtype=torch.float64)  # stays on its device: a float is read on the CPU
    if t64.ndim != 0 and t64.shape != (z_t.shape[0],):
        raise ValueError(f"t must be a scalar or have shape (B,) = ({z_t.shape[0]},) to match z of shape "
                         f"{tuple(z_t.shape)}; got shape {tuple(t64.shape)}.")
    out = model(z_t, _model_times(t64, z_t), **(cond or {}))
    if out.shape != z_t.shape:
        raise ValueError(f"the model must return a tensor shaped like its input z {tuple(z_t.shape)}; "
                         f"got {tuple(out.shape)}. Check its output channels / dim.")
    alpha, sigma = schedule.alpha_sigma(t64)
    return convert_prediction(out, prediction, z_t=z_t, alpha=alpha, sigma=sigma, clip_x=clip_x)


def predict_x(pred: torch.Tensor, prediction: str, z_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The data estimate x-hat from a network output of type `prediction` (:func:`convert_prediction`).

    eps: x = (z - sigma eps) / alpha;  v: x = alpha z - sigma v;  x: unchanged.
    alpha, sigma: scalars, (B,) or broadcastable to z.
    """
    return convert_prediction(pred, prediction, z_t=z_t, alpha=alpha, sigma=sigma)[0]


def predict_eps(pred: torch.Tensor, prediction: str, z_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The noise estimate eps-hat from a network output of type `prediction` (:func:`convert_prediction`).

    x: eps = (z - alpha x) / sigma;  v: eps = sigma z + alpha v;  eps: unchanged.
    """
    return convert_prediction(pred, prediction, z_t=z_t, alpha=alpha, sigma=sigma)[1]


def predict_v(pred: torch.Tensor, prediction: str, z_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The velocity estimate v-hat = alpha eps-hat - sigma x-hat (Salimans & Ho 2022, Sec. 4)."""
    if prediction == "v":
        _check_same_shape(pred, z_t, "prediction and z_t")
        return pred
    x_hat, eps_hat = convert_prediction(pred, prediction, z_t=z_t, alpha=alpha, sigma=sigma)
    return prediction_from(x_hat, eps_hat, "v", alpha=alpha, sigma=sigma)


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


def _check_t_range(t_range) -> tuple[float, float]:
    try:
        t_min, t_max = (float(v) for v in t_range)
    except (TypeError, ValueError):
        raise ValueError(f"t_range must be a pair (t_min, t_max) of times; got {t_range!r}.") from None
    if not 0 <= t_min < t_max <= 1:
        raise ValueError(f"t_range = (t_min, t_max) needs 0 <= t_min < t_max <= 1 (training times lie in "
                         f"(t_min, t_max]); got ({t_min}, {t_max}).")
    return t_min, t_max


def sample_training_times(schedule: NoiseSchedule, batch: int, x: torch.Tensor,
                          generator: torch.Generator | None, t_range: tuple[float, float] = (0.0, 1.0)
                          ) -> torch.Tensor:
    """t ~ U{i/T : t_min < i/T <= t_max} on a discrete schedule, else t ~ U(t_min, t_max]; (0, 1] by
    default (Ho et al. 2020, Algorithm 1 line 3; Chapter 1 §5)."""
    device = x.device if generator is None else generator.device
    t_min, t_max = t_range
    if isinstance(schedule, DiscreteSchedule):
        T = schedule.T
        lo, hi = math.floor(t_min * T + GRID_TOL) + 1, math.floor(t_max * T + GRID_TOL)
        if lo > hi:
            raise ValueError(f"t_range ({t_min}, {t_max}] holds no step i/T of this schedule (T={T}); widen "
                             f"it to include at least one multiple of 1/{T}.")
        i = torch.randint(lo, hi + 1, (batch,), generator=generator, device=device)
        return (i.to(x.dtype) / T).to(x.device)
    u = torch.rand(batch, generator=generator, dtype=x.dtype, device=device)
    return (t_max - (t_max - t_min) * u).to(x.device)  # (0, 1]: 1 - u


def check_mask(mask, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss mask as x's dtype, broadcast to x's shape, and its per-example sum (B,)."""
    mask = torch.as_tensor(mask, device=x.device)
    if mask.ndim != x.ndim or any(m not in (1, n) for m, n in zip(mask.shape, x.shape, strict=True)):
        raise ValueError(f"mask must have x's shape {tuple(x.shape)}, or broadcast to it with 1s (e.g. "
                         f"{(x.shape[0], 1, *x.shape[2:])} for every channel); got {tuple(mask.shape)}.")
    mask = mask.to(x.dtype).expand(x.shape)
    if not bool(torch.isfinite(mask).all()) or bool((mask < 0).any()):
        raise ValueError("mask must hold finite weights >= 0 (1 = pixel counts, 0 = pixel ignored).")
    weight = mask.reshape(len(x), -1).sum(dim=1)
    if not bool((weight > 0).all()):
        empty = torch.nonzero(weight <= 0).flatten().tolist()
        raise ValueError(f"the mask is zero everywhere for example(s) {empty[:8]}: they have no pixel to "
                         "learn from. Give every example at least one unmasked pixel, or leave them out of "
                         "the batch.")
    return mask, weight


def null_conditioning(cond: dict, *, where: torch.Tensor | None = None) -> dict:
    """The 'null' conditioning: the same keys with every value replaced by its 'absent' marker, for the
    unconditional prediction of classifier-free guidance and for conditioning dropout in training
    (Ho & Salimans 2021, Sec. 3.2 and Algorithm 1, p_uncond; Chapter 6).

    The markers are those of ``minidiff.nn.embeddings``: an integer tensor (``labels``) becomes -1, the
    null token of ``ClassEmbedding``; a float tensor (``w``, ``latent``, ``position``) becomes NaN, the
    row that ``ConditioningEmbedding`` leaves out; None stays None (absent already).
    where: optional bool (B,); then only those examples are dropped and the others keep their values
    (a 0-d value is first broadcast to (B,)). Returns a new dict; `cond` is not changed.
    """
    if not isinstance(cond, dict):
        raise ValueError(f"cond must be a dict of keyword conditionings (e.g. {{'labels': y}}); got "
                         f"{type(cond).__name__}.")
    if where is not None:
        where = torch.as_tensor(where)
        if where.dtype != torch.bool or where.ndim != 1:
            raise ValueError(f"where must be a bool tensor of shape (B,) (True = drop that example's "
                             f"conditioning); got dtype {where.dtype}, shape {tuple(where.shape)}.")
    out = {}
    for key, value in cond.items():
        if value is None:
            out[key] = None
            continue
        v = torch.as_tensor(value)
        if v.dtype == torch.bool or v.is_complex():
            raise ValueError(f"cannot build the null of conditioning {key!r} of dtype {v.dtype}: use integer "
                             "labels (null -1) or float values (null NaN).")
        null = float("nan") if v.is_floating_point() else -1
        if where is None:
            out[key] = torch.full_like(v, null)
            continue
        if v.ndim == 0:
            v = v.expand(len(where))
        if v.shape[0] != len(where):
            raise ValueError(f"conditioning {key!r} has batch size {v.shape[0]} but where has {len(where)}.")
        drop = where.to(v.device).reshape(-1, *([1] * (v.ndim - 1)))
        out[key] = torch.where(drop, torch.full_like(v, null), v)
    return out


def training_loss(model, schedule: NoiseSchedule, x: torch.Tensor, prediction: str = "eps",
                  weighting: str = "eps", t=None, generator: torch.Generator | None = None,
                  cond: dict | None = None, reduction: str = "mean", *,
                  t_range: tuple[float, float] | None = None, mask: torch.Tensor | None = None,
                  p_uncond: float = 0.0) -> torch.Tensor:
    """The denoising loss mean_b( w(lambda_t) * mean_pixels((x-hat - x)^2) ) (Chapter 1 §5).

    t ~ U(0, 1] (or on the grid i/T of a DiscreteSchedule) unless given; z_t = q_sample(x, t);
    ``model(z_t, t, **cond)`` is read as a `prediction` and converted to x-hat (:func:`denoise`). With
    prediction="eps" and weighting="eps" this is DDPM's L_simple, mean((eps-hat - eps)^2)
    (Ho et al. 2020, eq. (14); eq. (12) would add the weight beta_t^2 / (2 sigma_t^2 alpha_t (1-abar_t))).

    t_range=(t_min, t_max): draw t from (t_min, t_max] only (the steps i/T inside it on a discrete
    schedule), e.g. to train one network of a split model on its own SNR range (PDM; Chapter 7).
    mask: per-pixel weights shaped like x (or broadcasting with 1s); the pixel mean becomes the weighted
    mean sum(mask (x-hat - x)^2) / sum(mask) per example (Patch-DM's padded border; Chapter 8).
    p_uncond: the probability that an example's `cond` is replaced by :func:`null_conditioning`
    (classifier-free guidance training, Ho & Salimans 2021, Algorithm 1; Chapter 6).
    Random draws, in this order: t (if not given), the noise, then (with p_uncond > 0) the dropped
    examples, all from `generator` (drawn on the generator's device, see randn_like).
    reduction: "mean" (scalar) or "none" (per-example losses, shape (B,)).
    """
    _check_prediction(prediction)
    _check_weighting(weighting)
    if reduction not in ("mean", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; choose 'mean' or 'none'.")
    if not 0 <= p_uncond <= 1:
        raise ValueError(f"p_uncond must lie in [0, 1] (Ho & Salimans use 0.1-0.2); got {p_uncond}.")
    if p_uncond > 0 and not cond:
        raise ValueError("p_uncond > 0 drops the conditioning, but no cond was given; pass cond={...}.")
    if mask is not None:
        mask, mask_sum = check_mask(mask, x)
    if t is None:
        t_range = _check_t_range((0.0, 1.0) if t_range is None else t_range)
        t = sample_training_times(schedule, x.shape[0], x, generator, t_range)
    else:
        if t_range is not None:
            raise ValueError("give either t (fixed times) or t_range (a range to draw them from), not both.")
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if not bool((t > 0).all()):
            raise ValueError("training times must lie in (0, 1]; at t=0 there is no noise to remove.")
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
    t64 = _times(t, x)
    z_t, _ = q_sample(schedule, x, t64, generator=generator)
    cond = cond or {}
    if p_uncond > 0:
        device = x.device if generator is None else generator.device
        drop = torch.rand(x.shape[0], generator=generator, device=device) < p_uncond
        cond = null_conditioning(cond, where=drop.to(x.device))
    x_hat, _ = denoise(model, schedule, z_t, t64, prediction=prediction, cond=cond)
    if mask is None:
        per_example = (x_hat - x).pow(2).reshape(len(x), -1).mean(dim=1)  # mean over pixels
    else:
        per_example = (mask * (x_hat - x).pow(2)).reshape(len(x), -1).sum(dim=1) / mask_sum
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
