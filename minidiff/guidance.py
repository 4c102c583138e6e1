"""Guidance (Chapter 6): classifier guidance, classifier-free guidance and guided distillation.

Bayes' rule on scores (Song et al. 2021b, Sec. 5; Dhariwal & Nichol 2021, Sec. 4.1): for a class y,

    grad log p_t(z | y) = grad log p_t(z) + grad log p_t(y | z),

and with the score grad log p_t(z) = -eps(z, t) / sigma_t this is an eps-prediction,

    eps(z | y) = eps(z) - sigma_t grad log p_t(y | z).

* Classifier guidance puts a scale s on the classifier's term (Dhariwal & Nichol 2021, Algorithm 2):
  eps_s = eps - s sigma_t grad log p_phi(y | z_t) (:class:`ClassifierGuidance`, a model wrapper for
  DDIM and the ODE solvers), or shifts the ancestral step's mean, mu + s Sigma grad log p_phi(y | z_t)
  (Algorithm 1; :class:`ClassifierGuidedAncestralStep`). s > 1 samples from p(z | y) p(y | z)^(s-1),
  a tempered classifier that sharpens the class.
* Classifier-free guidance (Ho & Salimans 2022, eq. (6)) uses the model's own implicit classifier
  p(y | z) ∝ p(z | y) / p(z): eps_w = (1 + w) eps(z, y) - w eps(z, null), which is classifier
  guidance at scale 1 + w (:class:`ClassifierFreeGuidance`, 2 network evaluations per call).
  w = 0 is the plain conditional model; diffusers' ``guidance_scale`` is 1 + w
  (:func:`convert_guidance_weight`).
* Guided distillation (Meng et al. 2023): stage one (Algorithm 1) teaches one w-conditioned network
  x_eta(z_t, w) the guided teacher's (1 + w) x_c - w x_u (:func:`stage_one_loss`,
  :func:`distill_guided_teacher`); stage two (Algorithm 2) is progressive distillation of that
  network with w drawn per example (:func:`distill_guided_student`). Samplers: the deterministic DDIM
  step, and the N-step stochastic sampler (:class:`StochasticDistilledStep`).

The guided prediction is affine in the network outputs with weights (1 + w) and -w that sum to 1, and
the conversions between eps, x and v are affine in the output with the same z_t, so guiding in eps-,
x- or v-space gives the same step (a test checks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .contracts import network_evaluations
from .diffusion import (
    NonFiniteLossError,
    convert_prediction,
    denoise,
    expand_like,
    loss_weight,
    null_conditioning,
    posterior,
    prediction_from,
    q_sample,
    q_step,
    randn_like,
    sample_training_times,
    transition,
)
from .distillation import DistillationRound, progressive_distillation
from .nn.embeddings import ConditioningEmbedding
from .nn.unet import UNet
from .samplers import DDIMStep
from .schedules import NoiseSchedule
from .train import train

__all__ = [
    "GUIDANCE_CONVENTIONS",
    "convert_guidance_weight",
    "has_null_token",
    "ClassifierFreeGuidance",
    "NoisyClassifier",
    "classifier_loss",
    "train_noisy_classifier",
    "classifier_log_prob_grad",
    "ClassifierGuidance",
    "ClassifierGuidedAncestralStep",
    "GuidanceWeighted",
    "make_guided_student",
    "stage_one_loss",
    "StageOneResult",
    "distill_guided_teacher",
    "guidance_batch_cond",
    "distill_guided_student",
    "StochasticDistilledStep",
]

F64 = torch.float64

# ----------------------------------------------------------------------------- conventions

GUIDANCE_CONVENTIONS = {
    "w": "Ho & Salimans (2022): eps_w = (1 + w) eps_c - w eps_u; 0 = the plain conditional model",
    "guidance_scale": "diffusers, Imagen: eps = eps_u + g (eps_c - eps_u), g = 1 + w; 1 = conditional",
    "classifier_scale": "the classifier-guidance scale s of the implicit classifier, s = 1 + w",
}


def convert_guidance_weight(value, *, source: str, target: str):
    """Convert a guidance strength between conventions (Chapter 6 §3): "w" (Ho & Salimans, this book),
    "guidance_scale" (diffusers' ``guidance_scale`` = 1 + w) and "classifier_scale" (the classifier-guidance
    scale s = 1 + w that CFG equals with the implicit classifier). Works on floats and tensors.

    >>> convert_guidance_weight(7.5, source="guidance_scale", target="w")
    6.5
    """
    for name in (source, target):
        if name not in GUIDANCE_CONVENTIONS:
            raise ValueError(f"unknown guidance convention {name!r}; choose one of "
                             f"{list(GUIDANCE_CONVENTIONS)}.")
    w = value if source == "w" else value - 1
    return w if target == "w" else w + 1


def _per_example(value, z: torch.Tensor, name: str) -> torch.Tensor:
    """A scalar or (B,) weight as a (B, 1, ...) tensor in z's dtype and device."""
    v = torch.as_tensor(value, dtype=z.dtype, device=z.device)
    if v.ndim == 0:
        v = v.expand(len(z))
    if v.shape != (len(z),):
        raise ValueError(f"{name} must be a number or have shape (B,) = ({len(z)},); got shape "
                         f"{tuple(v.shape)}.")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} must be finite; got {v.flatten()[:4].tolist()}.")
    return expand_like(v, z)


