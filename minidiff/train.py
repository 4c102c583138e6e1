"""The one training loop: batches, seeded generators, EMA, progress, checkpoints, exact resume.

Every method of the book trains through ``train(model, loss_fn, data, steps)``. What one optimisation
step does is a *train step* (:class:`TrainStep`): by default :class:`LossStep`, one AdamW step on
``loss_fn(model, batch, generator)`` with linear warm-up and gradient clipping (DDPM's L_simple, Ho et
al. 2020, Algorithm 1; distillation's loss, chapter 5). A method with its own optimisers, such as
DDGAN's two-player step (chapter 4), passes ``step=`` instead of a loss and gets the rest of the loop
for free: checkpoints, exact resume, the EMA, the progress bar, the non-finite-loss error, and the
seeded generators.

The exponential moving average of the weights is what DDPM samples from (Ho et al. 2020,
Appendix B, decay 0.9999); here with TensorFlow's warm-up min(decay, (1 + n) / (10 + n)) so
that short CPU runs are not dominated by the initial weights.

Checkpoints never pickle: tensors go to safetensors, everything else (step, settings, optimiser
scalars, random-generator states, losses) to JSON; both are written to a temporary file and renamed,
so a run killed while writing leaves the previous checkpoint intact. Batches are drawn i.i.d. with
replacement from a seeded generator, so resuming from a checkpoint reproduces an uninterrupted run
bit for bit on CPU.

Under ``torchrun --nproc_per_node=N`` the same call trains on N processes with DistributedDataParallel
(``minidiff.distributed``): each process takes its block of every global batch, with noise keyed by
the block, the gradients are averaged by DDP, and the EMA, the checkpoints and the progress bar live
on rank 0. ``shards=N`` in one process computes the same update (gradient accumulation).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import distributed
from .diffusion import NonFiniteLossError

__all__ = [
    "EMA",
    "LossStep",
    "NonFiniteLossError",
    "TrainResult",
    "TrainStep",
    "atomic_save_file",
    "labelled_batch",
    "latest_checkpoint",
    "load_config",
    "load_model",
    "make_batch_sampler",
    "resolve_compile",
    "resolve_precision",
    "save_model",
    "to_device",
    "train",
]

class EMA:
    """Exponential moving average of a model's parameters, kept in a frozen copy ``ema.model``.

    ``update(model)`` sets p_ema <- d p_ema + (1 - d) p with d = min(decay, (1 + n) / (10 + n)) after
    n previous updates; buffers are copied. The parameter lists are built once (the first update) and
    updated with one foreach call each, which gives the same bits as a per-tensor ``lerp_``. With
    decay 0 the average is the model itself: ``update`` only counts, and ``sync(model)`` copies the
    weights when they are needed (the training loop calls it before a checkpoint and at the end).
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs: tuple | None = None

    def _lists(self, model: torch.nn.Module) -> tuple:
        if self._pairs is None or self._pairs[0] is not model:
            params = [p.detach() for p in model.parameters()]
            buffers = list(model.buffers())
            ema_params, ema_buffers = list(self.model.parameters()), list(self.model.buffers())
            if len(params) != len(ema_params) or len(buffers) != len(ema_buffers):
                raise ValueError("EMA.update got a model with another architecture than the one it averages")
            self._pairs = (model, ema_params, params, ema_buffers, buffers)
        return self._pairs[1:]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        if self.decay == 0:
            self.num_updates += 1
            return
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_params, params, ema_buffers, buffers = self._lists(model)
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        if buffers:
            torch._foreach_copy_(ema_buffers, buffers)
        self.num_updates += 1

    @torch.no_grad()
    def sync(self, model: torch.nn.Module) -> None:
        """With decay 0, copy the model's weights into ``ema.model`` (otherwise nothing to do)."""
        if self.decay == 0:
            ema_params, params, ema_buffers, buffers = self._lists(model)
            torch._foreach_copy_(ema_params, params)
            if buffers:
                torch._foreach_copy_(ema_buffers, buffers)


