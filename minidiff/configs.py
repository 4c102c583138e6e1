"""Named experiment configs, each in three sizes:

- "small": CI and nbval on a 2-core CPU, at most 2 minutes per chapter;
- "medium": the CPU runs whose outputs are stored in the book (at most about 15 minutes per chapter),
  so that tables have the sample sizes and seeds their statistics need;
- "full": one GPU; its cost per config is estimated (not measured: no GPU was available) by
  benchmarks/full_size_cost.py, from minutes for the toys to hours for chapter 8 on a T4.

A config is a plain dict::

    {"name": ..., "size": "small" | "medium" | "full", "architecture": "mlp" | "unet",
     "data": {...},        # which data set and how much (see minidiff.data)
     "model": {...},       # keyword arguments of MLPDenoiser or UNet (by "architecture")
     "train": {...},       # keyword arguments of minidiff.train.train
     "diffusion": {"schedule", "T", "prediction", "weighting"},
     "sample": {"n", "steps"}}

so a chapter runs ``UNet(**cfg["model"])`` and ``train(model, loss_fn, data, **cfg["train"])``.
Later chapters add their configs with ``register_config``. The full image configs train with
``"precision": "auto"`` and ``"compile": "auto"`` (bf16 autocast and torch.compile on a GPU, neither
on a CPU; ``train.resolve_precision``); the toy MLPs stay in fp32.
"""

from __future__ import annotations

import copy
import os
from typing import Any

__all__ = ["SIZES", "resolve_size", "register_config", "shrink", "config_names", "get_config"]

SIZES = ("small", "medium", "full")

_REGISTRY: dict[str, dict[str, dict]] = {}


def resolve_size(size: str = "auto") -> str:
    """Return "small", "medium" or "full".

    The environment variable ``MINIDIFF_SIZE`` ("small", "medium" or "full"), when set, wins over the
    argument (CI sets ``small``; the book's stored runs ``medium``). Otherwise "auto" means "full" if
    CUDA is available, else "small".
    """
    if size not in ("auto", *SIZES):
        raise ValueError(f"size must be 'auto', 'small', 'medium' or 'full', got {size!r}.")
    env = os.environ.get("MINIDIFF_SIZE", "").strip()
    if env:
        if env.lower() not in SIZES:
            raise ValueError(
                f"Environment variable MINIDIFF_SIZE={env!r} is not valid: set it to 'small', 'medium' or "
                "'full', or unset it."
            )
        return env.lower()
    if size == "auto":
        import torch

        return "full" if torch.cuda.is_available() else "small"
    return size


def register_config(name: str, full: dict, small: dict | None = None, medium: dict | None = None,
                    small_from_medium: dict | None = None) -> None:
    """Add (or replace) the named config with its sizes. ``medium`` defaults to ``small``; ``small`` may
    instead be given as changes to ``medium`` (``small_from_medium``, dotted paths as in :func:`shrink`)."""
    if small is None and medium is None:
        raise ValueError(f"config {name!r} needs a small or a medium size")
    if small_from_medium is not None:
        if medium is None or small is not None:
            raise ValueError("small_from_medium needs medium= and no small=")
        small = shrink(medium, **small_from_medium)
    small = medium if small is None else small
    medium = small if medium is None else medium
    for size, cfg in (("small", small), ("medium", medium), ("full", full)):
        missing = {"data", "model", "train", "diffusion", "sample"} - set(cfg)
        if missing:
            raise ValueError(f"config {name!r} ({size}) lacks the keys {sorted(missing)}.")
    _REGISTRY[name] = {"small": copy.deepcopy(small), "medium": copy.deepcopy(medium),
                       "full": copy.deepcopy(full)}


def shrink(config: dict, **changes: Any) -> dict:
    """A copy of ``config`` with entries replaced, by dotted path: ``shrink(cfg, **{"train.steps": 300})``.

    Used to derive the CI size ("small") from the stored-run size ("medium")."""
    out = copy.deepcopy(config)
    for path, value in changes.items():
        *parents, key = path.split(".")
        node = out
        for name in parents:
            node = node[name]
        if key not in node:
            raise ValueError(f"shrink: {path!r} is not an entry of the config")
        node[key] = value
    return out


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
    medium={
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
    small_from_medium={"train.steps": 400, "sample.n": 500},
)

