"""The one training loop: AdamW, linear warm-up, gradient clipping, EMA, checkpoints, exact resume.

Every method of the book trains through ``train(model, loss_fn, data, steps)``; only ``loss_fn``
changes (DDPM's L_simple, Ho et al. 2020, Algorithm 1; a distillation or GAN loss later).
The exponential moving average of the weights is what DDPM samples from (Ho et al. 2020,
Appendix B, decay 0.9999); here with TensorFlow's warm-up min(decay, (1 + n) / (10 + n)) so
that short CPU runs are not dominated by the initial weights.

Checkpoints never pickle: tensors go to safetensors, everything else (step, settings, optimiser
scalars, random-generator states, losses) to JSON. Batches are drawn i.i.d. with replacement
from a seeded generator, so resuming from a checkpoint reproduces an uninterrupted run bit for
bit on CPU.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .diffusion import NonFiniteLossError

__all__ = [
    "EMA",
    "NonFiniteLossError",
    "TrainResult",
    "latest_checkpoint",
    "load_config",
    "load_model",
    "save_model",
    "train",
]

# Settings that must match between a checkpoint and the run that resumes it.
_RESUME_KEYS = ("batch_size", "lr", "weight_decay", "warmup", "grad_clip", "ema_decay", "seed", "log_every")


class EMA:
    """Exponential moving average of a model's parameters, kept in a frozen copy ``ema.model``.

    ``update(model)`` sets p_ema <- d p_ema + (1 - d) p with d = min(decay, (1 + n) / (10 + n)) after
    n previous updates; buffers are copied.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)
        self.num_updates += 1


@dataclass
class TrainResult:
    """Result of ``train``: both models (eval mode), logged losses, steps done, wall time of this call."""

    model: torch.nn.Module
    ema_model: torch.nn.Module
    losses: list[float]
    steps: int
    seconds: float


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