@runtime_checkable
class TrainStep(Protocol):
    """One optimisation step of a method, for :func:`train` (chapter 1 §4; chapter 4 §4 for DDGAN's).

    ``step(index, batch, generator) -> dict[str, float]`` updates the weights on one batch (already on
    the model's device) and returns the values to log (``"loss"`` is the one shown and averaged into
    ``TrainResult.losses``). ``generator`` is the loop's seeded generator for the step's own noise;
    with ``shards`` > 1 it is a list, one per block of the batch (``distributed.accumulate`` splits it).
    ``optimizers`` (name -> optimiser) and ``modules`` (name -> extra networks beyond the trained
    model, e.g. DDGAN's discriminator) are saved in checkpoints and restored on resume; ``settings``
    (JSON values) must match for a resume. ``description`` labels the progress bar.

    To train under ``torchrun`` a step also has ``distribute(device)``, which the loop calls once when
    more than one process runs: from then on the step runs its forward passes through
    DistributedDataParallel (``distributed.wrap``), so that DDP averages the gradients.
    """

    optimizers: dict[str, torch.optim.Optimizer]
    modules: dict[str, torch.nn.Module]
    settings: dict
    description: str

    def __call__(self, index: int, batch, generator: torch.Generator) -> dict[str, float]: ...


class LossStep:
    """The default train step: one AdamW (or ``optimizer``) step on ``loss_fn(model, batch, generator)``.

    The learning rate is ``lr * min(1, (index + 1) / warmup)`` (linear warm-up), times
    ``lr_factor(index)`` if given (e.g. a cosine decay); the global gradient norm is clipped to
    ``grad_clip`` (None or 0: no clipping). A non-finite loss or gradient norm raises
    NonFiniteLossError with advice, before the weights change.

    Given a list of generators, the step splits its batch into that many equal blocks, one generator
    each, and averages their gradients (gradient accumulation; ``train(..., shards=)``). ``precision``
    "bf16" runs the loss under bf16 autocast, ``compile=True`` the network through ``torch.compile``
    (both for GPUs; the full configs ask for them with "auto").
    """

    description = "train"

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, lr: float = 2e-4, weight_decay: float = 0.0,
                 warmup: int = 100, grad_clip: float | None = 1.0,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 lr_factor: Callable[[int], float] | None = None, precision: str = "fp32",
                 compile: bool = False):
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0 steps, got {warmup}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16' (or 'auto' in train()), got {precision!r}")
        self.model = model
        self.loss_module = distributed.LossModule(model, loss_fn, torch.compile(model) if compile else None,
                                                  precision)
        self._forward = self.loss_module
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.lr, self.warmup, self.grad_clip, self.lr_factor = lr, warmup, grad_clip, lr_factor
        opt = (optimizer or torch.optim.AdamW)(self.params, lr=lr, weight_decay=weight_decay)
        self.optimizers = {"opt": opt}
        self.modules: dict[str, torch.nn.Module] = {}
        self.settings = dict(lr=lr, weight_decay=weight_decay, warmup=warmup, grad_clip=grad_clip,
                             optimizer=type(opt).__name__)
        if precision != "fp32":
            self.settings["precision"] = precision

    def distribute(self, device: torch.device) -> None:
        """Run the loss through DistributedDataParallel from now on (``train`` calls this under torchrun)."""
        self._forward = distributed.wrap(self.loss_module, device)

    def __call__(self, index: int, batch, generator) -> dict[str, float]:
        opt = self.optimizers["opt"]
        lr = self.lr * min(1.0, (index + 1) / self.warmup) if self.warmup else self.lr
        if self.lr_factor is not None:
            lr = lr * self.lr_factor(index)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)

        def forward(block, gen):
            loss = self._forward(block, gen)
            value = loss.item()
            if not math.isfinite(value):
                opt.zero_grad(set_to_none=True)
                raise NonFiniteLossError(
                    f"loss is {value} at step {index}: lower the learning rate (lr={self.lr}), keep "
                    "grad_clip on, check that the data is finite and scaled to [-1, 1]; with checkpoints, "
                    "resume=True restarts from the last good state"
                )
            return loss, {"loss": value}

        value = distributed.accumulate(forward, batch, generator, module=self._forward)["loss"]
        if self.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            if not torch.isfinite(norm):
                raise NonFiniteLossError(
                    f"gradient norm is {float(norm)} at step {index} (loss {value:.4g}): lower the "
                    f"learning rate (lr={self.lr}) and check the data and the loss for divisions by ~0"
                )
        opt.step()
        return {"loss": value}


@dataclass
class TrainResult:
    """Result of ``train``: both models (eval mode), logged losses (the mean of every ``log_every``
    steps' "loss"), every value the step logged (``history``, one entry per step that logged it),
    steps done, wall time of this call, and the batch size the run drew."""

    model: torch.nn.Module
    ema_model: torch.nn.Module
    losses: list[float]
    steps: int
    seconds: float
    history: dict[str, list[float]] = field(default_factory=dict)
    batch_size: int | None = None