register_config(
    "ddpm_digits",
    medium={
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
            "precision": "auto",      # bf16 autocast on a GPU that supports it, fp32 on a CPU
            "compile": "auto",        # torch.compile on a GPU only
        },
        "diffusion": dict(_DDPM),
        "sample": {"n": 297, "steps": 1000},
    },
    small_from_medium={"train.steps": 200, "sample.n": 64},
)

# ---- chapter 5
# Progressive distillation (Salimans & Ho 2022). The teacher is a continuous-time diffusion model on the
# cosine schedule with log-SNR clipped to [-20, 20], v-prediction and the SNR+1 (v-MSE) weighting, trained
# (or loaded from the cache) by pretrained.ddpm_model; "sample": {"steps"} is the teacher's full step count
# 2N. "distill" holds Algorithm 1's settings: the first student's step count N ("start_steps", a power of
# two; every round halves it, down to 1), the student's prediction and weighting, and the keyword arguments
# of minidiff.train.train for every round (the paper: no EMA, no warm-up, 50k steps per round at CIFAR-10).
# small: sized for a 2-core CPU (the chapter runs in a few minutes); full: one GPU.

_PD_DIFFUSION = {"schedule": "cosine_continuous", "T": None, "prediction": "v", "weighting": "snr+1"}

register_config(
    "pd_toy",
    medium={
        "architecture": "mlp",
        "data": {"dataset": "25gaussians", "n": 20000},
        "model": {"dim": 2, "hidden": 128, "depth": 3, "emb_dim": 64},
        "train": {"steps": 1000, "batch_size": 256, "lr": 2e-3, "warmup": 100, "ema_decay": 0.995,
                  "grad_clip": 1.0, "seed": 0},
        "diffusion": dict(_PD_DIFFUSION),
        "sample": {"n": 1000, "steps": 256},
        # 640 optimiser steps in all, spent where they matter: the last rounds (4 -> 2 -> 1 steps) are hard
        "distill": {"start_steps": 128, "prediction": "v", "weighting": "truncated_snr",
                    "train": {"steps": [20, 20, 40, 40, 80, 120, 160, 160], "batch_size": 256, "lr": 5e-4,
                              "warmup": 0, "ema_decay": 0.0, "grad_clip": 1.0}},
    },
    full={
        "architecture": "mlp",
        "data": {"dataset": "25gaussians", "n": 100000},
        "model": {"dim": 2, "hidden": 256, "depth": 4, "emb_dim": 128},
        "train": {"steps": 30000, "batch_size": 1024, "lr": 1e-3, "warmup": 500, "ema_decay": 0.999,
                  "grad_clip": 1.0, "seed": 0},
        "diffusion": dict(_PD_DIFFUSION),
        "sample": {"n": 10000, "steps": 1024},
        "distill": {"start_steps": 512, "prediction": "v", "weighting": "truncated_snr",
                    "train": {"steps": 2000, "batch_size": 1024, "lr": 2e-4, "warmup": 0, "ema_decay": 0.0,
                              "grad_clip": 1.0}},
    },
    small_from_medium={"train.steps": 400, "sample.steps": 64, "distill.start_steps": 32,
                       "distill.train.steps": 30},
)

