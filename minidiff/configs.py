"""Named experiment configs, each in two sizes: "small" (2-core CPU) and "full" (one GPU).

A config is a plain dict::

    {"name": ..., "size": "small" | "full", "architecture": "mlp" | "unet",
     "data": {...},        # which data set and how much (see minidiff.data)
     "model": {...},       # keyword arguments of MLPDenoiser or UNet (by "architecture")
     "train": {...},       # keyword arguments of minidiff.train.train
     "diffusion": {"schedule", "T", "prediction", "weighting"},
     "sample": {"n", "steps"}}

so a chapter runs ``UNet(**cfg["model"])`` and ``train(model, loss_fn, data, **cfg["train"])``.
Later chapters add their configs with ``register_config``.
"""

from __future__ import annotations

import copy
import os

__all__ = ["SIZES", "resolve_size", "register_config", "config_names", "get_config"]

SIZES = ("small", "full")

_REGISTRY: dict[str, dict[str, dict]] = {}


def resolve_size(size: str = "auto") -> str:
    """Return "small" or "full".

    The environment variable ``MINIDIFF_SIZE`` ("small" or "full"), when set, wins over the
    argument (CI sets ``small``). Otherwise "auto" means "full" if CUDA is available, else "small".
    """
    if size not in ("auto", *SIZES):
        raise ValueError(f"size must be 'auto', 'small' or 'full', got {size!r}.")
    env = os.environ.get("MINIDIFF_SIZE", "").strip()
    if env:
        if env.lower() not in SIZES:
            raise ValueError(
                f"Environment variable MINIDIFF_SIZE={env!r} is not valid: set it to 'small' or 'full', "
                "or unset it."
            )
        return env.lower()
    if size == "auto":
        import torch

        return "full" if torch.cuda.is_available() else "small"
    return size


def register_config(name: str, small: dict, full: dict) -> None:
    """Add (or replace) the named config with its two sizes."""
    for size, cfg in (("small", small), ("full", full)):
        missing = {"data", "model", "train", "diffusion", "sample"} - set(cfg)
        if missing:
            raise ValueError(f"config {name!r} ({size}) lacks the keys {sorted(missing)}.")
    _REGISTRY[name] = {"small": copy.deepcopy(small), "full": copy.deepcopy(full)}


def config_names() -> list[str]:
    """Names of the registered configs."""
    return sorted(_REGISTRY)


def get_config(name: str, size: str = "auto") -> dict:
    """A deep copy of the named config at the resolved size (see ``resolve_size``)."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown config {name!r}. Known configs: {config_names()}.")
    size = resolve_size(size)
    cfg = copy.deepcopy(_REGISTRY[name][size])
    return {"name": name, "size": size, **cfg}


# ---------------------------------------------------------------------------------------------- chapter 1
# small: sized so that chapter 1 (both trainings and all its 1000-step sampling) runs in a few minutes
# on a 2-core CPU; the chapter's table reports what these configs reach. On digits, base_channels=32 and
# 2000 steps get closer to the floor but train about 3x longer.

_DDPM = {"schedule": "linear", "T": 1000, "prediction": "eps", "weighting": "eps"}

register_config(
    "ddpm_toy",
    small={
        "architecture": "mlp",
        "data": {"dataset": "25gaussians", "n": 20000},
        "model": {"dim": 2, "hidden": 128, "depth": 3, "emb_dim": 64},
        "train": {
            "steps": 2000,
            "batch_size": 256,
            "lr": 2e-3,
            "warmup": 100,
            "ema_decay": 0.995,
            "grad_clip": 1.0,
            "seed": 0,
        },
        "diffusion": dict(_DDPM),
        "sample": {"n": 1000, "steps": 1000},
    },
    full={
        "architecture": "mlp",
        "data": {"dataset": "25gaussians", "n": 100000},
        "model": {"dim": 2, "hidden": 256, "depth": 4, "emb_dim": 128},
        "train": {
            "steps": 30000,
            "batch_size": 1024,
            "lr": 1e-3,
            "warmup": 500,
            "ema_decay": 0.999,
            "grad_clip": 1.0,
            "seed": 0,
        },
        "diffusion": dict(_DDPM),
        "sample": {"n": 10000, "steps": 1000},
    },
)

register_config(
    "ddpm_digits",
    small={
        "architecture": "unet",
        "data": {"dataset": "digits", "size": 8, "split": "train"},
        "model": {
            "in_channels": 1,
            "base_channels": 16,
            "channel_mults": (1, 2),
            "num_res_blocks": 1,
            "attention_resolutions": (),
            "dropout": 0.0,
            "image_size": 8,
        },
        "train": {
            "steps": 1200,
            "batch_size": 128,
            "lr": 2e-3,
            "warmup": 100,
            "ema_decay": 0.995,
            "grad_clip": 1.0,
            "seed": 0,
        },
        "diffusion": dict(_DDPM),
        "sample": {"n": 128, "steps": 1000},
    },
    full={
        "architecture": "unet",
        "data": {"dataset": "digits", "size": 16, "split": "train"},
        "model": {
            "in_channels": 1,
            "base_channels": 64,
            "channel_mults": (1, 2, 2),
            "num_res_blocks": 2,
            "attention_resolutions": (8,),
            "dropout": 0.1,
            "image_size": 16,
        },
        "train": {
            "steps": 30000,
            "batch_size": 128,
            "lr": 2e-4,
            "warmup": 1000,
            "ema_decay": 0.9995,
            "grad_clip": 1.0,
            "seed": 0,
        },
        "diffusion": dict(_DDPM),
        "sample": {"n": 297, "steps": 1000},
    },
)