# ----------------------------------------------------------------------------- classifier-free guidance


def has_null_token(model, key: str = "labels") -> bool:
    """Whether ``model`` has a null token for conditioning `key`, i.e. can give the unconditional
    prediction that classifier-free guidance needs: a model that declares ``null_token`` (the exact
    ``analytic.GaussianMixtureDenoiser``, wrappers), or a network whose ``ConditioningEmbedding`` embeds
    `key` (``ClassEmbedding`` keeps row ``num_classes`` for the null label -1)."""
    declared = getattr(model, "null_token", None)
    if declared is not None:
        return bool(declared)
    if isinstance(model, nn.Module):
        return any(isinstance(m, ConditioningEmbedding) and getattr(m, key, None) is not None
                   for m in model.modules())
    return False


class ClassifierFreeGuidance(nn.Module):
    """The classifier-free guided model (Ho & Salimans 2022, eq. (6); Chapter 6 §3), a model wrapper:

        out_w(z, t, c) = (1 + w) out(z, t, c) - w out(z, t, null),

    where ``out`` is the network's output of any prediction type (eps, x or v: the combination is
    affine with weights summing to 1, so it is the same guided x-hat and eps-hat in every type) and
    null = ``diffusion.null_conditioning(cond)`` (labels -1, the null token the model was trained with
    at rate p_uncond). w: a number or (B,) per example; w = 0 is the conditional model. Two network
    calls per call: ``nfe_per_call`` is twice the model's. The model must have a null token
    (:func:`has_null_token`) and the call must carry the conditioning (``labels=...``).
    """

    def __init__(self, model, w=0.0, *, key: str = "labels"):
        super().__init__()
        if not has_null_token(model, key):
            raise ValueError(
                f"classifier-free guidance needs a model with a null token for {key!r} (it predicts the "
                "unconditional output with the conditioning dropped): build the network with "
                "num_classes=... and train it with p_uncond > 0 (diffusion.training_loss; Ho & Salimans use "
                "0.1-0.2).")
        self.model, self.key = model, key
        self.w = w
        _check_w(w)

    @property
    def nfe_per_call(self) -> int:
        """Network evaluations per call: the conditional and the unconditional pass."""
        return 2 * network_evaluations(self.model)

    def forward(self, z: torch.Tensor, t, **cond) -> torch.Tensor:
        if cond.get(self.key) is None:
            raise ValueError(f"classifier-free guidance steers toward a condition: pass {self.key}=... "
                             "(the class of each example) when calling or sampling the guided model.")
        w = _per_example(self.w, z, "w")
        out_c = self.model(z, t, **cond)                         # eps(z, c) (or x, v)
        out_u = self.model(z, t, **null_conditioning(cond))      # eps(z, null)
        return (1 + w) * out_c - w * out_u                        # eq. (6)


def _check_w(w) -> None:
    v = torch.as_tensor(w, dtype=F64)
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"the guidance weight w must be finite; got {w!r}.")


# ----------------------------------------------------------------------------- the noisy classifier