register_config(
    "pd_digits",
    medium={
        "architecture": "unet",
        "data": {"dataset": "digits", "size": 8, "split": "train"},
        "model": {"in_channels": 1, "base_channels": 16, "channel_mults": (1, 2), "num_res_blocks": 1,
                  "attention_resolutions": (), "dropout": 0.0, "image_size": 8},
        "train": {"steps": 600, "batch_size": 128, "lr": 2e-3, "warmup": 100, "ema_decay": 0.995,
                  "grad_clip": 1.0, "seed": 0},
        "diffusion": dict(_PD_DIFFUSION),
        "sample": {"n": 128, "steps": 64},
        "distill": {"start_steps": 32, "prediction": "v", "weighting": "truncated_snr",
                    "train": {"steps": 60, "batch_size": 64, "lr": 5e-4, "warmup": 0, "ema_decay": 0.0,
                              "grad_clip": 1.0}},
    },
    full={
        "architecture": "unet",
        "data": {"dataset": "digits", "size": 16, "split": "train"},
        "model": {"in_channels": 1, "base_channels": 64, "channel_mults": (1, 2, 2), "num_res_blocks": 2,
                  "attention_resolutions": (8,), "dropout": 0.1, "image_size": 16},
        "train": {"steps": 30000, "batch_size": 128, "lr": 2e-4, "warmup": 1000, "ema_decay": 0.9995,
                  "grad_clip": 1.0, "seed": 0,
                  "precision": "auto", "compile": "auto"},
        "diffusion": dict(_PD_DIFFUSION),
        "sample": {"n": 297, "steps": 512},
        "distill": {"start_steps": 256, "prediction": "v", "weighting": "truncated_snr",
                    "train": {"steps": 2000, "batch_size": 128, "lr": 1e-4, "warmup": 0, "ema_decay": 0.0,
                              "grad_clip": 1.0}},
    },
    small_from_medium={"train.steps": 200, "sample.n": 64, "sample.steps": 16, "distill.start_steps": 8,
                       "distill.train.steps": 20},
)


# ---- chapter 4
# DDGAN (Xiao et al. 2022). "model" is the generator: a denoiser built with latent_dim, read as an
# x-prediction; "discriminator" holds the keyword arguments of nn.MLPDiscriminator ("mlp") or
# nn.ConvDiscriminator ("unet"); "train" those of ddgan.train_ddgan. The schedule is DDGAN's: the VP
# schedule (beta 0.1 -> 20) discretised to T steps (ddgan.ddgan_schedule). Adam betas (0.5, 0.9) as in the
# official code. small: a two-time-scale update (lr_d > lr_g; Heusel et al. 2017), because the paper's
# lr_d < lr_g learns too slowly in a few hundred steps, and on the 2-D toy R1 weight 0.2: its scale depends
# on the data (narrow 2-D modes need steep logits), and chapter 4's ablation measures 0, 0.02 (the paper's
# CIFAR-10 value), 0.2 and 2. "ddpm4_toy" is the DDPM baseline on the same 4-step schedule (train.train
# keyword arguments).

_DDGAN_DIFFUSION = {"schedule": "linear_vp", "beta_min": 0.1, "beta_max": 20.0, "T": 4, "prediction": "x"}

register_config(
    "ddgan_toy",
    medium={
        "architecture": "mlp",
        "data": {"dataset": "25gaussians", "n": 20000},
        "model": {"dim": 2, "hidden": 64, "depth": 2, "emb_dim": 32, "latent_dim": 16, "fourier_features": 0},
        "discriminator": {"dim": 2, "hidden": 64, "depth": 2, "emb_dim": 32, "fourier_features": 8},
        "train": {"steps": 400, "batch_size": 128, "lr_g": 5e-4, "lr_d": 2e-3, "betas_g": (0.5, 0.9),
                  "betas_d": (0.5, 0.9), "r1_gamma": 0.2, "lazy_reg": 15, "ema_decay": 0.99, "seed": 0},
        "diffusion": dict(_DDGAN_DIFFUSION),
        "sample": {"n": 1000, "steps": 4},
    },
    full={
        "architecture": "mlp",
        "data": {"dataset": "25gaussians", "n": 100000},
        "model": {"dim": 2, "hidden": 256, "depth": 4, "emb_dim": 128, "latent_dim": 32,
                  "fourier_features": 0},
        "discriminator": {"dim": 2, "hidden": 256, "depth": 4, "emb_dim": 128, "fourier_features": 8},
        "train": {"steps": 20000, "batch_size": 512, "lr_g": 2e-4, "lr_d": 4e-4, "betas_g": (0.5, 0.9),
                  "betas_d": (0.5, 0.9), "r1_gamma": 0.2, "lazy_reg": 15, "ema_decay": 0.999, "seed": 0},
        "diffusion": dict(_DDGAN_DIFFUSION),
        "sample": {"n": 10000, "steps": 4},
    },
    small_from_medium={"train.steps": 100, "sample.n": 500},
)

