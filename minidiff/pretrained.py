"""Train-or-load the book's DDPM models, so that later chapters reuse chapter 1's networks.

``ddpm_model("ddpm_digits")`` trains the model of a named config exactly as chapter 1 does
(L_simple, Ho et al. 2020 Algorithm 1, through ``minidiff.train.train``) and caches its EMA
weights as safetensors + JSON under ``cache.cache_dir()``, keyed by a hash of the whole
config; the next call (in any chapter) loads them instead of training again. Parallel
notebooks train an entry once (``cache.load_or_build`` holds a file lock), and an entry that
does not load is trained again with a warning. Nothing is
downloaded: the weights always come from running this code. The same works for any config of
that form: chapter 5's teachers ("pd_toy", "pd_digits") are continuous-time models (cosine
schedule, ``"T": None``, times t ~ U(0, 1]) with v-prediction and the SNR+1 weighting.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import configs, data, diffusion, patchdm, schedules
from .cache import cache_dir, cache_lock, load_or_build
from .nn import MLPDenoiser, UNet
from .patching import patched_unet
from .train import TrainResult, labelled_batch, load_config, load_model, save_model, to_device, train

__all__ = ["PretrainedModel", "build_model", "cache_path", "config_schedule", "ddpm_model", "loss_function",
           "seeded_model", "store", "train_config", "training_data"]

ARCHITECTURES = {"mlp": MLPDenoiser, "unet": UNet, "patched_unet": patched_unet,
                 "patch_dm": patchdm.PatchDenoiser}


@dataclass
class PretrainedModel:
    """A trained EMA model with the config it came from and where its weights are cached."""

    model: torch.nn.Module
    config: dict
    schedule: schedules.NoiseSchedule
    path: Path | None
    train_seconds: float  # 0.0 when loaded from the cache
    losses: list[float] | None  # None when loaded from the cache
    recorded_seconds: float | None = None  # wall time of the run that trained these weights, also when
    #                                        loaded from the cache (None: cached before it was recorded)
    recorded_losses: list[float] | None = None  # that run's loss curve, also when loaded from the cache


def build_model(config: dict) -> torch.nn.Module:
    """An untrained network for a config ("architecture" "mlp" or "unet", kwargs in "model")."""
    arch = config.get("architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"config architecture must be one of {sorted(ARCHITECTURES)}, got {arch!r}.")
    return ARCHITECTURES[arch](**config["model"])


def training_data(config: dict) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The training set a config names: a 2-D toy set (n points, seed 6 as in chapter 1) or digit images.

    With ``"labels"`` in the data spec it is a pair (x, labels) for a class-conditional model (Chapter 6):
    digits with their digit (``"labels": "digits"``), or the 25 Gaussians with their grid row
    (``"labels": "rows"``, the same points as without labels). Chapter 7's ``"shapes"`` are
    ``data.shapes(n, resolution)`` drawn with ``seed`` (default 6); ``"labels": "shapes"`` adds the class."""
    spec = config["data"]
    labels = spec.get("labels")
    if spec["dataset"] == "texture_crops":   # Chapter 8: crops of bundled photos, with their index (codes)
        if labels not in (None, "index"):
            raise ValueError(f"texture crops take labels 'index' (or none); got {labels!r}.")
        crops = data.photo_crops(spec["n"], spec["size"], tuple(spec["images"]),
                                 grayscale=spec.get("grayscale", True),
                                 generator=torch.Generator().manual_seed(spec.get("seed", 6)),
                                 downscale=spec.get("downscale", 1))
        return crops if labels is None else (crops, torch.arange(spec["n"]))
    if spec["dataset"] == "shapes":
        if labels not in (None, "shapes"):
            raise ValueError(f"shapes data takes labels 'shapes' (or none); got {labels!r}.")
        images, kind = data.shapes(spec["n"], spec["resolution"],
                                   generator=torch.Generator().manual_seed(spec.get("seed", 6)))
        return images if labels is None else (images, kind)
    if spec["dataset"] == "digits":
        images, digit = data.digits(size=spec["size"], split=spec.get("split", "train"))
        if labels not in (None, "digits"):
            raise ValueError(f"digits data takes labels 'digits' (or none); got {labels!r}.")
        return images if labels is None else (images, digit)
    generator = torch.Generator().manual_seed(6)
    if labels is None:
        return data.toy_dataset(spec["dataset"], spec["n"], generator=generator)
    if labels != "rows" or spec["dataset"] != "25gaussians":
        raise ValueError(f"toy data takes labels 'rows' on '25gaussians' only; got {labels!r} on "
                         f"{spec['dataset']!r}.")
    return data.twenty_five_gaussians_with_rows(spec["n"], generator=generator)