class NoisyClassifier(nn.Module):
    """A noise-conditional classifier p_phi(y | z_t, t) (Dhariwal & Nichol 2021, Sec. 4.1; Chapter 6 §2):
    the UNet's encoder half (``UNet.encode``, with its time embedding) and a pooled linear head,
    GroupNorm -> SiLU -> mean over pixels -> Linear (guided-diffusion pools with attention; a mean is
    enough at 8x8). The decoder is not built. ``classifier(z, t) -> logits (B, num_classes)``.
    ``trained_on_noise`` (a saved buffer) turns True when :func:`train_noisy_classifier` has trained it on
    q_sample(x, t); classifier guidance refuses a classifier without it.
    """

    def __init__(self, num_classes: int, **unet_kwargs):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}.")
        for key in ("num_classes", "guidance_embedding", "latent_dim", "position_embedding"):
            if unet_kwargs.get(key):
                raise ValueError(f"the classifier's encoder takes only (z, t); drop {key}=.")
        unet = UNet(**unet_kwargs)
        for name in ("up_blocks", "up_attn", "upsample", "norm_out", "conv_out"):  # the decoder: unused
            delattr(unet, name)
        self.encoder = unet
        ch = unet.config["base_channels"] * unet.config["channel_mults"][-1]  # the bottleneck's channels
        groups = unet.config["groups"]
        self.head = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(ch, num_classes))
        self.num_classes = num_classes
        self.register_buffer("trained_on_noise", torch.tensor(False))

    def forward(self, z: torch.Tensor, t) -> torch.Tensor:
        h, _, _ = self.encoder.encode(z, t)
        return self.head(h)