register_config(
    "ddgan_digits",
    medium={
        "architecture": "unet",
        "data": {"dataset": "digits", "size": 8, "split": "train"},
        "model": {"in_channels": 1, "base_channels": 8, "channel_mults": (1, 2), "num_res_blocks": 1,
                  "attention_resolutions": (), "dropout": 0.0, "image_size": 8, "latent_dim": 16},
        "discriminator": {"in_channels": 1, "base_channels": 16, "channel_mults": (1, 2), "image_size": 8,
                          "emb_dim": 32},
        "train": {"steps": 300, "batch_size": 64, "lr_g": 5e-4, "lr_d": 2e-3, "betas_g": (0.5, 0.9),
                  "betas_d": (0.5, 0.9), "r1_gamma": 0.02, "lazy_reg": 15, "ema_decay": 0.99, "seed": 0},
        "diffusion": dict(_DDGAN_DIFFUSION),
        "sample": {"n": 128, "steps": 4},
    },
    full={
        "architecture": "unet",
        "data": {"dataset": "digits", "size": 16, "split": "train"},
        "model": {"in_channels": 1, "base_channels": 64, "channel_mults": (1, 2, 2), "num_res_blocks": 2,
                  "attention_resolutions": (8,), "dropout": 0.0, "image_size": 16, "latent_dim": 100},
        "discriminator": {"in_channels": 1, "base_channels": 64, "channel_mults": (1, 2), "image_size": 16,
                          "emb_dim": 128},
        "train": {"steps": 20000, "batch_size": 64, "lr_g": 1.6e-4, "lr_d": 1.25e-4, "betas_g": (0.5, 0.9),
                  "betas_d": (0.5, 0.9), "r1_gamma": 0.02, "lazy_reg": 15, "ema_decay": 0.999, "seed": 0},
        "diffusion": dict(_DDGAN_DIFFUSION),
        "sample": {"n": 297, "steps": 4},
    },
    small_from_medium={"train.steps": 100, "sample.n": 32},
)

register_config(
    "ddpm4_toy",
    medium={
        "architecture": "mlp",
        "data": {"dataset": "25gaussians", "n": 20000},
        "model": {"dim": 2, "hidden": 64, "depth": 2, "emb_dim": 32},
        "train": {"steps": 400, "batch_size": 128, "lr": 2e-3, "warmup": 50, "ema_decay": 0.99,
                  "grad_clip": 1.0, "seed": 0},
        "diffusion": {"schedule": "linear_vp", "beta_min": 0.1, "beta_max": 20.0, "T": 4, "prediction": "eps",
                      "weighting": "eps"},
        "sample": {"n": 1000, "steps": 4},
    },
    full={
        "architecture": "mlp",
        "data": {"dataset": "25gaussians", "n": 100000},
        "model": {"dim": 2, "hidden": 256, "depth": 4, "emb_dim": 128},
        "train": {"steps": 20000, "batch_size": 1024, "lr": 1e-3, "warmup": 500, "ema_decay": 0.999,
                  "grad_clip": 1.0, "seed": 0},
        "diffusion": {"schedule": "linear_vp", "beta_min": 0.1, "beta_max": 20.0, "T": 4, "prediction": "eps",
                      "weighting": "eps"},
        "sample": {"n": 10000, "steps": 4},
    },
    small_from_medium={"train.steps": 100, "sample.n": 500},
)