def _key(config: dict) -> str:
    text = json.dumps({k: config[k] for k in ("architecture", "data", "model", "train", "diffusion")},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(config: dict, cache: bool | str | Path = True) -> Path:
    """Where the weights of a config's trained model are cached: ``cache_dir()/ddpm`` (cache=True) or
    the given folder, with a file name from the config's name and a hash of its training recipe."""
    folder = Path(cache) if not isinstance(cache, bool) else cache_dir() / "ddpm"
    return folder / f"{config.get('name', 'ddpm')}_{_key(config)}.safetensors"


def store(model: torch.nn.Module, config: dict, cache: bool | str | Path = True) -> Path:
    """Cache a model trained with `config` (chapter 1 stores its EMA models this way), so that
    ``ddpm_model(config)`` loads it instead of training again. Returns the path written."""
    if not isinstance(config, dict) or not {"architecture", "model", "train", "diffusion"} <= set(config):
        raise ValueError("store needs the config dict the model was trained with (configs.get_config(...)).")
    reference = build_model(config).state_dict()
    got = model.state_dict()
    if reference.keys() != got.keys() or any(reference[k].shape != got[k].shape for k in reference):
        raise ValueError("the model does not have the architecture its config describes; "
                         "store the model that was trained with this config.")
    path = cache_path(config, cache)
    with cache_lock(path):
        return save_model(model, path, config={"minidiff_config": config})


def config_schedule(config: dict) -> schedules.NoiseSchedule:
    """The noise schedule of a config's "diffusion" entry: ``schedules.get_schedule(name, T=T)``, or for
    "linear_vp" with a T (chapter 4's 4-step DDPM) the VP schedule discretised to T steps
    (``schedules.discretize``, the grid of ``ddgan.ddgan_schedule``)."""
    diff = config["diffusion"]
    if diff["schedule"] == "linear_vp" and diff.get("T"):
        vp = schedules.LinearVPSchedule(diff.get("beta_min", 0.1), diff.get("beta_max", 20.0))
        return schedules.discretize(vp, diff["T"])
    return schedules.get_schedule(diff["schedule"], T=diff.get("T"))


def seeded_model(config: dict) -> torch.nn.Module:
    """``build_model(config)`` initialised with the config's train seed, as chapter 1 does; the caller's
    global RNG is left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["train"].get("seed", 0))
        return build_model(config)


def loss_function(config: dict, schedule: schedules.NoiseSchedule):
    """The training loss ``loss_fn(net, batch, generator)`` of a config's "diffusion" entry: L_simple and
    its weightings (``diffusion.training_loss``, chapter 1 §4; labels and p_uncond for chapter 6, t_range
    for chapter 7's splits), or Patch-DM's block loss with the images' codes (chapter 8 §3)."""
    diff = config["diffusion"]

    def loss_fn(net, batch, generator):
        if diff.get("loss") == "patch_dm":      # Chapter 8: Patch-DM's block loss, with the images' codes
            x, index = batch if isinstance(batch, (tuple, list)) else (batch, None)
            cond = {"latent": net.code(index)} if getattr(net, "codes", None) is not None else None
            return patchdm.patch_dm_loss(net, schedule, x, diff["patch"], prediction=diff["prediction"],
                                         weighting=diff["weighting"], generator=generator, cond=cond,
                                         p_uncond=diff.get("p_uncond", 0.0) if cond else 0.0,
                                         p_drop_position=diff.get("p_drop_position", 0.0))
        x, cond = labelled_batch(batch)
        return diffusion.training_loss(net, schedule, x, prediction=diff["prediction"],
                                       weighting=diff["weighting"], generator=generator, cond=cond,
                                       p_uncond=diff.get("p_uncond", 0.0) if cond else 0.0,
                                       t_range=diff.get("t_range"))

    return loss_fn


def train_config(config: dict, device: str | torch.device = "cpu", progress: bool = True,
                 **overrides) -> TrainResult:
    """Build (seeded) and train the diffusion model of a config through ``train.train``, on its data.

    ``overrides`` replace entries of config["train"] or add ``train.train``'s other arguments
    (checkpoint_dir, resume, shards, ...). Runs under torchrun as it is (``train.train``).
    """
    schedule = config_schedule(config)
    return train(seeded_model(config).to(device), loss_function(config, schedule),
                 to_device(training_data(config), device), progress=progress,
                 **{**config["train"], **overrides})


def ddpm_model(name_or_config: str | dict, size: str = "auto", cache: bool | str | Path = True,
               device: str | torch.device = "cpu", progress: bool = True) -> PretrainedModel:
    """Train (or load from the cache) the diffusion model of a config; returns its EMA model.

    name_or_config: a config name for ``configs.get_config`` (e.g. "ddpm_toy", "ddpm_digits", chapter 5's
    "pd_toy") or a config dict of the same form; its "diffusion" entry names the schedule (with "T" for a
    discrete one, None for a continuous one), the prediction and the loss weighting of
    ``diffusion.training_loss``, and optionally its ``t_range`` (one network of a split model, Chapter 7).
    cache: True (``cache_dir()/ddpm``), a folder, or False (always train).
    """
    config = configs.get_config(name_or_config, size) if isinstance(name_or_config, str) else name_or_config
    schedule = config_schedule(config)

    def fresh_model() -> torch.nn.Module:
        return seeded_model(config)

    def build(path: Path | None) -> PretrainedModel:
        t0 = time.perf_counter()
        result = train_config(config, device=device, progress=progress)
        seconds = time.perf_counter() - t0
        ema = result.ema_model.eval()
        if path is not None:
            save_model(ema, path, config={"minidiff_config": config, "train_seconds": seconds,
                                          "losses": result.losses})
        return PretrainedModel(ema, config, schedule, path, seconds, result.losses, seconds, result.losses)

    def load(path: Path) -> PretrainedModel:
        model = load_model(fresh_model(), path)
        meta = load_config(path)
        return PretrainedModel(model.to(device).eval(), config, schedule, path, 0.0, None,
                               meta.get("train_seconds"), meta.get("losses"))

    if not cache:
        return build(None)
    # trained once even when notebooks run in parallel: the first holds the lock while it trains
    return load_or_build(cache_path(config, cache), load, build)
