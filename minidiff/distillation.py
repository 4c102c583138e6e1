"""Progressive distillation (Salimans & Ho 2022, Algorithm 1): a student learns in one DDIM step what
its teacher does in two, and then becomes the next teacher.

Notation as everywhere in minidiff: z_t = alpha_t x + sigma_t eps, lambda_t = log(alpha_t^2 / sigma_t^2),
continuous time t in [0, 1]. N is the number of sampling steps of the *student*; it samples on the grid
t = i/N (i = N, ..., 1, then 0), and its teacher on the grid twice as fine. One round (lines 2-17):

    theta <- eta                                    (the student starts as a copy of the teacher)
    t = i/N, i ~ Cat(1..N);  z_t = alpha_t x + sigma_t eps
    t' = t - 0.5/N,  t'' = t - 1/N                  (two teacher DDIM steps, eq. (10): t -> t' -> t'')
    x-tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)   (line 13)
    L = w(lambda_t) ||x-hat_theta(z_t) - x-tilde||^2                                        (line 15)

and K rounds halve N, each student becoming the next teacher (lines 18-19). x-tilde is the one
x-hat that makes the student's single DDIM step from z_t land exactly on the teacher's z_t''
(:func:`distillation_target`). The weightings w are those of ``diffusion.loss_weight``:
"truncated_snr" max(SNR, 1) (= max(x-MSE, eps-MSE)) and "snr+1" (= v-MSE); the student may
predict v or x (or eps, whose x-hat = (z - sigma eps-hat) / alpha breaks down as alpha -> 0 at t = 1;
chapter 5, section 4).

Every optimiser step goes through the one training loop, ``minidiff.train.train``: a round is
``train(student, loss_fn, data, steps)`` with a loss that closes over the frozen teacher.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .diffusion import (
    PREDICTIONS,
    WEIGHTINGS,
    NonFiniteLossError,
    denoise,
    expand_like,
    loss_weight,
    q_sample,
)
from .samplers import DDIMStep
from .schedules import NoiseSchedule
from .train import labelled_batch, train

__all__ = [
    "check_steps",
    "student_timesteps",
    "sample_student_times",
    "teacher_times",
    "ddim_step",
    "teacher_two_steps",
    "distillation_target",
    "distillation_loss",
    "make_student",
    "DistillationRound",
    "distill_round",
    "progressive_distillation",
]

F64 = torch.float64


# ----------------------------------------------------------------------------- checks


def check_steps(N) -> int:
    """N (the student's number of sampling steps) as an int; ValueError unless it is a power of two >= 1.

    Progressive distillation halves N every round down to 1 step, so N = 2^k.
    """
    if isinstance(N, bool) or not isinstance(N, int) or N < 1 or N & (N - 1):
        raise ValueError(f"the student's number of steps N must be a power of two >= 1 (1, 2, 4, ..., 2^k) "
                         f"so that every round can halve it; got {N!r}. Round it to a power of two, e.g. "
                         f"{_power_of_two_below(N)}.")
    return N


def _power_of_two_below(N) -> int:
    try:
        n = max(1, int(N))
    except (TypeError, ValueError):
        return 1
    return 1 << (n.bit_length() - 1)


def _check_prediction(prediction: str, who: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown {who} prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)} "
                         "(the paper's students predict 'v' or 'x').")


def _check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)} "
                         "(the paper's are 'truncated_snr' = max(SNR, 1) and 'snr+1' = v-MSE).")


# ----------------------------------------------------------------------------- times


def student_timesteps(N: int) -> torch.Tensor:
    """The student's sampling grid [1, (N-1)/N, ..., 1/N, 0] (float64, length N+1), for samplers.sample.

    The teacher of a round samples on ``student_timesteps(2 * N)``.
    """
    N = check_steps(N)
    return torch.arange(N, -1, -1, dtype=F64) / N


def sample_student_times(N: int, batch: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """t = i/N with i ~ Cat(1, ..., N) (Algorithm 1, lines 5-6), float64 of shape (batch,).

    Drawn on the generator's device (like diffusion.randn_like), then moved to `device`.
    """
    N = check_steps(N)
    gen_device = generator.device if generator is not None else device
    i = torch.randint(1, N + 1, (batch,), generator=generator, device=gen_device)
    t = i.to(F64) / N
    return t if device is None else t.to(device)


def teacher_times(t, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t', t'') = (t - 0.5/N, t - 1/N): the teacher's two DDIM steps go t -> t' -> t'' (Algorithm 1,
    lines 9-10), so t > t' > t'' >= 0. t must lie on the student's grid, t >= 1/N."""
    N = check_steps(N)
    t = torch.as_tensor(t, dtype=F64)
    if not bool((t * N >= 1 - 1e-9).all() & (t <= 1).all()):
        raise ValueError(f"student times must lie in [1/N, 1] = [{1 / N}, 1] (t = i/N, i in 1..N); got "
                         f"values in [{t.min().item():.4g}, {t.max().item():.4g}].")
    return t - 0.5 / N, (t - 1.0 / N).clamp(min=0.0)


# ----------------------------------------------------------------------------- the teacher's two steps


def _alpha_sigma(schedule: NoiseSchedule, t, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example (alpha_t, sigma_t) in float64 (shape (B,) or 0-d) on z's device."""
    alpha, sigma = schedule.alpha_sigma(torch.as_tensor(t, dtype=F64))
    device = z.device if z.device.type != "mps" else torch.device("cpu")
    return alpha.to(device), sigma.to(device)


def ddim_step(model, schedule: NoiseSchedule, z_t: torch.Tensor, *, t, s, prediction: str = "v",
              cond: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM step of `model` from z_t at time t to time s (Salimans & Ho 2022, eq. (10);
    Chapter 5 §3):

        z_s = alpha_s x-hat(z_t) + sigma_s (z_t - alpha_t x-hat(z_t)) / sigma_t
            = alpha_s x-hat + sigma_s eps-hat.

    One model call (``diffusion.denoise``) and the library's one DDIM step, ``samplers.DDIMStep(0.0)``,
    with t and s per example (shape (B,)), as they are inside a distillation batch, or scalars. t and s
    are keyword-only. Returns (z_s, x-hat). Runs under torch.no_grad() (a teacher's step).
    """
    _check_prediction(prediction, "teacher")
    t, s = torch.as_tensor(t, dtype=F64), torch.as_tensor(s, dtype=F64)
    with torch.no_grad():
        x_hat, eps_hat = denoise(model, schedule, z_t, t, prediction=prediction, cond=cond)
        z_s = DDIMStep(0.0)(z_t, t, s, x_hat, eps_hat, schedule)
    return z_s, x_hat


def teacher_two_steps(teacher, schedule: NoiseSchedule, z_t: torch.Tensor, t, N: int, prediction: str = "v",
                      cond: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's two DDIM steps t -> t' -> t'' (Algorithm 1, lines 9-12): returns (z_t', z_t'').

    The teacher is called first at (z_t, t), then at (z_t', t'); both calls run without gradients.
    """
    t = torch.as_tensor(t, dtype=F64)
    t_mid, t_end = teacher_times(t, N)
    z_mid, _ = ddim_step(teacher, schedule, z_t, t=t, s=t_mid, prediction=prediction, cond=cond)
    z_end, _ = ddim_step(teacher, schedule, z_mid, t=t_mid, s=t_end, prediction=prediction, cond=cond)
    return z_mid, z_end


def distillation_target(z_t: torch.Tensor, z_s: torch.Tensor, alpha_t, sigma_t, alpha_s, sigma_s
                        ) -> torch.Tensor:
    """The teacher target x-tilde (Salimans & Ho 2022, Algorithm 1, line 13):

        x-tilde = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t),

    with s = t'' the end of the teacher's two steps. It is the x-hat for which one student DDIM step
    (eq. (10)), z_s = alpha_s x-hat + sigma_s (z_t - alpha_t x-hat) / sigma_t, lands exactly on z_s: solve
    that linear equation for x-hat. At sigma_s = 0 (t'' = 0 on a discrete schedule) it is z_s / alpha_s
    = z_s. Coefficients (scalars or (B,)) are combined in float64 and applied in z's dtype.
    Raises ValueError where the denominator vanishes (lambda_s = lambda_t: the step makes no progress).
    """
    if z_s.shape != z_t.shape:
        raise ValueError(f"z_t and z_s must have the same shape; got {tuple(z_t.shape)} and "
                         f"{tuple(z_s.shape)}.")
    a_t, s_t, a_s, s_s = (torch.as_tensor(c, dtype=F64) for c in (alpha_t, sigma_t, alpha_s, sigma_s))
    if not bool((s_t > 0).all()):
        raise ValueError("sigma_t must be > 0: the student step starts from a noisy z_t (t >= 1/N).")
    ratio = s_s / s_t                                   # sigma_t'' / sigma_t
    denom = a_s - ratio * a_t                           # alpha_t'' - (sigma_t'' / sigma_t) alpha_t
    if not bool((denom.abs() > 0).all()):
        raise ValueError("x-tilde is undefined where alpha_s / sigma_s == alpha_t / sigma_t (equal log-SNR, "
                         "e.g. both times inside the schedule's log-SNR clip); use times with "
                         "lambda_s > lambda_t.")
    ratio, denom = ratio.to(z_t.device), denom.to(z_t.device)
    return (z_s - expand_like(ratio, z_t) * z_t) / expand_like(denom, z_t)


# ----------------------------------------------------------------------------- the loss


def distillation_loss(student, teacher, schedule: NoiseSchedule, x: torch.Tensor, N: int,
                      prediction: str = "v", weighting: str = "snr+1", teacher_prediction: str | None = None,
                      generator: torch.Generator | None = None, cond: dict | None = None,
                      reduction: str = "mean") -> torch.Tensor:
    """Algorithm 1, lines 4-15, for one batch x: mean_b( w(lambda_t) * mean_pixels((x-hat - x-tilde)^2) )
    (Salimans & Ho 2022; Chapter 5 §3).

    t = i/N on the student's grid (``sample_student_times``), z_t = q_sample(x, t), the teacher's two DDIM
    steps give z_t'' and x-tilde (``distillation_target``, no gradient); the student's output, read as a
    `prediction` ("v", "x" or "eps"), becomes x-hat with ``diffusion.denoise``; w is
    ``diffusion.loss_weight(weighting, lambda_t)``: "truncated_snr" (max(SNR, 1)), "snr+1" (v-MSE),
    "eps"/"snr" (SNR, L_simple), "x" (1). teacher_prediction defaults to `prediction`.
    Random draws, in this order: i (hence t), then the noise, both from `generator`.
    reduction: "mean" (scalar) or "none" (per-example losses, shape (B,)).
    """
    N = check_steps(N)
    teacher_prediction = prediction if teacher_prediction is None else teacher_prediction
    _check_prediction(prediction, "student")
    _check_prediction(teacher_prediction, "teacher")
    _check_weighting(weighting)
    if reduction not in ("mean", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; choose 'mean' or 'none'.")
    cond = cond or {}
    # 1. t = i/N, i ~ Cat(1..N), and z_t = alpha_t x + sigma_t eps (lines 5-7)
    t = sample_student_times(N, x.shape[0], generator, device=x.device if x.device.type != "mps" else "cpu")
    z_t, _ = q_sample(schedule, x, t, generator=generator)
    # 2. the teacher's two DDIM steps t -> t' -> t'' (lines 8-12), without gradients
    _, t_end = teacher_times(t, N)
    _, z_end = teacher_two_steps(teacher, schedule, z_t, t, N, teacher_prediction, cond)
    # 3. the target x-tilde: the x-hat whose one DDIM step from z_t lands on z_t'' (line 13)
    alpha_t, sigma_t = _alpha_sigma(schedule, t, z_t)
    alpha_end, sigma_end = _alpha_sigma(schedule, t_end, z_t)
    x_tilde = distillation_target(z_t, z_end, alpha_t, sigma_t, alpha_end, sigma_end)
    # 4. the student's x-hat (line 14), read from its `prediction`
    x_hat, _ = denoise(student, schedule, z_t, t, prediction=prediction, cond=cond)
    # 5. L = w(lambda_t) ||x-hat - x-tilde||^2, a mean over pixels (line 15)
    per_example = (x_hat - x_tilde).pow(2).reshape(len(x), -1).mean(dim=1)
    loss = loss_weight(weighting, schedule.logsnr(t)).to(device=x.device, dtype=x.dtype) * per_example
    if reduction == "mean":
        loss = loss.mean()
    if not bool(torch.isfinite(loss).all()):
        raise NonFiniteLossError(
            f"the distillation loss is not finite ({loss.detach().flatten()[:4].tolist()}). Check the "
            "teacher's outputs for NaN, lower the learning rate, and avoid prediction='eps' near t = 1, "
            "where x-hat = (z - sigma eps-hat) / alpha divides by alpha ~ 0: use 'v' or 'x'."
        )
    return loss


# ----------------------------------------------------------------------------- rounds


def make_student(teacher: torch.nn.Module, student: torch.nn.Module | None = None) -> torch.nn.Module:
    """theta <- eta (Algorithm 1, line 2): a copy of the teacher, or `student` given the teacher's weights.

    A given student must have the teacher's architecture (the same parameter names and shapes); it may
    differ in settings without weights, such as dropout (the paper's students use dropout 0).
    """
    if student is None:
        return copy.deepcopy(teacher).requires_grad_(True)
    own, theirs = student.state_dict(), teacher.state_dict()
    wrong = sorted(set(own) ^ set(theirs))
    wrong += [k for k in own if k in theirs and own[k].shape != theirs[k].shape]
    if wrong:
        raise ValueError(
            f"the student must have the teacher's architecture, since it starts from the teacher's weights "
            f"(Algorithm 1, line 2); these entries differ: {wrong[:5]}{' ...' if len(wrong) > 5 else ''}. "
            "Build it from the teacher's config (e.g. pretrained.build_model(config), changing only "
            "dropout), or pass student=None to copy the teacher.")
    student.load_state_dict(theirs)
    return student.requires_grad_(True)


@dataclass
class DistillationRound:
    """One round of Algorithm 1: the student (``model``, and the EMA of its weights ``ema_model``, which
    the next round uses as its teacher), its number of sampling steps N (its teacher's is 2N), the
    logged losses, the optimiser steps and batch size, the wall time and the teacher's network calls
    (2 per optimiser step, each on a whole batch)."""

    model: torch.nn.Module
    ema_model: torch.nn.Module
    N: int
    losses: list[float]
    steps: int
    batch_size: int
    seconds: float

    @property
    def student(self) -> torch.nn.Module:
        """The distilled student: the EMA model (the same as ``model`` with ema_decay=0, as in the paper)."""
        return self.ema_model

    @property
    def teacher_calls(self) -> int:
        """Teacher network evaluations on a batch: two DDIM steps per optimiser step."""
        return 2 * self.steps


def distill_round(teacher: torch.nn.Module, schedule: NoiseSchedule, data, N: int, steps: int,
                  prediction: str = "v", weighting: str = "snr+1", teacher_prediction: str | None = None,
                  student: torch.nn.Module | None = None, batch_cond: Callable | None = None,
                  **train_kwargs) -> DistillationRound:
    """One round (Algorithm 1, lines 2-17): a student of the teacher's architecture, initialised from
    its weights (``make_student``), learns with ``distillation_loss`` to do in N steps what the teacher
    does in 2N. The optimisation is ``minidiff.train.train(student, loss_fn, data, steps, **train_kwargs)``
    (batch_size, lr, warmup, grad_clip, ema_decay, seed, progress, ...); `data` is what train takes
    (a batch that is a tuple (x, labels) passes labels to both networks). The teacher is not changed.
    batch_cond(batch, generator) -> (x, cond): how a batch becomes the data and the conditioning both
    networks get, drawn with the loop's generator before the loss's own draws (guided distillation's
    stage two draws w ~ U[w_min, w_max] per example here; Chapter 6 §5). Default: ``train.labelled_batch``.
    """
    N = check_steps(N)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps (optimiser steps of the round) must be an integer >= 0; got {steps!r}.")
    teacher_prediction = prediction if teacher_prediction is None else teacher_prediction
    _check_prediction(prediction, "student")
    _check_prediction(teacher_prediction, "teacher")
    _check_weighting(weighting)
    net = make_student(teacher, student)
    frozen = teacher.eval()

    split = labelled_batch if batch_cond is None else batch_cond

    def loss_fn(model, batch, generator):
        x, cond = split(batch, generator)
        return distillation_loss(model, frozen, schedule, x, N, prediction, weighting, teacher_prediction,
                                 generator=generator, cond=cond)

    result = train(net, loss_fn, data, steps, **train_kwargs)
    return DistillationRound(model=result.model, ema_model=result.ema_model.eval(), N=N, losses=result.losses,
                             steps=result.steps, batch_size=result.batch_size,
                             seconds=result.seconds)


def progressive_distillation(teacher: torch.nn.Module, schedule: NoiseSchedule, data, N: int, steps,
                             rounds: int | None = None, prediction: str = "v", weighting: str = "snr+1",
                             teacher_prediction: str | None = None, student: torch.nn.Module | None = None,
                             seed: int = 0, progress: bool = True, batch_cond: Callable | None = None,
                             **train_kwargs) -> list[DistillationRound]:
    """K rounds of Algorithm 1 (lines 1-20): students with N, N/2, ..., N/2^(K-1) steps, each the teacher of
    the next (its EMA model). N is the first student's number of steps (the original teacher samples with
    2N); `rounds` defaults to log2(N) + 1, i.e. down to a 1-step student. Round k trains `steps` optimiser
    steps (one int for all rounds, or one per round) with seed `seed + k`; `student` (optional) fixes the
    students' architecture settings (e.g. the teacher's network with dropout 0), and every round starts
    from a fresh copy of it. One progress bar over the rounds (the rounds' own bars are off). batch_cond as
    in :func:`distill_round`. Returns the rounds in order.
    """
    N = check_steps(N)
    most = N.bit_length()  # log2(N) + 1
    rounds = most if rounds is None else rounds
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= most:
        raise ValueError(f"rounds must be an integer in 1..log2(N)+1 = 1..{most} (N={N} can be halved "
                         f"{most - 1} times, down to 1 step); got {rounds!r}.")
    per_round = [steps] * rounds if isinstance(steps, int) and not isinstance(steps, bool) else list(steps)
    if len(per_round) != rounds:
        raise ValueError(f"steps must be one integer or one integer per round ({rounds} rounds); "
                         f"got {steps!r}.")
    train_kwargs.pop("progress", None)
    out: list[DistillationRound] = []
    template = student
    bar = tqdm(total=rounds, desc="distillation rounds", disable=not progress)
    try:
        for k in range(rounds):
            n_k = N >> k
            fresh = copy.deepcopy(template) if template is not None else None
            r = distill_round(teacher, schedule, data, n_k, per_round[k], prediction, weighting,
                              teacher_prediction, student=fresh, seed=seed + k, progress=False,
                              batch_cond=batch_cond, **train_kwargs)
            out.append(r)
            teacher = r.student
            teacher_prediction = prediction  # from the second round on the teacher is a student
            bar.set_postfix(N=n_k, loss=f"{r.losses[-1]:.4g}" if r.losses else "-", refresh=False)
            bar.update(1)
    finally:
        bar.close()
    return out