# ---- chapter 6
# Guidance (Dhariwal & Nichol 2021; Ho & Salimans 2022; Meng et al. 2023). The class-conditional models are
# trained jointly with the label dropped with probability p_uncond (Ho & Salimans, Algorithm 1), on the
# chapter-5 continuous cosine schedule with v-prediction. "cfg_toy": the 25 Gaussians with their grid row as
# the class (5 classes). "cfg_digits": digits with their digit. Its "guide" entry holds chapter 6's other
# trainings: the noisy classifier p(y | z_t, t) (NoisyClassifier keyword arguments and train.train's),
# stage one of guided distillation (w ~ U[w_range], train.train's keyword arguments) and stage two
# (progressive distillation from start_steps down to 1 step), the CFG teacher's step count, the w sweep
# and the sample counts.

_CFG_DIFFUSION = dict(_PD_DIFFUSION, p_uncond=0.15)

register_config(
    "cfg_toy",
    medium={
        "architecture": "mlp",
        "data": {"dataset": "25gaussians", "n": 20000, "labels": "rows"},
        "model": {"dim": 2, "hidden": 128, "depth": 3, "emb_dim": 64, "num_classes": 5},
        "train": {"steps": 2000, "batch_size": 256, "lr": 2e-3, "warmup": 100, "ema_decay": 0.995,
                  "grad_clip": 1.0, "seed": 0},
        "diffusion": dict(_CFG_DIFFUSION),
        "sample": {"n": 1000, "steps": 64},
    },
    full={
        "architecture": "mlp",
        "data": {"dataset": "25gaussians", "n": 100000, "labels": "rows"},
        "model": {"dim": 2, "hidden": 256, "depth": 4, "emb_dim": 128, "num_classes": 5},
        "train": {"steps": 30000, "batch_size": 1024, "lr": 1e-3, "warmup": 500, "ema_decay": 0.999,
                  "grad_clip": 1.0, "seed": 0},
        "diffusion": dict(_CFG_DIFFUSION),
        "sample": {"n": 10000, "steps": 128},
    },
    small_from_medium={"train.steps": 300, "sample.n": 500, "sample.steps": 32},
)

register_config(
    "cfg_digits",
    medium={
        "architecture": "unet",
        "data": {"dataset": "digits", "size": 8, "split": "train", "labels": "digits"},
        "model": {"in_channels": 1, "base_channels": 16, "channel_mults": (1, 2), "num_res_blocks": 1,
                  "attention_resolutions": (), "dropout": 0.0, "image_size": 8, "num_classes": 10},
        "train": {"steps": 1200, "batch_size": 128, "lr": 2e-3, "warmup": 100, "ema_decay": 0.995,
                  "grad_clip": 1.0, "seed": 0},
        "diffusion": dict(_CFG_DIFFUSION),
        "sample": {"n": 500, "steps": 16},
        "guide": {
            "w_values": (0.0, 0.5, 1.0, 2.0, 4.0),
            "w_range": (0.0, 4.0),
            "classifier": {"model": {"in_channels": 1, "base_channels": 16, "channel_mults": (1, 2),
                                     "num_res_blocks": 1, "image_size": 8},
                           "train": {"steps": 600, "batch_size": 128, "lr": 2e-3, "warmup": 50,
                                     "ema_decay": 0.99, "grad_clip": 1.0, "seed": 0}},
            "stage_one": {"steps": 400, "batch_size": 128, "lr": 5e-4, "warmup": 0, "ema_decay": 0.0,
                          "grad_clip": 1.0, "seed": 0},
            "stage_two": {"start_steps": 8, "train": {"steps": 100, "batch_size": 128, "lr": 5e-4,
                                                      "warmup": 0, "ema_decay": 0.0, "grad_clip": 1.0}},
        },
    },
    full={
        "architecture": "unet",
        "data": {"dataset": "digits", "size": 16, "split": "train", "labels": "digits"},
        "model": {"in_channels": 1, "base_channels": 64, "channel_mults": (1, 2, 2), "num_res_blocks": 2,
                  "attention_resolutions": (8,), "dropout": 0.1, "image_size": 16, "num_classes": 10},
        "train": {"steps": 30000, "batch_size": 128, "lr": 2e-4, "warmup": 1000, "ema_decay": 0.9995,
                  "grad_clip": 1.0, "seed": 0,
                  "precision": "auto", "compile": "auto"},
        "diffusion": dict(_CFG_DIFFUSION),
        "sample": {"n": 1000, "steps": 64},
        "guide": {
            "w_values": (0.0, 0.5, 1.0, 2.0, 4.0),
            "w_range": (0.0, 4.0),
            "classifier": {"model": {"in_channels": 1, "base_channels": 64, "channel_mults": (1, 2, 2),
                                     "num_res_blocks": 2, "image_size": 16},
                           "train": {"steps": 10000, "batch_size": 128, "lr": 3e-4, "warmup": 500,
                                     "ema_decay": 0.999, "grad_clip": 1.0, "seed": 0}},
            "stage_one": {"steps": 10000, "batch_size": 128, "lr": 1e-4, "warmup": 0, "ema_decay": 0.0,
                          "grad_clip": 1.0, "seed": 0},
            "stage_two": {"start_steps": 32, "train": {"steps": 2000, "batch_size": 128, "lr": 1e-4,
                                                       "warmup": 0, "ema_decay": 0.0, "grad_clip": 1.0}},
        },
    },
    small_from_medium={"train.steps": 180, "sample.n": 150, "guide.classifier.train.steps": 60,
                       "guide.stage_one.steps": 40, "guide.stage_two.train.steps": 15},
)