# ----------------------------------------------------------------------------- state (de)serialisation


def _tensors(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def _load_tensors(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, source) -> None:
    """Load ``prefix``-ed tensors into ``module``; ValueError naming every missing / mismatched entry."""
    own = module.state_dict()
    given = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    wrong = [f"{k}: file {tuple(given[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in given and given[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        lines = [f"{source} does not match this {type(module).__name__}"]
        if wrong:
            lines.append("shape mismatch: " + "; ".join(wrong[:5]) + (" ..." if len(wrong) > 5 else ""))
        if missing:
            lines.append(f"missing from file: {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            lines.append(f"not in model: {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else ""))
        lines.append("build the model with the config saved next to the weights (load_config) and try again")
        raise ValueError("\n".join(lines))
    module.load_state_dict(given)


def _json_value(v):
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, tuple | list):
        return [_json_value(x) for x in v]
    if v is None or isinstance(v, bool | int | float | str):
        return v
    raise TypeError(f"cannot store optimiser value {v!r} of type {type(v).__name__} in JSON")


def _optimizer_state(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}{idx}/{k}"] = v.detach().to("cpu").contiguous().clone()
            else:
                scalars[f"{idx}/{k}"] = _json_value(v)
    groups = [{k: _json_value(v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "state_scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                    prefix: str) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith(prefix):
            idx, name = key[len(prefix):].split("/", 1)
            state.setdefault(int(idx), {})[name] = v
    for key, v in meta["state_scalars"].items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def _rng_to_list(state: torch.Tensor) -> list[int]:
    return state.tolist()


def _rng_from_list(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) to a temporary file next to ``path``, then rename it over ``path`` (atomic on POSIX):
    a crash mid-write leaves the old file (or none), never a truncated one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, obj: dict) -> None:
    _replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj)))