def classifier_loss(classifier, schedule: NoiseSchedule, x: torch.Tensor, labels: torch.Tensor,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Cross-entropy of p_phi(y | z_t, t) on noised data, z_t = q_sample(x, t), t ~ U (0, 1] (on the grid
    i/T of a discrete schedule): what guided-diffusion's classifier trains on (Dhariwal & Nichol 2021,
    Sec. 4.1; Chapter 6 §2). Random draws: t, then the noise."""
    labels = torch.as_tensor(labels, device=x.device).long()
    if labels.shape != (len(x),):
        raise ValueError(f"labels must have shape (B,) = ({len(x)},); got {tuple(labels.shape)}.")
    t = sample_training_times(schedule, len(x), x, generator)
    z_t, _ = q_sample(schedule, x, t, generator=generator)
    loss = F.cross_entropy(classifier(z_t, t), labels)
    if not bool(torch.isfinite(loss)):
        raise NonFiniteLossError(f"the classifier loss is not finite ({float(loss)}); lower the learning "
                                 "rate.")
    return loss


def train_noisy_classifier(classifier: NoisyClassifier, schedule: NoiseSchedule, images: torch.Tensor,
                           labels: torch.Tensor, steps: int, **train_kwargs):
    """Train p_phi(y | z_t, t) with :func:`classifier_loss` through the one training loop
    (``minidiff.train.train``: batch_size, lr, warmup, ema_decay, seed, progress, ...). Marks the EMA
    classifier (and the raw one) ``trained_on_noise`` and returns the ``TrainResult``."""
    if len(images) != len(labels):
        raise ValueError(f"images and labels differ in length: {len(images)} and {len(labels)}.")

    def loss_fn(net, batch, generator):
        x, y = batch
        return classifier_loss(net, schedule, x, y, generator)

    result = train(classifier, loss_fn, (images, labels.long()), steps, **train_kwargs)
    for net in (result.model, result.ema_model):
        net.trained_on_noise.fill_(True)
    result.ema_model.eval()
    return result


def _check_noise_conditional(classifier) -> None:
    flag = getattr(classifier, "trained_on_noise", False)
    if not bool(flag):
        raise ValueError(
            "classifier guidance needs a noise-conditional classifier p(y | z_t, t), trained on noised "
            "inputs q_sample(x, t) at every t (guidance.train_noisy_classifier, or the exact "
            "analytic.GaussianMixtureClassifier). A classifier of clean images (metrics.DigitClassifier) "
            "gives meaningless gradients on noisy z_t.")


def classifier_log_prob_grad(classifier, z: torch.Tensor, t, labels: torch.Tensor) -> torch.Tensor:
    """grad_z log p_phi(y | z, t) = grad_z log_softmax(classifier(z, t))[y], per example (guided-diffusion's
    ``cond_fn``; Dhariwal & Nichol 2021, Algorithms 1-2; Chapter 6 §2). Gradients are switched on inside
    (the sampler runs without them); the classifier's weights get no gradient. Returns z's shape."""
    _check_noise_conditional(classifier)
    labels = torch.as_tensor(labels, device=z.device).long().reshape(-1).expand(len(z))
    num_classes = getattr(classifier, "num_classes", None)
    if num_classes is not None and bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"labels must lie in 0..{num_classes - 1} for this classifier; got values in "
                         f"[{int(labels.min())}, {int(labels.max())}].")
    t = torch.as_tensor(t, dtype=z.dtype, device=z.device).reshape(-1).expand(len(z))
    with torch.enable_grad():
        z_in = z.detach().requires_grad_(True)
        log_probs = torch.log_softmax(classifier(z_in, t), dim=-1)
        if num_classes is None and bool((labels >= log_probs.shape[-1]).any()):
            raise ValueError(f"labels must lie in 0..{log_probs.shape[-1] - 1}; got {int(labels.max())}.")
        chosen = log_probs.gather(1, labels[:, None]).sum()
        (grad,) = torch.autograd.grad(chosen, z_in)
    return grad.detach()


# ----------------------------------------------------------------------------- classifier guidance


class ClassifierGuidance(nn.Module):
    """Classifier guidance in the score form, a model wrapper for DDIM and the ODE solvers (Dhariwal &
    Nichol 2021, Algorithm 2; Chapter 6 §2):

        eps_s(z_t) = eps(z_t) - s sigma_t grad log p_phi(y | z_t),

    returned in the model's `prediction` type (x_s = (z_t - sigma_t eps_s) / alpha_t, v as usual). The
    labels y come with the call (``labels=...``, or the sampler's ``cond``); they go to the classifier,
    and to the model too only with ``pass_labels=True`` (a conditional model). s = scale; s = 1 with the
    exact classifier gives the exact conditional model. ``nfe_per_call`` counts the diffusion network
    only: the classifier's forward and backward pass come on top (time them).
    """

    def __init__(self, model, classifier, scale: float, schedule: NoiseSchedule, *, prediction: str = "eps",
                 pass_labels: bool = False):
        super().__init__()
        _check_noise_conditional(classifier)
        if not float(scale) == float(scale):
            raise ValueError(f"scale must be a number; got {scale!r}.")
        self.model, self.classifier, self.scale = model, classifier, float(scale)
        self.schedule, self.prediction, self.pass_labels = schedule, prediction, pass_labels

    @property
    def nfe_per_call(self) -> int:
        return network_evaluations(self.model)

    def forward(self, z: torch.Tensor, t, labels=None, **cond) -> torch.Tensor:
        if labels is None:
            raise ValueError("classifier guidance steers toward a class: pass labels=... (one per example).")
        out = self.model(z, t, **(dict(cond, labels=labels) if self.pass_labels else cond))
        alpha, sigma = self.schedule.alpha_sigma(torch.as_tensor(t, dtype=F64).cpu())
        alpha, sigma = expand_like(alpha, z), expand_like(sigma, z)
        # 1. the model's eps-hat (any prediction type, converted once)
        _, eps_hat = convert_prediction(out, self.prediction, z_t=z, alpha=alpha, sigma=sigma)
        # 2. eps-hat - s sigma_t grad log p(y | z_t)  (Algorithm 2, line 4)
        grad = classifier_log_prob_grad(self.classifier, z, t, labels)
        eps_guided = eps_hat - self.scale * sigma * grad
        # 3. back to the model's prediction type at the same z_t
        x_guided = (z - sigma * eps_guided) / alpha
        return prediction_from(x_guided, eps_guided, self.prediction, alpha=alpha, sigma=sigma)


@dataclass(frozen=True)
class ClassifierGuidedAncestralStep:
    """The ancestral step with the classifier's mean shift (Dhariwal & Nichol 2021, Algorithm 1;
    guided-diffusion's ``condition_mean``; Chapter 6 §2):

        z_s ~ N(mu + s Sigma grad log p_phi(y | z_t), Sigma),

    mu and Sigma the DDPM step's posterior mean and variance (``diffusion.posterior``, or the beta
    variance), the gradient taken at z_t. No noise at s = 0. labels: (B,) or one class for the batch.
    scale = 0 is ``samplers.DDPMStep(variance)``.
    """

    classifier: Callable
    labels: torch.Tensor | int
    scale: float
    variance: str = "posterior"

    def __post_init__(self):
        _check_noise_conditional(self.classifier)
        if self.variance not in ("posterior", "beta"):
            raise ValueError(f"unknown variance {self.variance!r}; choose 'posterior' or 'beta'.")

    def __call__(self, z_t, t, s, x_hat, eps_hat, schedule, generator=None):
        t64, s64 = torch.as_tensor(t, dtype=F64), torch.as_tensor(s, dtype=F64)
        # 1. the DDPM step's mean mu-tilde(z_t, x-hat) and variance
        mean, var = posterior(schedule, z_t, x_hat, t=t64, s=s64)
        if self.variance == "beta":
            var = expand_like(transition(schedule, s=s64, t=t64)[1], z_t)
        var = var.to(z_t.dtype)
        # 2. mu + s Sigma grad log p(y | z_t)  (Algorithm 1, line 4)
        grad = classifier_log_prob_grad(self.classifier, z_t, t64.to(z_t.dtype), self.labels)
        mean = mean + self.scale * var * grad
        # 3. z_s = mean + sqrt(Sigma) noise, none at s = 0
        if bool((s64 == 0).all()):
            return mean
        return mean + var.sqrt() * randn_like(z_t, generator)


# ----------------------------------------------------------------------------- guided distillation


class GuidanceWeighted(nn.Module):
    """A w-conditioned student used at one guidance weight: ``model(z, t, **cond)`` calls
    ``student(z, t, w=w, **cond)`` (Meng et al. 2023; Chapter 6 §5). w (a number or (B,)) must
    lie in the range the student was trained on, ``w_range`` = (w_min, w_max): outside it the student
    extrapolates and its output is not the guided model's. One network evaluation per call.
    """

    def __init__(self, student, w, w_range: tuple[float, float]):
        super().__init__()
        w_min, w_max = _check_w_range(w_range)
        values = torch.as_tensor(w, dtype=F64)
        if not bool(torch.isfinite(values).all()) or bool(((values < w_min) | (values > w_max)).any()):
            raise ValueError(f"w = {w!r} lies outside the guidance range the student was distilled on, "
                             f"[{w_min}, {w_max}]: choose w in that range, or distil with a wider w_range.")
        self.student, self.w, self.w_range = student, w, (w_min, w_max)

    @property
    def nfe_per_call(self) -> int:
        return network_evaluations(self.student)

    def forward(self, z: torch.Tensor, t, **cond) -> torch.Tensor:
        w = torch.as_tensor(self.w, dtype=z.dtype, device=z.device).reshape(-1).expand(len(z))
        return self.student(z, t, w=w, **cond)


def _check_w_range(w_range) -> tuple[float, float]:
    try:
        w_min, w_max = (float(v) for v in w_range)
    except (TypeError, ValueError):
        raise ValueError(f"w_range must be a pair (w_min, w_max); got {w_range!r}.") from None
    if not (w_min == w_min and w_max == w_max) or not 0 <= w_min <= w_max or w_max == float("inf"):
        raise ValueError(f"w_range must satisfy 0 <= w_min <= w_max < inf; got {w_range!r}.")
    return w_min, w_max


def make_guided_student(teacher: nn.Module, student: nn.Module) -> nn.Module:
    """The stage-one student x_eta(z_t, t, w, c) initialised from the teacher (Meng et al. 2023, stage one):
    `student` is the teacher's architecture plus a guidance embedding (``guidance_embedding=True``). Every
    weight the two share is copied from the teacher, and the last layer of the w embedding starts at zero,
    so the student starts as the teacher's conditional model at every w. Returns the student."""
    emb = next((m for m in student.modules() if isinstance(m, ConditioningEmbedding)), None)
    if emb is None or emb.w is None:
        raise ValueError("the guided student must embed w: build it like the teacher with "
                         "guidance_embedding=True.")
    own, theirs = student.state_dict(), teacher.state_dict()
    missing = [k for k in theirs if k not in own or own[k].shape != theirs[k].shape]
    extra = [k for k in own if k not in theirs]
    if missing or any(".w." not in k and not k.startswith("w.") for k in extra):
        raise ValueError(f"the student must be the teacher's architecture plus the w embedding; these "
                         f"entries differ: {(missing + extra)[:5]}. Build both from one config, adding "
                         "guidance_embedding=True for the student.")
    student.load_state_dict(theirs, strict=False)
    last = emb.w.mlp[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    return student.requires_grad_(True)


def stage_one_loss(student, teacher, schedule: NoiseSchedule, x: torch.Tensor, cond: dict, *,
                   w_range: tuple[float, float], teacher_prediction: str, prediction: str = "v",
                   weighting: str = "truncated_snr", generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """Stage-one guided distillation, Algorithm 1 of Meng et al. (2023), for one batch (Chapter 6 §5):

        t ~ U[0, 1], w ~ U[w_min, w_max], z_t = alpha_t x + sigma_t eps,
        x-hat_w(z_t) = (1 + w) x-hat_c(z_t) - w x-hat_u(z_t)          (the teacher, no gradient)
        L = omega(lambda_t) || x-hat_w(z_t) - x_eta(z_t, w) ||^2,

    the student's output read as a `prediction` and converted to x (``diffusion.denoise``); omega is
    ``diffusion.loss_weight(weighting)``. teacher_prediction is what the teacher network outputs ("eps",
    "x" or "v"; required, since reading a v-network as eps gives a meaningless target). cond holds the
    labels c (both networks get them; the teacher's unconditional pass uses the null token). Random
    draws, in this order: t, w, the noise.
    """
    w_min, w_max = _check_w_range(w_range)
    if not cond or cond.get("labels") is None:
        raise ValueError("stage one distils a class-conditional teacher: pass cond={'labels': y}.")
    # 1. t ~ U[0, 1] (the grid i/T on a discrete schedule) and w ~ U[w_min, w_max] (lines 3-4)
    t = sample_training_times(schedule, len(x), x, generator)
    device = x.device if generator is None else generator.device
    w = (w_min + (w_max - w_min) * torch.rand(len(x), generator=generator, dtype=x.dtype, device=device)
         ).to(x.device)
    # 2. z_t = alpha_t x + sigma_t eps (lines 5-6)
    z_t, _ = q_sample(schedule, x, t, generator=generator)
    # 3. the guided teacher's x-hat_w at the same z_t (line 8), two teacher passes, no gradient
    with torch.no_grad():
        x_target, _ = denoise(ClassifierFreeGuidance(teacher, w), schedule, z_t, t,
                              prediction=teacher_prediction, cond=cond)
    # 4. the student's x_eta(z_t, w) and the weighted squared error (line 9)
    x_hat, _ = denoise(student, schedule, z_t, t, prediction=prediction, cond=dict(cond, w=w))
    per_example = (x_hat - x_target).pow(2).reshape(len(x), -1).mean(dim=1)
    loss = (loss_weight(weighting, schedule.logsnr(t.to(F64).cpu())).to(device=x.device, dtype=x.dtype)
            * per_example).mean()
    if not bool(torch.isfinite(loss)):
        raise NonFiniteLossError(f"the stage-one loss is not finite ({float(loss)}); check the teacher's "
                                 "outputs and lower the learning rate.")
    return loss


@dataclass
class StageOneResult:
    """The stage-one student (``student``: the EMA model), the guidance range it learned, its losses, its
    optimiser steps and batch size, and the wall time. Teacher network evaluations: 2 per optimiser step,
    each on a whole batch (``teacher_calls``)."""

    model: nn.Module
    student: nn.Module
    w_range: tuple[float, float]
    losses: list[float]
    steps: int
    batch_size: int
    seconds: float

    @property
    def teacher_calls(self) -> int:
        return 2 * self.steps

    def at(self, w) -> GuidanceWeighted:
        """The student as a model at guidance weight w (checked against ``w_range``)."""
        return GuidanceWeighted(self.student, w, self.w_range)


def distill_guided_teacher(teacher: nn.Module, student: nn.Module, schedule: NoiseSchedule, data,
                           steps: int, *, w_range: tuple[float, float], teacher_prediction: str,
                           prediction: str = "v", weighting: str = "truncated_snr",
                           **train_kwargs) -> StageOneResult:
    """Stage one (Meng et al. 2023, Algorithm 1; Chapter 6 §5): train the w-conditioned `student`
    (initialised by :func:`make_guided_student`) with :func:`stage_one_loss` through the one training loop
    (``minidiff.train.train``: batch_size, lr, warmup, ema_decay, seed, progress, ...). data: (images,
    labels). teacher_prediction: the teacher's output type (required). The teacher is not changed."""
    w_range = _check_w_range(w_range)
    if not has_null_token(teacher):
        raise ValueError("the stage-one teacher is a classifier-free guided model: it needs a null token "
                         "(train it with num_classes=... and p_uncond > 0).")
    net = make_guided_student(teacher, student)
    frozen = teacher.eval()

    def loss_fn(model, batch, generator):
        x, labels = batch
        return stage_one_loss(model, frozen, schedule, x, {"labels": labels}, w_range=w_range,
                              prediction=prediction, teacher_prediction=teacher_prediction,
                              weighting=weighting, generator=generator)

    result = train(net, loss_fn, data, steps, **train_kwargs)
    return StageOneResult(model=result.model, student=result.ema_model.eval(), w_range=w_range,
                          losses=result.losses, steps=result.steps, batch_size=result.batch_size,
                          seconds=result.seconds)


def guidance_batch_cond(w_range: tuple[float, float]) -> Callable:
    """batch_cond for stage two (``distillation.distill_round``): a batch (x, labels) becomes
    (x, {"labels": labels, "w": w}) with w ~ U[w_min, w_max] per example (Meng et al. 2023, Algorithm 2,
    line 5), drawn from the loop's generator before the distillation loss's own draws."""
    w_min, w_max = _check_w_range(w_range)

    def split(batch, generator):
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise ValueError("guided stage two trains on (images, labels) batches.")
        x, labels = batch
        device = x.device if generator is None else generator.device
        u = torch.rand(len(x), generator=generator, dtype=x.dtype, device=device).to(x.device)
        return x, {"labels": labels, "w": w_min + (w_max - w_min) * u}

    return split


def distill_guided_student(stage_one: StageOneResult, schedule: NoiseSchedule, data, N: int, steps, *,
                           rounds: int | None = None, prediction: str = "v", weighting: str = "truncated_snr",
                           **kwargs) -> list[DistillationRound]:
    """Stage two (Meng et al. 2023, Algorithm 2; Chapter 6 §5): progressive distillation
    (``distillation.progressive_distillation``, chapter 5's machinery) of the stage-one student, each
    round halving the steps (N, N/2, ...), with w ~ U[w_min, w_max] drawn per example
    (:func:`guidance_batch_cond`) and given with the labels to teacher and student. The stage-one
    student samples with 2N DDIM steps. Returns the rounds; ``round.student`` is a w-conditioned network
    (use it at one w with ``GuidanceWeighted(round.student, w, stage_one.w_range)``)."""
    return progressive_distillation(stage_one.student, schedule, data, N, steps, rounds=rounds,
                                    prediction=prediction, weighting=weighting,
                                    batch_cond=guidance_batch_cond(stage_one.w_range), **kwargs)


@dataclass(frozen=True)
class StochasticDistilledStep:
    """The N-step stochastic sampler of guided distillation (Meng et al. 2023, "N-step stochastic
    sampling"; Chapter 6 §5): from t, a deterministic DDIM step of twice the step length,
    to s' = max(2s - t, 0), then noise back up to s with the forward process, z_s ~ q(z_s | z_s'):

        z_s' = alpha_s' x-hat + sigma_s' eps-hat,   z_s = (alpha_s / alpha_s') z_s' + sqrt(sigma_s^2 -
        (alpha_s / alpha_s')^2 sigma_s'^2) noise.

    The last step (s = 0) is the plain deterministic step. 1 NFE per step.
    """

    def __call__(self, z_t, t, s, x_hat, eps_hat, schedule, generator=None):
        ddim = DDIMStep(0.0)
        t_, s_ = float(t), float(s)
        if s_ == 0:
            return ddim(z_t, t, s, x_hat, eps_hat, schedule)
        # 1. the deterministic step of twice the length, t -> s' = 2s - t (at least 0)
        back = torch.tensor(max(2 * s_ - t_, 0.0), dtype=F64)
        z_back = ddim(z_t, t, back, x_hat, eps_hat, schedule)
        # 2. forward noise from s' back up to s
        return q_step(schedule, z_back, s=back, t=torch.tensor(s_, dtype=F64), generator=generator)