# Chapter 7 (PDM, Luhman & Luhman 2022): patched UNets on 32 x 32 shapes. "model" is the network of the
# image ("patched_unet": a UNet on the patch grid of patch_size, patching.patched_unet); the chapter varies
# model.patch_size (Table 1 in miniature: the same width and number of updates for every P),
# diffusion.prediction (Sec. 3.2, all at the same sqrt(SNR) weighting) and diffusion.t_range (model
# splitting, Sec. 4.1). The official code's defaults: DDPM's linear betas, x-prediction with the sqrt(SNR)
# weighting of eq. (3), P = 4. Its "pdm" entry: the patch sizes of the trade-off, the SNR of the split, the
# width of the single network of the split's total size, a wider P = 4 network of about P = 1's step time,
# the held-out shapes and the feature classifier (metrics.train_classifier) of the image metrics.

_PDM_DIFFUSION = {"schedule": "linear", "T": 1000, "prediction": "x", "weighting": "sqrt_snr"}

register_config(
    "pdm_shapes",
    medium={
        "architecture": "patched_unet",
        "data": {"dataset": "shapes", "n": 2000, "resolution": 32},
        "model": {"patch_size": 4, "in_channels": 1, "image_size": 32, "base_channels": 16,
                  "channel_mults": (1, 2), "num_res_blocks": 1, "attention_resolutions": (), "dropout": 0.0},
        "train": {"steps": 300, "batch_size": 32, "lr": 2e-3, "warmup": 50, "ema_decay": 0.99,
                  "grad_clip": 1.0, "seed": 0},
        "diffusion": dict(_PDM_DIFFUSION),
        "sample": {"n": 250, "steps": 20},
        "pdm": {"patch_sizes": (1, 2, 4, 8), "split_snr": 0.25, "wide_base_channels": 24, "held_out": 1000,
                "wide_patched": {"patch_size": 4, "base_channels": 64},
                "classifier": {"steps": 400, "batch_size": 64, "width": 16, "feature_dim": 64}},
    },
    full={
        "architecture": "patched_unet",
        "data": {"dataset": "shapes", "n": 20000, "resolution": 32},
        "model": {"patch_size": 4, "in_channels": 1, "image_size": 32, "base_channels": 64,
                  "channel_mults": (1, 2), "num_res_blocks": 2, "attention_resolutions": (), "dropout": 0.0},
        "train": {"steps": 20000, "batch_size": 128, "lr": 2e-4, "warmup": 500, "ema_decay": 0.999,
                  "grad_clip": 1.0, "seed": 0,
                  "precision": "auto", "compile": "auto"},
        "diffusion": dict(_PDM_DIFFUSION),
        "sample": {"n": 2000, "steps": 100},
        "pdm": {"patch_sizes": (1, 2, 4, 8), "split_snr": 0.25, "wide_base_channels": 96, "held_out": 2000,
                "wide_patched": {"patch_size": 4, "base_channels": 256},
                "classifier": {"steps": 2000, "batch_size": 128, "width": 32, "feature_dim": 64}},
    },
    small_from_medium={"data.n": 400, "train.steps": 25, "sample.n": 48, "sample.steps": 8,
                       "pdm.held_out": 200, "pdm.classifier.steps": 60},
)

