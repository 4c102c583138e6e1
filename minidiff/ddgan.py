"""Denoising diffusion GANs (Xiao et al. 2022, "Tackling the Generative Learning Trilemma with
Denoising Diffusion GANs", ICLR): a few large denoising steps, each one a conditional GAN.

With few steps the true denoising distribution q(x_{t-1} | x_t) is multimodal, and DDPM's Gaussian
reverse step cannot represent it (chapter 4 computes it exactly for a Gaussian mixture,
``analytic.GaussianMixtureDenoiser.reverse_step``). DDGAN keeps the forward process and makes the
reverse step implicit (Sec. 3.2, paragraph "Parametrizing the implicit denoising model"):

    p_theta(x_{t-1} | x_t) = ∫ p(u) q(x_{t-1} | x_t, x_0 = G_theta(x_t, u, t)) du,    u ~ N(0, I):

the generator predicts x_0 from x_t and a latent u, and x_{t-1} is drawn from the DDPM posterior
q(x_{t-1} | x_t, x_0) (``diffusion.posterior``; no noise at the last step). The generator is one of
the book's denoisers built with ``latent_dim`` (u enters through the shared conditioning embedding,
as the official code feeds z to adaptive group norms) and read as an x-prediction, so sampling is
``samplers.sample`` with ``DDPMStep("posterior")`` on the T-step schedule (:func:`sample`).

Training is one GAN for all steps, with a time-conditional discriminator D(x_{t-1}, x_t, t)
(``nn.MLPDiscriminator`` / ``nn.ConvDiscriminator``). Real pairs come from the forward process,
x_{t-1} ~ q(x_{t-1} | x_0) and x_t ~ q(x_t | x_{t-1}) (Sec. 3.2, the rewrite under eq. (5)); fake pairs from
the generator. The adversarial objective is eq. (4); the losses are D's loss, eq. (5), and G's
non-saturating loss (Sec. 3.2, after eq. (5)), written with softplus,
-log sigmoid(l) = softplus(-l) and -log(1 - sigmoid(l)) = softplus(l) for a logit l. D also pays
the R1 penalty gamma/2 E||grad_{x_{t-1}} D||^2 on real pairs (Mescheder et al. 2018) every
``lazy_reg`` steps; like the official code we do not rescale it by ``lazy_reg``.

Facts from the official code (NVlabs/denoising-diffusion-gan): VP schedule with beta_min = 0.1,
beta_max = 20 discretised to T steps (T = 4 on CIFAR-10, T = 2 on CelebA-HQ 256); Adam with
betas (0.5, 0.9) for both nets, lr_g 1.6e-4 and lr_d 1.25e-4, r1_gamma 0.02, lazy_reg 15, a 100-d
latent and an EMA of G (decay 0.9999) on CIFAR-10. Its grid is t_i = 1e-3 + (1 - 1e-3) i / T with
the alpha-bars taken relative to t_0 (:func:`official_alpha_bars`); we use t_i = i / T exactly
(``schedules.discretize``); the alpha-bars differ by less than 2e-3.

Notation: the latent is written u because z_t is the noisy point; time is continuous, t = i / T.
A "one-step GAN" is DDGAN with T = 1: x_1 is (almost) pure noise, the step to t = 0 adds no noise,
so G maps (x_1, u) straight to data and D judges x_0 next to an uninformative x_1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import diffusion, distributed, samplers
from .diffusion import NonFiniteLossError
from .schedules import DiscreteSchedule, LinearVPSchedule, discretize
from .train import save_model, train

__all__ = [
    "MAX_T",
    "DDGANResult",
    "LatentModel",
    "ddgan_schedule",
    "official_alpha_bars",
    "draw_latent",
    "real_pairs",
    "posterior_sample",
    "discriminator_loss",
    "generator_loss",
    "r1_penalty",
    "sample",
    "DDGANStep",
    "PlayerLoss",
    "train_ddgan",
    "build",
    "train_config",
]

MAX_T = 16
"""Largest number of denoising steps accepted: DDGAN is about few, large steps (the paper uses 1-8)."""


def _check_T(T) -> int:
    if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= MAX_T:
        raise ValueError(f"DDGAN's number of steps T must be an integer in 1..{MAX_T} (the paper uses 2 or "
                         f"4; T = 1 is a one-step GAN); got {T!r}. For many small steps use DDPM.")
    return T


def ddgan_schedule(T: int = 4, beta_min: float = 0.1, beta_max: float = 20.0) -> DiscreteSchedule:
    """DDGAN's schedule: the VP schedule beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021)
    discretised to T steps, alpha-bar_i = exp(-int_0^{i/T} beta) (``schedules.discretize``)."""
    return discretize(LinearVPSchedule(beta_min, beta_max), _check_T(T))


def official_alpha_bars(T: int = 4, beta_min: float = 0.1, beta_max: float = 20.0,
                        eps: float = 1e-3) -> torch.Tensor:
    """The alpha-bars (T,) of the official code's grid, for comparison with :func:`ddgan_schedule`:
    t_i = eps + (1 - eps) i / T (i = 0..T) and alpha-bar_i = abar(t_i) / abar(t_0), where
    abar(t) = exp(-beta_min t - (beta_max - beta_min) t^2 / 2)."""
    _check_T(T)
    t = eps + (1 - eps) * torch.arange(T + 1, dtype=torch.float64) / T
    abar = torch.exp(-beta_min * t - 0.5 * (beta_max - beta_min) * t**2)
    return abar[1:] / abar[0]


def _check_generator(net: nn.Module) -> int:
    latent_dim = getattr(net, "config", {}).get("latent_dim")
    if not latent_dim:
        raise ValueError("the DDGAN generator must be built with a latent input: MLPDenoiser(latent_dim=...) "
                         "or UNet(latent_dim=...); the latent u enters through its conditioning embedding.")
    return int(latent_dim)


def draw_latent(batch: int, latent_dim: int, like: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """u ~ N(0, I) of shape (batch, latent_dim) in the dtype and device of `like` (drawn on the
    generator's device, see ``diffusion.randn_like``)."""
    shape_like = torch.empty(batch, latent_dim, dtype=like.dtype, device=like.device)
    return diffusion.randn_like(shape_like, generator)


class LatentModel(nn.Module):
    """The generator as a ``model(z, t)`` for ``samplers.sample``: x-hat = G(z, t, latent=u) with a
    fresh u ~ N(0, I) at every call (Sec. 3.2, the parameterisation), drawn from `generator` (so a
    seeded run repeats)."""

    def __init__(self, net: nn.Module, generator: torch.Generator | None = None):
        super().__init__()
        self.latent_dim = _check_generator(net)
        self.net, self.generator = net, generator

    def forward(self, z: torch.Tensor, t, **cond) -> torch.Tensor:
        return self.net(z, t, latent=draw_latent(z.shape[0], self.latent_dim, z, self.generator), **cond)


def sample(net: nn.Module, schedule: DiscreteSchedule, shape=None, generator: torch.Generator | None = None,
           progress: bool = False, return_trajectory: bool = False, device=None,
           z: torch.Tensor | None = None) -> samplers.SampleResult:
    """DDGAN sampling (Xiao et al. 2022, Sec. 3.2; chapter 4 §3): x_1 ~ N(0, I); for t = 1, (T-1)/T, ..., 1/T:
    u ~ N(0, I), x-hat = G(x_t, u, t), x_{t-1} ~ q(x_{t-1} | x_t, x-hat) (no noise at the last step).

    That is ``samplers.sample`` with ``DDPMStep("posterior")`` on the grid of `schedule`, the
    generator read as an x-prediction: T network evaluations. Draws, in order from `generator`:
    x_1 (unless it is given as `z`, e.g. a table's common initial noise), then per step u and the step's
    noise.
    """
    if not isinstance(schedule, DiscreteSchedule):
        raise ValueError(f"DDGAN samples on a discrete T-step schedule (ddgan_schedule(T)); got "
                         f"{type(schedule).__name__}.")
    return samplers.sample(LatentModel(net, generator), schedule, samplers.ddpm_timesteps(schedule.T),
                           samplers.DDPMStep("posterior"), shape=shape, z=z, prediction="x",
                           generator=generator, progress=progress, return_trajectory=return_trajectory,
                           device=device)


# ----------------------------------------------------------------------------- pairs and losses


def _step_times(schedule: DiscreteSchedule, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, s) = (i/T, (i-1)/T) in float64 for DDPM steps i (B,) in 1..T."""
    i = torch.as_tensor(i)
    if i.ndim != 1 or i.dtype.is_floating_point or not bool(((i >= 1) & (i <= schedule.T)).all()):
        raise ValueError(f"steps must be a (B,) integer tensor with values in 1..T = 1..{schedule.T}.")
    i = i.to(torch.float64)
    return i / schedule.T, (i - 1) / schedule.T


def real_pairs(schedule: DiscreteSchedule, x0: torch.Tensor, i: torch.Tensor,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Real pairs (x_{t-1}, x_t) at DDPM steps i (B,): x_{t-1} ~ q(x_{t-1} | x_0), then
    x_t ~ q(x_t | x_{t-1}), so that (x_{t-1}, x_t) ~ ∫ q(x_0) q(x_{t-1} | x_0) q(x_t | x_{t-1}) dx_0
    (Xiao et al. 2022, Sec. 3.2). At i = 1, x_{t-1} = x_0."""
    t, s = _step_times(schedule, i)
    x_prev, _ = diffusion.q_sample(schedule, x0, s, generator=generator)
    return x_prev, diffusion.q_step(schedule, x_prev, s=s, t=t, generator=generator)


def posterior_sample(schedule: DiscreteSchedule, x_t: torch.Tensor, x0_hat: torch.Tensor, t, s,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """x_{t-1} ~ q(x_{t-1} | x_t, x_0 = x0_hat) = mean + sqrt(var) noise (``diffusion.posterior``;
    Ho et al. 2020, eqs. (6)-(7)). var = 0 where s = 0: the last step adds no noise. One noise
    draw per call whatever s is, so seeded runs stay in step. Differentiable in x0_hat."""
    mean, var = diffusion.posterior(schedule, x_t, x0_hat, t=t, s=s)
    return mean + var.sqrt() * diffusion.randn_like(x_t, generator)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """D's loss (Xiao et al. 2022, eq. (5)): E[-log D(real)] + E[-log(1 - D(fake))]
    = mean softplus(-l_real) + mean softplus(l_fake)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """G's non-saturating loss (Xiao et al. 2022, Sec. 3.2, after eq. (5)): E[-log D(fake)]
    = mean softplus(-l_fake)."""
    return F.softplus(-fake_logits).mean()


def r1_penalty(discriminator: nn.Module, x_prev: torch.Tensor, x_t: torch.Tensor, t,
               gamma: float) -> torch.Tensor:
    """R1 = gamma/2 E ||grad_{x_{t-1}} D(x_{t-1}, x_t, t)||^2 on real pairs (Mescheder et al. 2018,
    eq. (9); D is the logit, as in the official code). Differentiable in D's parameters."""
    x_prev = x_prev.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = discriminator(x_prev, x_t.detach(), t)
        (grad,) = torch.autograd.grad(logits.sum(), x_prev, create_graph=True)
    return 0.5 * gamma * grad.pow(2).reshape(len(grad), -1).sum(1).mean()


# ----------------------------------------------------------------------------- training


@dataclass
class DDGANResult:
    """Result of :func:`train_ddgan`: the generator, its EMA (sample from this one), the discriminator
    (all in eval mode), the schedule, per-step losses (D without R1, G), the R1 values at the
    regularised steps, steps done and wall time."""

    generator: nn.Module
    ema_generator: nn.Module
    discriminator: nn.Module
    schedule: DiscreteSchedule
    d_losses: list[float] = field(default_factory=list)
    g_losses: list[float] = field(default_factory=list)
    r1: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def _finite(value: float, what: str, step: int, hint: str) -> float:
    if not math.isfinite(value):
        raise NonFiniteLossError(f"the {what} is {value} at step {step}: {hint}")
    return value


class DDGANStep:
    """DDGAN's train step for ``train.train`` (``step=``): one discriminator and one generator update
    (Xiao et al. 2022, Sec. 3; chapter 4 §4). Per call, with a batch x_0 of real data and t = i/T,
    i ~ U{1..T}, u ~ N(0, I):

      D: real pair (x_{t-1}, x_t) from :func:`real_pairs`; fake x'_{t-1} ~ q(x_{t-1}|x_t, G(x_t, u, t));
         minimise the discriminator loss (+ R1 on the real pair every `lazy_reg` steps, weight `r1_gamma`).
      G: new t, x_t ~ q(x_t | x_0), u; x'_{t-1} as above; minimise the non-saturating generator loss.

    The training loop updates the EMA of G after each call. Logs "d" (D's loss without R1), "g" and,
    at the regularised steps, "r1". Adam for both players (the official defaults for CIFAR-10); with
    ``lr_min`` both learning rates follow a cosine from their start value to lr_min over ``steps``.

    Under torchrun (``distribute``) each player's loss is one DistributedDataParallel forward of a
    module that holds only that player (:class:`PlayerLoss`), so DDP averages D's gradients in D's
    update and G's in G's, and the other player is used as a plain network.
    """

    description = "DDGAN"

    def __init__(self, generator: nn.Module, discriminator: nn.Module, schedule: DiscreteSchedule, steps: int,
                 lr_g: float = 1.6e-4, lr_d: float = 1.25e-4, betas_g: tuple[float, float] = (0.5, 0.9),
                 betas_d: tuple[float, float] = (0.5, 0.9), r1_gamma: float = 0.02, lazy_reg: int = 15,
                 lr_min: float | None = None):
        if lazy_reg < 1 or r1_gamma < 0:
            raise ValueError(f"need lazy_reg >= 1 and r1_gamma >= 0; got {lazy_reg}, {r1_gamma}.")
        self.G, self.D, self.schedule, self.steps = generator, discriminator, schedule, steps
        self.T = schedule.T
        self.latent_dim = _check_generator(generator)
        self.g_params = [p for p in generator.parameters() if p.requires_grad]
        self.lr_g, self.lr_d, self.lr_min = lr_g, lr_d, lr_min
        self.r1_gamma, self.lazy_reg = r1_gamma, lazy_reg
        self.optimizers = {"g": torch.optim.Adam(self.g_params, lr=lr_g, betas=betas_g, foreach=True),
                           "d": torch.optim.Adam(discriminator.parameters(), lr=lr_d, betas=betas_d,
                                                 foreach=True)}
        self.modules = {"discriminator": discriminator}
        self.settings = dict(T=self.T, lr_g=lr_g, lr_d=lr_d, betas_g=list(betas_g), betas_d=list(betas_d),
                             r1_gamma=r1_gamma, lazy_reg=lazy_reg, lr_min=lr_min, total_steps=steps)
        self.description = f"DDGAN T={self.T}"
        self.hint = (f"lower lr_d / lr_g (now {lr_d}, {lr_g}), raise r1_gamma (now {r1_gamma}) or check that "
                     "the data is finite and scaled to [-1, 1]")
        self._d_phase, self._g_phase = self.d_loss, self.g_loss

    def distribute(self, device: torch.device) -> None:
        """Each player's loss through DistributedDataParallel from now on (``train`` calls this under
        torchrun)."""
        self._d_phase = distributed.wrap(PlayerLoss(self.D, self.d_loss), device)
        self._g_phase = distributed.wrap(PlayerLoss(self.G, self.g_loss), device)

    def _draw_steps(self, n: int, gen: torch.Generator, device) -> torch.Tensor:
        return torch.randint(1, self.T + 1, (n,), generator=gen, device=device)

    def _fake_prev(self, x_t: torch.Tensor, i: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """x'_{t-1} ~ q(x_{t-1} | x_t, x_0 = G(x_t, u, t)): the implicit denoising distribution."""
        t, s = _step_times(self.schedule, i)
        u = draw_latent(len(x_t), self.latent_dim, x_t, gen)
        x0_hat = self.G(x_t, t.to(x_t.dtype), latent=u)
        return posterior_sample(self.schedule, x_t, x0_hat, t, s, gen)

    def d_loss(self, index: int, x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        """D's loss: real pair vs fake pair at the same x_t, plus R1 every lazy_reg steps; (loss, logged)."""
        T, logged = self.T, {}
        i = self._draw_steps(len(x0), gen, x0.device)
        t = (i.to(torch.float64) / T).to(x0.dtype)
        x_prev, x_t = real_pairs(self.schedule, x0, i, gen)
        with torch.no_grad():
            fake = self._fake_prev(x_t, i, gen)
        loss_d = discriminator_loss(self.D(x_prev, x_t, t), self.D(fake, x_t, t))
        logged["d"] = _finite(loss_d.item(), "discriminator loss", index, self.hint)
        if self.r1_gamma > 0 and index % self.lazy_reg == 0:
            r1 = r1_penalty(self.D, x_prev, x_t, t, self.r1_gamma)
            logged["r1"] = _finite(r1.item(), "R1 penalty", index, self.hint)
            loss_d = loss_d + r1
        return loss_d, logged

    def g_loss(self, index: int, x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        """G's non-saturating loss at a new t, x_t ~ q(x_t | x_0); (loss, logged)."""
        i = self._draw_steps(len(x0), gen, x0.device)
        t = (i.to(torch.float64) / self.T).to(x0.dtype)
        x_t, _ = diffusion.q_sample(self.schedule, x0, i.to(torch.float64) / self.T, generator=gen)
        loss_g = generator_loss(self.D(self._fake_prev(x_t, i, gen), x_t, t))
        return loss_g, {"g": _finite(loss_g.item(), "generator loss", index, self.hint)}

    def __call__(self, index: int, x0: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
        opt_g, opt_d = self.optimizers["g"], self.optimizers["d"]
        if self.lr_min is not None:                                    # cosine annealing (official code)
            for opt, lr in ((opt_g, self.lr_g), (opt_d, self.lr_d)):
                for group in opt.param_groups:
                    group["lr"] = self.lr_min + (lr - self.lr_min) * 0.5 * (1 + math.cos(math.pi * index
                                                                                         / self.steps))
        # gen: one generator, or one per block of x0 (train(..., shards=)): each block keeps its own stream
        # through both players' updates, as one process of a torchrun job does
        # 1. discriminator: real pair vs fake pair at the same x_t; R1 every lazy_reg steps
        opt_d.zero_grad(set_to_none=True)
        logged = distributed.accumulate(lambda block, g: self._d_phase(index, block, g), x0, gen,
                                        module=self._d_phase)
        opt_d.step()
        # 2. generator: new t, x_t ~ q(x_t | x_0); gradients for G only (D stays as it is)
        opt_g.zero_grad(set_to_none=True)
        logged_g = distributed.accumulate(lambda block, g: self._g_phase(index, block, g), x0, gen,
                                          module=self._g_phase,
                                          backward=lambda loss: loss.backward(inputs=self.g_params))
        opt_g.step()
        return {**logged, **logged_g}


class PlayerLoss(nn.Module):
    """One player's loss as a module that holds only that player (``DDGANStep.distribute``):
    ``forward(index, x0, gen) = loss(index, x0, gen)``. Wrapped in DistributedDataParallel, the loss is
    one DDP forward whose backward averages that player's gradients across processes."""

    def __init__(self, player: nn.Module, loss):
        super().__init__()
        self.player = player
        self._loss = loss

    def forward(self, index: int, x0: torch.Tensor, gen: torch.Generator):
        return self._loss(index, x0, gen)


def train_ddgan(generator: nn.Module, discriminator: nn.Module, data, T: int = 4, steps: int = 2000,
                batch_size: int = 256, lr_g: float = 1.6e-4, lr_d: float = 1.25e-4,
                betas_g: tuple[float, float] = (0.5, 0.9), betas_d: tuple[float, float] = (0.5, 0.9),
                r1_gamma: float = 0.02, lazy_reg: int = 15, ema_decay: float = 0.999,
                lr_min: float | None = None, seed: int = 0, schedule: DiscreteSchedule | None = None,
                progress: bool = True, save_dir: str | Path | None = None,
                num_threads: int | None = 1, checkpoint_dir: str | Path | None = None,
                checkpoint_every: int | None = None, resume: bool = False, shards: int = 1) -> DDGANResult:
    """Train a DDGAN (Xiao et al. 2022, Sec. 3; chapter 4 §4): :class:`DDGANStep` through the one
    training loop ``train.train`` (EMA of G, seeded generators, checkpoints and exact resume).

    Args:
        generator: a denoiser built with ``latent_dim`` (MLPDenoiser / UNet), read as x-prediction.
        discriminator: D(x_prev, x_t, t) -> logits (B,) (``nn.MLPDiscriminator`` / ``nn.ConvDiscriminator``).
        data: a tensor (N, ...) or a callable (batch_size, generator) -> batch, as for ``train.train``.
        T: number of denoising steps; `schedule` defaults to ``ddgan_schedule(T)``.
        lr_g, lr_d, betas_g, betas_d: Adam for G and for D (the official defaults for CIFAR-10).
        r1_gamma, lazy_reg: R1 weight and interval (r1_gamma = 0 switches it off).
        ema_decay: EMA of G (``train.EMA``).
        lr_min: if given, both learning rates follow a cosine from their start value down to lr_min over
            the run (the official code anneals per epoch to 1e-5 over 1200+ epochs); None (default) keeps
            them constant, which works better for the book's short runs.
        seed: batches come from a CPU generator seeded with `seed`, t / noise / u from one seeded with
            seed + 1 on the model's device; the caller's global RNG is left alone. Same seed and same
            initial weights give bit-identical results on CPU.
        save_dir: if given, save G, EMA-G and D there as safetensors + JSON (``train.save_model``).
        num_threads: torch threads while training on a CPU (restored afterwards): small networks train
            fastest single-threaded, especially on a busy machine (as ``metrics.train_classifier``);
            None keeps the current setting.
        checkpoint_dir, checkpoint_every, resume: as for ``train.train`` (both players, both optimisers
            and the loss history are checkpointed; a resumed run ends with the same weights).
        shards: blocks per batch, each with its own keyed noise (``train.train``'s gradient accumulation;
            a torchrun job of N processes computes what one process with N shards does).

    Raises NonFiniteLossError (a ValueError) when a loss becomes NaN or infinite.
    """
    _check_T(T)
    schedule = ddgan_schedule(T) if schedule is None else schedule
    if not isinstance(schedule, DiscreteSchedule) or schedule.T != T:
        raise ValueError(f"schedule must be a DiscreteSchedule with T = {T} steps (ddgan_schedule(T)).")
    if steps < 0 or batch_size < 1 or lazy_reg < 1 or r1_gamma < 0:
        raise ValueError(f"need steps >= 0, batch_size >= 1, lazy_reg >= 1 and r1_gamma >= 0; got {steps}, "
                         f"{batch_size}, {lazy_reg}, {r1_gamma}.")
    step = DDGANStep(generator, discriminator, schedule, steps, lr_g=lr_g, lr_d=lr_d, betas_g=betas_g,
                     betas_d=betas_d, r1_gamma=r1_gamma, lazy_reg=lazy_reg, lr_min=lr_min)
    device = next(generator.parameters()).device
    threads = torch.get_num_threads()
    if num_threads is not None and device.type == "cpu":
        torch.set_num_threads(num_threads)
    try:
        out = train(generator, None, data, steps, batch_size=batch_size, ema_decay=ema_decay, seed=seed,
                    progress=progress, step=step, checkpoint_dir=checkpoint_dir,
                    checkpoint_every=checkpoint_every, resume=resume, shards=shards)
    finally:
        torch.set_num_threads(threads)
    history = out.history
    result = DDGANResult(generator, out.ema_model.eval(), discriminator, schedule,
                         d_losses=history.get("d", []), g_losses=history.get("g", []),
                         r1=history.get("r1", []), steps=out.steps, seconds=out.seconds)
    if save_dir is not None and distributed.world()[0] == 0:
        folder = Path(save_dir)
        save_model(out.ema_model, folder / "generator_ema")
        save_model(generator, folder / "generator")
        save_model(discriminator, folder / "discriminator")
    return result


# ----------------------------------------------------------------------------- configs


def build(config: dict) -> tuple[nn.Module, nn.Module]:
    """Untrained (G, D) for a chapter-4 config: G from "architecture" / "model" (as
    ``pretrained.build_model``), D an MLPDiscriminator ("mlp") or ConvDiscriminator ("unet") from
    "discriminator"."""
    from .nn import ConvDiscriminator, MLPDiscriminator
    from .pretrained import build_model

    if "discriminator" not in config:
        raise ValueError("a DDGAN config needs a 'discriminator' entry (keyword arguments of the network).")
    net = build_model(config)
    _check_generator(net)
    disc = MLPDiscriminator if config["architecture"] == "mlp" else ConvDiscriminator
    return net, disc(**config["discriminator"])


def train_config(config: dict, progress: bool = True, device: str | torch.device = "cpu",
                 **overrides) -> DDGANResult:
    """Build (seeded with the config's train seed) and train the DDGAN of a chapter-4 config on its data
    (``pretrained.training_data``). `overrides` replace entries of config["train"] (and T), e.g.
    ``train_config(cfg, T=2)`` or ``train_config(cfg, r1_gamma=0.0)`` for the ablations."""
    from .pretrained import training_data

    kwargs = {**config["train"], **overrides}
    kwargs.setdefault("T", config["diffusion"]["T"])
    diff = config["diffusion"]
    kwargs["schedule"] = ddgan_schedule(kwargs["T"], diff.get("beta_min", 0.1), diff.get("beta_max", 20.0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(kwargs.get("seed", 0))
        net, disc = build(config)
    return train_ddgan(net.to(device), disc.to(device), training_data(config).to(device), progress=progress,
                       **kwargs)
