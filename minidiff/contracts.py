"""The two contracts every method plugs into: the model and the step rule (Chapter 1 §6).

A method is a model wrapper, a step rule or a training step, never a second loop. The sampling
loop (``samplers.sample``), the losses (``diffusion.training_loss``,
``distillation.distillation_loss``) and every wrapper (classifier-free guidance, PDM's patching,
model splitting, DDGAN's ``LatentModel``) meet at these two interfaces, written down here as
``typing.Protocol`` classes. They are structural: nothing has to inherit from them.

**Model** ``model(z, t, **cond) -> output``: z is (B, ...), t a float tensor (B,) in [0, 1]
(t = 0 data, t = 1 noise), cond holds keyword tensors (labels, w, latent, position, ...). The
output has z's shape and is read as an eps-, x- or v-prediction (``diffusion.convert_prediction``).
A wrapper says what one call costs in network evaluations with ``nfe_per_call`` (default 1), so
that NFE stays honest: classifier-free guidance has 2; a wrapper of a wrapper multiplies
(:func:`network_evaluations`).

**Step rule** ``step(z_t, t, s, x_hat, eps_hat, schedule, generator) -> z_s`` takes the loop from
time t to time s (floats, or (B,) tensors where a rule allows per-example times) given the model's
(x-hat, eps-hat) at (z_t, t). Optional parts, each declared by the rule itself:

* extra denoise calls: ``needs_denoise = True`` and a keyword ``denoise=``, a function
  ``(z, t) -> (x_hat, eps_hat)`` that calls the model and counts its cost in the NFE (Heun);
* reset / per-run state: ``init_state() -> dict`` and a keyword ``state=``. The loop makes one
  state per run and hands it to every step of that run; a multistep history lives there, never on
  the step object (k-diffusion's ``sample_lms`` keeps ``ds = []`` inside the run). Two interleaved
  runs with one step object then do not disturb each other;
* ``invertible = True``: the rule also runs from data to noise (s > t), e.g. deterministic DDIM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from .schedules import NoiseSchedule

__all__ = [
    "Model",
    "CountedModel",
    "DenoiseFn",
    "StepRule",
    "DenoisingStepRule",
    "StatefulStepRule",
    "InvertibleStepRule",
    "network_evaluations",
    "needs_denoise",
    "init_state",
    "is_invertible",
]

DenoiseFn = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
"""``denoise(z, t) -> (x_hat, eps_hat)``: one (counted) model call at a scalar time t, converted."""


@runtime_checkable
class Model(Protocol):
    """``model(z, t, **cond) -> output`` shaped like z (Chapter 1 §4-§6)."""

    def __call__(self, z: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor: ...


@runtime_checkable
class CountedModel(Model, Protocol):
    """A model (usually a wrapper) whose one call costs ``nfe_per_call`` network evaluations."""

    nfe_per_call: int


@runtime_checkable
class StepRule(Protocol):
    """``step(z_t, t, s, x_hat, eps_hat, schedule, generator) -> z_s`` (Chapter 1 §6, Chapter 2 §4)."""

    def __call__(self, z_t: torch.Tensor, t, s, x_hat: torch.Tensor, eps_hat: torch.Tensor,
                 schedule: NoiseSchedule, generator: torch.Generator | None = None) -> torch.Tensor: ...


@runtime_checkable
class DenoisingStepRule(StepRule, Protocol):
    """A step rule that calls the model again inside the step (``denoise=``), e.g. Heun (Chapter 3 §6)."""

    needs_denoise: bool


@runtime_checkable
class StatefulStepRule(StepRule, Protocol):
    """A step rule with a per-run state (``state=``), e.g. a multistep solver's history (Chapter 3 §6)."""

    def init_state(self) -> dict: ...


@runtime_checkable
class InvertibleStepRule(StepRule, Protocol):
    """A step rule that also runs from data to noise (``sample(..., increasing=True)``; Chapter 2 §7)."""

    invertible: bool


def network_evaluations(model) -> int:
    """Network evaluations that one call of `model` costs: its ``nfe_per_call`` (an int >= 1), else 1.

    A wrapper that calls the network twice per call (classifier-free guidance) sets 2; one that wraps
    another model declares ``nfe_per_call = k * network_evaluations(inner)`` (k calls of the inner model).
    """
    cost = getattr(model, "nfe_per_call", 1)
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
        raise ValueError(f"{type(model).__name__}.nfe_per_call must be an integer >= 1 (the network "
                         f"evaluations one call costs); got {cost!r}.")
    return cost


def needs_denoise(step) -> bool:
    """Whether the loop must pass ``denoise=`` to this step rule."""
    return bool(getattr(step, "needs_denoise", False))


def init_state(step) -> dict | None:
    """A fresh per-run state for the step rule (its ``init_state()``), or None for a stateless rule."""
    make = getattr(step, "init_state", None)
    if make is None:
        return None
    state = make()
    if not isinstance(state, dict):
        raise ValueError(f"{type(step).__name__}.init_state() must return a dict (the per-run state); got "
                         f"{type(state).__name__}.")
    return state


def is_invertible(step) -> bool:
    """Whether the step rule may run from data to noise (s > t)."""
    return bool(getattr(step, "invertible", False))