# Chapter 8 (Patch-DM, Ding et al. 2023): one patch network, trained on 32 x 32 crops of three bundled grey
# textures with Patch-DM's block loss ("loss": "patch_dm", patch 16: a 2 x 2 block of the padded 3 x 3
# grid), generates 128 x 128 images. Each training crop has its semantic code ("labels": "index"), dropped
# with p_uncond for classifier-free guidance. The official code: eps-prediction, DDPM's linear betas, DDIM
# with 50 steps, w = 0.5. Medium uses v-prediction (its SNR+1 loss) instead: at a few hundred updates
# eps-prediction's x-hat at high noise is useless (chapter 7 §4), and 20 DDIM steps. Its "patch_dm"
# entry: the guidance weights of the ablation and the texture classifier of the metrics.

register_config(
    "patchdm_textures",
    medium={
        "architecture": "patch_dm",
        "data": {"dataset": "texture_crops", "n": 1500, "size": 32, "images": ("brick", "grass", "gravel"),
                 "grayscale": True, "downscale": 2, "labels": "index"},
        "model": {"patch": 16, "num_images": 1500, "code_dim": 16, "position": True, "in_channels": 1,
                  "base_channels": 16, "channel_mults": (1, 2), "num_res_blocks": 1,
                  "attention_resolutions": (), "dropout": 0.0},
        "train": {"steps": 800, "batch_size": 16, "lr": 2e-3, "warmup": 50, "ema_decay": 0.995,
                  "grad_clip": 1.0, "seed": 0},
        "diffusion": {"schedule": "linear", "T": 1000, "prediction": "v", "weighting": "snr+1",
                      "loss": "patch_dm", "patch": 16, "p_uncond": 0.1},
        "sample": {"n": 4, "steps": 20, "size": 128},
        "patch_dm": {"guidance": (0.0, 0.5, 2.0), "classifier": {"steps": 300, "batch_size": 64}},
    },
    full={
        "architecture": "patch_dm",
        "data": {"dataset": "texture_crops", "n": 6000, "size": 64, "images": ("brick", "grass", "gravel"),
                 "grayscale": True, "downscale": 1, "labels": "index"},
        "model": {"patch": 32, "num_images": 6000, "code_dim": 64, "position": True, "in_channels": 1,
                  "base_channels": 64, "channel_mults": (1, 2, 2), "num_res_blocks": 2,
                  "attention_resolutions": (), "dropout": 0.1},
        "train": {"steps": 30000, "batch_size": 64, "lr": 2e-4, "warmup": 1000, "ema_decay": 0.9995,
                  "grad_clip": 1.0, "seed": 0,
                  "precision": "auto", "compile": "auto"},
        "diffusion": {"schedule": "linear", "T": 1000, "prediction": "eps", "weighting": "eps",
                      "loss": "patch_dm", "patch": 32, "p_uncond": 0.1},
        "sample": {"n": 16, "steps": 50, "size": 256},
        "patch_dm": {"guidance": (0.0, 0.5, 2.0), "classifier": {"steps": 1000, "batch_size": 64}},
    },
    small_from_medium={"data.n": 300, "model.num_images": 300, "train.steps": 40, "sample.n": 2,
                       "sample.steps": 10, "sample.size": 64, "patch_dm.classifier.steps": 40},
)