def atomic_save_file(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` through a temporary file and a rename, so that readers never see a
    half-written file (a crash leaves the previous file in place)."""
    _replace_atomically(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


# ----------------------------------------------------------------------------- model files


def _weights_path(path) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


def save_model(model: torch.nn.Module, path, config: dict | None = None) -> Path:
    """Save weights to ``path`` (.safetensors) and ``config`` (default: ``model.config``) to a .json.

    Both files are written atomically (temporary file, then rename); the JSON goes last.
    """
    weights = _weights_path(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    config = dict(getattr(model, "config", {}) if config is None else config)
    atomic_save_file(_tensors(model, ""), weights)
    _write_json(weights.with_suffix(".json"), {"class": type(model).__name__, "config": config})
    return weights


def load_config(path) -> dict:
    """The config dict saved by ``save_model`` next to the weights."""
    meta = json.loads(_weights_path(path).with_suffix(".json").read_text())
    return meta["config"]


def load_model(model: torch.nn.Module, path) -> torch.nn.Module:
    """Load weights saved by ``save_model`` (or a training checkpoint's model) into ``model``, in place.

    Raises ValueError with the mismatching entries when the file does not fit the model's shapes.
    """
    weights = _weights_path(path)
    if not weights.exists():
        raise FileNotFoundError(f"no weights at {weights}")
    tensors = load_file(str(weights))
    if any(k.startswith("model/") for k in tensors):  # a training checkpoint
        tensors = {k: v for k, v in tensors.items() if k.startswith("model/")}
        _load_tensors(model, tensors, "model/", weights)
    else:
        _load_tensors(model, tensors, "", weights)
    return model


# ----------------------------------------------------------------------------- checkpoints


def latest_checkpoint(checkpoint_dir) -> Path | None:
    """Path (without suffix) of the newest complete checkpoint ``ckpt_<step>`` in the folder, or None.

    A checkpoint is complete when both its .safetensors and its .json exist (the JSON is written last).
    """
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("ckpt_*.json") if p.with_suffix(".safetensors").exists()]
    if not done:
        return None
    return max(done, key=lambda p: int(p.stem.split("_")[1])).with_suffix("")


def _save_checkpoint(folder: Path, step: int, model, ema: EMA, train_step: TrainStep, meta: dict,
                     keep: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / f"ckpt_{step:08d}"
    tensors = {**_tensors(model, "model/"), **_tensors(ema.model, "ema/")}
    for name, module in train_step.modules.items():
        tensors.update(_tensors(module, f"module.{name}/"))
    optimizers = {}
    for name, opt in train_step.optimizers.items():
        opt_tensors, optimizers[name] = _optimizer_state(opt, f"optim.{name}/")
        tensors.update(opt_tensors)
    atomic_save_file(tensors, str(base) + ".safetensors")
    _write_json(base.with_suffix(".json"), {**meta, "step": step, "optimizers": optimizers,
                                           "ema_num_updates": ema.num_updates})
    if keep:
        old = sorted(folder.glob("ckpt_*.json"), key=lambda p: int(p.stem.split("_")[1]))[:-keep]
        for p in old:
            p.unlink()
            p.with_suffix(".safetensors").unlink(missing_ok=True)


# ----------------------------------------------------------------------------- data


def make_batch_sampler(data) -> Callable[[int, torch.Generator], object]:
    """Return batch(batch_size, generator) for a tensor, a tuple of tensors or a callable.

    Tensors are sampled i.i.d. with replacement (one index draw per batch, shared by the tuple's
    tensors); a callable (batch_size, generator) -> batch is returned as it is.
    """
    if callable(data) and not isinstance(data, torch.Tensor):
        return data
    if isinstance(data, torch.Tensor):
        tensors = (data,)
    else:
        tensors = tuple(data) if isinstance(data, tuple | list) else ()
    if not tensors or not all(isinstance(x, torch.Tensor) for x in tensors):
        raise ValueError(
            "data must be a tensor (N, ...), a tuple of tensors with the same first dimension, "
            f"or a callable (batch_size, generator) -> batch; got {type(data).__name__}"
        )
    n = tensors[0].shape[0] if tensors[0].ndim else 0
    if n == 0 or any(x.ndim == 0 or x.shape[0] != n for x in tensors):
        raise ValueError(f"data tensors must be non-empty and share the first dimension, got shapes "
                         f"{[tuple(x.shape) for x in tensors]}")

    def batch(batch_size: int, generator: torch.Generator):
        idx = torch.randint(n, (batch_size,), generator=generator)
        out = tuple(x[idx.to(x.device)] for x in tensors)
        return out[0] if isinstance(data, torch.Tensor) else out

    return batch


def labelled_batch(batch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict | None]:
    """(x, cond) of a training batch: a tuple (x, labels) gives cond {"labels": labels}, a tensor no cond
    (what ``make_batch_sampler`` draws from (images, labels) or images; the class-conditional models of
    chapter 6 and the distillation rounds of chapter 5 read their batches this way)."""
    if isinstance(batch, tuple | list):
        return batch[0], {"labels": batch[1]}
    return batch, None


def to_device(batch, device):
    """Move a batch (a tensor, or tuples / lists / dicts of them) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


# ----------------------------------------------------------------------------- the loop


def train(
    model: torch.nn.Module,
    loss_fn: Callable | None,
    data,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    warmup: int = 100,
    grad_clip: float | None = 1.0,
    ema_decay: float = 0.999,
    seed: int = 0,
    checkpoint_dir=None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    progress: bool = True,
    log_every: int = 1,
    keep_checkpoints: int = 2,
    step: TrainStep | None = None,
    shards: int = 1,
    precision: str = "fp32",
    compile: bool | str = False,
) -> TrainResult:
    """Train ``model`` for ``steps`` optimisation steps (chapter 1 §4, Ho et al. 2020, Algorithm 1).

    Args:
        loss_fn: ``loss_fn(model, batch, generator)`` returns a scalar; its ``generator`` (on the model's
            device, seeded from ``seed``) is for the loss's own noise (t and eps). The step is then
            :class:`LossStep` with ``lr``, ``weight_decay``, ``warmup`` and ``grad_clip``.
        step: instead of ``loss_fn`` (pass ``loss_fn=None``): a :class:`TrainStep` that does a whole
            optimisation step itself, with its own optimisers (e.g. ``ddgan.DDGANStep``); ``lr`` and the
            other LossStep settings are then the step's business and must be left at their defaults.
        data: a tensor (N, ...), a tuple of tensors sampled with the same indices (e.g. images,
            labels), or a callable (batch_size, generator) -> batch. Batches are i.i.d. with
            replacement from a CPU generator seeded with ``seed``.
        ema_decay: EMA of ``model``'s weights after every step (see ``EMA``); 0 makes it the model.
        checkpoint_dir, checkpoint_every: save every so many steps and at the end (safetensors +
            JSON, the newest ``keep_checkpoints`` kept; 0 keeps all).
        resume: continue from the newest checkpoint in ``checkpoint_dir`` (start afresh if none);
            gives the same weights as an uninterrupted run.
        log_every: record the mean "loss" of every ``log_every`` steps in ``losses``.
        shards: split every batch into this many equal blocks, each with its own noise generator keyed
            by (seed, step, block) (``distributed.keyed_generator``), and average their gradients
            (gradient accumulation): the step gets a list of generators (LossStep and DDGANStep split
            their batch with ``distributed.accumulate``). 1 (default): one generator for the whole run.
        precision: "fp32" (default), "bf16" (autocast of the loss) or "auto" (bf16 on a GPU that
            supports it, else fp32). compile: ``torch.compile`` the network (True, False, or "auto":
            on a GPU only). Both for LossStep.

    Under ``torchrun`` (a process group of W > 1 processes; ``distributed.init_from_env``),
    ``batch_size`` is per process: each step draws one global batch of W x batch_size examples with
    the shared data generator and every process trains on its block, with that block's keyed noise,
    through DistributedDataParallel. This equals one process with batch W x batch_size and
    ``shards=W``. The EMA, the checkpoints and the progress bar are rank 0's (the EMA is broadcast to
    every rank at the end, so each returns the same ``ema_model``); every rank resumes from the same
    checkpoint.

    Dropout and other global-RNG use run in a forked RNG seeded with ``seed`` (plus the rank), so the
    caller's global RNG is untouched. Returns ``TrainResult``; the model and the step's modules are
    left in eval mode.
    """
    if steps < 0 or batch_size < 1 or log_every < 1 or warmup < 0:
        raise ValueError("need steps >= 0, batch_size >= 1, log_every >= 1 and warmup >= 0")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive step count or None, got {checkpoint_every}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir (the folder the earlier run saved to)")
    if not isinstance(shards, int) or shards < 1 or batch_size % shards:
        raise ValueError(f"shards must be a positive integer that divides batch_size ({batch_size}), "
                         f"got {shards!r}")
    param = next(iter(model.parameters()), None)
    if param is None:
        raise ValueError("the model has no parameters to train")
    device = param.device
    precision, compile = resolve_precision(precision, device), resolve_compile(compile, device)
    if step is None:
        if loss_fn is None:
            raise ValueError("give either loss_fn(model, batch, generator) or step= (a TrainStep)")
        step = LossStep(model, loss_fn, lr=lr, weight_decay=weight_decay, warmup=warmup, grad_clip=grad_clip,
                        precision=precision, compile=compile)
    elif loss_fn is not None:
        raise ValueError("give loss_fn or step=, not both: a TrainStep computes its own loss")
    elif not isinstance(step, TrainStep):
        raise ValueError("step must be a TrainStep: a callable (index, batch, generator) -> dict of losses "
                         "with the attributes optimizers, modules, settings and description")
    elif precision != "fp32" or compile:
        raise ValueError("precision and compile are LossStep's; a custom step= runs in fp32 and compiles "
                         "nothing (leave them at their defaults)")
    rank, world_size = distributed.world()
    if world_size > 1 and not callable(getattr(step, "distribute", None)):
        raise ValueError(f"{type(step).__name__} has no distribute(device): it cannot train under torchrun")
    blocks = world_size * shards                      # blocks of the global batch, each with keyed noise
    sample_batch = make_batch_sampler(data)
    settings = dict(batch_size=world_size * batch_size, ema_decay=ema_decay, seed=seed, log_every=log_every,
                    **step.settings)
    if blocks > 1:
        settings["blocks"] = blocks

    data_gen = torch.Generator().manual_seed(seed)
    loss_gen = torch.Generator(device=device).manual_seed(seed + 1)
    cuda = device.type == "cuda"
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None

    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.manual_seed(seed + rank)
        if cuda:
            torch.cuda.manual_seed(seed + rank)
        ema = EMA(model, ema_decay)
        start, losses, window, history = 0, [], [0.0, 0], {}
        ckpt = latest_checkpoint(folder) if resume else None
        if ckpt is not None:
            meta = json.loads(ckpt.with_suffix(".json").read_text())
            old = meta["settings"]
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            if diff:
                raise ValueError(
                    f"cannot resume from {ckpt}: settings differ (checkpoint, now): {diff}; "
                    "use the same settings or a fresh checkpoint_dir"
                )
            tensors = load_file(str(ckpt) + ".safetensors")  # on CPU; load_state_dict moves them
            _load_tensors(model, tensors, "model/", ckpt)
            _load_tensors(ema.model, tensors, "ema/", ckpt)
            for name, module in step.modules.items():
                _load_tensors(module, tensors, f"module.{name}/", ckpt)
            for name, opt in step.optimizers.items():
                _load_optimizer(opt, tensors, meta["optimizers"][name], f"optim.{name}/")
            ema.num_updates = meta["ema_num_updates"]
            start, losses, window, history = meta["step"], meta["losses"], meta["window"], meta["history"]
            data_gen.set_state(_rng_from_list(meta["rng"]["data"]))
            loss_gen.set_state(_rng_from_list(meta["rng"]["loss"]))
            per_rank = meta["rng"].get("ranks", [])          # each process's own global RNG, if saved
            own = per_rank[rank] if rank < len(per_rank) else meta["rng"]
            torch.set_rng_state(_rng_from_list(own["torch"]))
            if cuda and "cuda" in own:
                torch.cuda.set_rng_state(_rng_from_list(own["cuda"]), device)
        if world_size > 1:
            step.distribute(device)        # after the resume: DDP starts every rank from rank 0's weights

        def checkpoint(done: int) -> None:
            own = {"torch": _rng_to_list(torch.get_rng_state())}
            if cuda:
                own["cuda"] = _rng_to_list(torch.cuda.get_rng_state(device))
            ranks = distributed.all_gather_objects(own)
            if rank == 0:
                rng = {"data": _rng_to_list(data_gen.get_state()), "loss": _rng_to_list(loss_gen.get_state()),
                       **own}
                if world_size > 1:
                    rng["ranks"] = list(ranks)
                meta = {"settings": settings, "steps": steps, "losses": losses, "window": window,
                        "history": history, "rng": rng, "model_class": type(model).__name__,
                        "model_config": getattr(model, "config", None)}
                ema.sync(model)
                _save_checkpoint(folder, done, model, ema, step, meta, keep_checkpoints)
            distributed.barrier()          # no rank reads a checkpoint before it is complete

        t0 = time.perf_counter()
        model.train()
        for module in step.modules.values():
            module.train()
        bar = tqdm(total=steps, initial=min(start, steps), disable=not progress or rank != 0,
                   desc=step.description)
        try:
            for index in range(start, steps):
                batch = sample_batch(world_size * batch_size, data_gen)       # the global batch
                if world_size > 1:
                    batch = distributed.split_blocks(batch, world_size)[rank]  # this process's block
                if blocks == 1:
                    gen = loss_gen
                else:
                    gens = [distributed.keyed_generator(seed, index, rank * shards + j, device)
                            for j in range(shards)]
                    gen = gens if shards > 1 else gens[0]
                logged = distributed.mean_over_ranks(step(index, to_device(batch, device), gen), device)
                if rank == 0:
                    ema.update(model)
                for key, value in logged.items():
                    if not math.isfinite(value):
                        raise NonFiniteLossError(f"{key} is {value} at step {index}: lower the learning rate "
                                                 "and check that the data is finite and scaled to [-1, 1]")
                    history.setdefault(key, []).append(value)
                if "loss" in logged:
                    window[0] += logged["loss"]
                    window[1] += 1
                    if window[1] == log_every:
                        losses.append(window[0] / log_every)
                        window = [0.0, 0]
                if progress and index % 25 == 0:
                    bar.set_postfix({k: f"{v:.4f}" for k, v in logged.items()}, refresh=False)
                bar.update(1)
                done = index + 1
                if folder is not None and checkpoint_every and done % checkpoint_every == 0 and done < steps:
                    checkpoint(done)
        finally:
            bar.close()
        ema.sync(model)
        if folder is not None and (ckpt is None or start < steps):
            checkpoint(max(start, steps))
    model.eval()
    for module in step.modules.values():
        module.eval()
    distributed.broadcast_module(ema.model)      # every rank returns rank 0's EMA (the next round's teacher)
    return TrainResult(model=model, ema_model=ema.model, losses=list(losses),
                       steps=max(start, steps), seconds=time.perf_counter() - t0, history=history,
                       batch_size=batch_size)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" on a CUDA device that supports bf16, else "fp32"; "fp32" / "bf16" as given."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}")
    return precision


def resolve_compile(compile: bool | str, device: torch.device) -> bool:
    """"auto" -> torch.compile on CUDA devices only (on a CPU its cold compile costs more than it saves)."""
    if compile == "auto":
        return device.type == "cuda"
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    return compile