def _optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{idx}/{k}"] = v.detach().to("cpu").contiguous().clone()
            else:
                scalars[f"{idx}/{k}"] = _json_value(v)
    groups = [{k: _json_value(v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "state_scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
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


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- model files


def _weights_path(path) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


def save_model(model: torch.nn.Module, path, config: dict | None = None) -> Path:
    """Save weights to ``path`` (.safetensors) and ``config`` (default: ``model.config``) to a .json."""
    weights = _weights_path(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    config = dict(getattr(model, "config", {}) if config is None else config)
    save_file(_tensors(model, ""), str(weights))
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
    """Path (without suffix) of the newest complete checkpoint ``ckpt_<step>`` in the folder, or None."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("ckpt_*.json") if p.with_suffix(".safetensors").exists()]
    if not done:
        return None
    return max(done, key=lambda p: int(p.stem.split("_")[1])).with_suffix("")


def _save_checkpoint(folder: Path, step: int, model, ema: EMA, opt, meta: dict, keep: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / f"ckpt_{step:08d}"
    opt_tensors, opt_meta = _optimizer_state(opt)
    tensors = {**_tensors(model, "model/"), **_tensors(ema.model, "ema/"), **opt_tensors}
    save_file(tensors, str(base) + ".safetensors")
    _write_json(base.with_suffix(".json"), {**meta, "step": step, "optimizer": opt_meta,
                                           "ema_num_updates": ema.num_updates})
    if keep:
        old = sorted(folder.glob("ckpt_*.json"), key=lambda p: int(p.stem.split("_")[1]))[:-keep]
        for p in old:
            p.unlink()
            p.with_suffix(".safetensors").unlink(missing_ok=True)


# ----------------------------------------------------------------------------- data


def _make_sampler(data) -> Callable[[int, torch.Generator], object]:
    """Return batch(batch_size, generator) for a tensor, a tuple of tensors or a callable."""
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


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, tuple | list):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


# ----------------------------------------------------------------------------- the loop


def train(
    model: torch.nn.Module,
    loss_fn: Callable,
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
) -> TrainResult:
    """Train ``model`` for ``steps`` optimiser steps on ``loss_fn(model, batch, generator)``.

    Args:
        data: a tensor (N, ...), a tuple of tensors sampled with the same indices (e.g. images,
            labels), or a callable (batch_size, generator) -> batch. Batches are i.i.d. with
            replacement from a CPU generator seeded with ``seed``.
        loss_fn: returns a scalar; its ``generator`` (on the model's device, seeded from ``seed``)
            is for the loss's own noise (t and eps).
        lr, weight_decay: AdamW; the learning rate rises linearly over ``warmup`` steps.
        grad_clip: clip the global gradient norm (None or 0: no clipping).
        ema_decay: EMA of the weights (see ``EMA``).
        checkpoint_dir, checkpoint_every: save every so many steps and at the end (safetensors +
            JSON, the newest ``keep_checkpoints`` kept; 0 keeps all).
        resume: continue from the newest checkpoint in ``checkpoint_dir`` (start afresh if none);
            gives the same weights as an uninterrupted run.
        log_every: record the mean loss of every ``log_every`` steps in ``losses``.

    Dropout and other global-RNG use run in a forked RNG seeded with ``seed``, so the caller's
    global RNG is untouched. Returns ``TrainResult``; both models are left in eval mode.
    """
    if steps < 0 or batch_size < 1 or log_every < 1 or warmup < 0:
        raise ValueError("need steps >= 0, batch_size >= 1, log_every >= 1 and warmup >= 0")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive step count or None, got {checkpoint_every}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir (the folder the earlier run saved to)")
    sample_batch = _make_sampler(data)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    device = params[0].device
    settings = dict(batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup=warmup,
                    grad_clip=grad_clip, ema_decay=ema_decay, seed=seed, log_every=log_every)

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    data_gen = torch.Generator().manual_seed(seed)
    loss_gen = torch.Generator(device=device).manual_seed(seed + 1)
    cuda = device.type == "cuda"
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None

    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)
        ema = EMA(model, ema_decay)
        start, losses, window = 0, [], [0.0, 0]
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
            _load_optimizer(opt, tensors, meta["optimizer"])
            ema.num_updates = meta["ema_num_updates"]
            start, losses, window = meta["step"], meta["losses"], meta["window"]
            data_gen.set_state(_rng_from_list(meta["rng"]["data"]))
            loss_gen.set_state(_rng_from_list(meta["rng"]["loss"]))
            torch.set_rng_state(_rng_from_list(meta["rng"]["torch"]))
            if cuda and "cuda" in meta["rng"]:
                torch.cuda.set_rng_state(_rng_from_list(meta["rng"]["cuda"]), device)

        def checkpoint(step: int) -> None:
            rng = {"data": _rng_to_list(data_gen.get_state()), "loss": _rng_to_list(loss_gen.get_state()),
                   "torch": _rng_to_list(torch.get_rng_state())}
            if cuda:
                rng["cuda"] = _rng_to_list(torch.cuda.get_rng_state(device))
            meta = {"settings": settings, "steps": steps, "losses": losses, "window": window, "rng": rng,
                    "model_class": type(model).__name__, "model_config": getattr(model, "config", None)}
            _save_checkpoint(folder, step, model, ema, opt, meta, keep_checkpoints)

        def one_step(step: int) -> float:
            """Warm-up lr, draw a batch, loss, backward, clip, AdamW step, EMA update."""
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
            batch = _to(sample_batch(batch_size, data_gen), device)
            loss = loss_fn(model, batch, loss_gen)
            value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"loss is {value} at step {step}: lower the learning rate (lr={lr}), keep grad_clip "
                    "on, check that the data is finite and scaled to [-1, 1]; with checkpoints, "
                    "resume=True restarts from the last good state"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
                if not torch.isfinite(norm):
                    raise NonFiniteLossError(
                        f"gradient norm is {float(norm)} at step {step} (loss {value:.4g}): lower the "
                        f"learning rate (lr={lr}) and check the data and the loss for divisions by ~0"
                    )
            opt.step()
            ema.update(model)
            return value

        t0 = time.perf_counter()
        model.train()
        bar = tqdm(total=steps, initial=min(start, steps), disable=not progress, desc="train")
        try:
            for step in range(start, steps):
                window[0] += one_step(step)
                window[1] += 1
                if window[1] == log_every:
                    losses.append(window[0] / log_every)
                    window = [0.0, 0]
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
                bar.update(1)
                done = step + 1
                if folder is not None and checkpoint_every and done % checkpoint_every == 0 and done < steps:
                    checkpoint(done)
        finally:
            bar.close()
        if folder is not None and (ckpt is None or start < steps):
            checkpoint(max(start, steps))
    model.eval()
    return TrainResult(model=model, ema_model=ema.model, losses=list(losses), steps=max(start, steps),
                       seconds=time.perf_counter() - t0)
