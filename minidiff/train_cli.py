"""Train a config's model from the command line, on one process or several (README, "Training on several
GPUs").

    python -m minidiff.train_cli ddpm_digits --size full
    torchrun --nproc_per_node=2 -m minidiff.train_cli ddpm_digits --size full

What it trains is what the chapters train, through the one training loop (``train.train``), so that
under ``torchrun`` it is DistributedDataParallel with NCCL on GPUs and gloo on CPUs:

- ``--stage model`` (default): the config's network. A DDGAN config (chapter 4, it has a
  "discriminator") trains DDGAN's two-player step (``ddgan.train_config``); every other config its
  diffusion model with its loss (``pretrained.train_config``: DDPM, chapter 5's teachers, chapter 6's
  class-conditional models, chapter 7's patched networks, and one network of a split when the config's
  "diffusion" has a ``t_range``, chapter 8's Patch-DM).
- ``--stage distill``: chapter 5's progressive distillation rounds, from the model that ``--stage
  model`` saved in ``--out`` (a config with a "distill" entry).

The config's batch size is the *global* batch: with N processes each takes batch_size / N of it, with
noise keyed by example block, so N processes train what one process with ``--shards N`` trains. Rank
0 shows the progress and writes the checkpoints and the result (``--out``): the EMA weights as
safetensors + JSON (``train.save_model``), and with ``--cache`` also into the book's model cache, where
the chapters load it (``pretrained.ddpm_model``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import configs, ddgan, distillation, distributed, pretrained
from .train import load_model, save_model, to_device

__all__ = ["main", "parse_args", "run"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m minidiff.train_cli",
                                     description="Train a config's model, on one process or under torchrun.")
    parser.add_argument("config", help=f"a config name: {', '.join(configs.config_names())}")
    parser.add_argument("--size", default="auto", help="small, medium, full or auto (full with a GPU)")
    parser.add_argument("--stage", default="model", choices=("model", "distill"))
    parser.add_argument("--out", default=None, help="folder for checkpoints and the result "
                        "(default runs/<config>_<size>)")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the config's)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="global batch size (default: the config's)")
    parser.add_argument("--shards", type=int, default=1, help="blocks per process (gradient accumulation)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="save every so many steps")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--cache", action="store_true", help="also store the model in the book's model cache")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def _per_process_batch(global_batch: int, world_size: int, shards: int) -> int:
    if global_batch % (world_size * shards):
        raise ValueError(f"the global batch of {global_batch} does not split into {world_size} processes x "
                         f"{shards} shards: choose --batch-size as a multiple of {world_size * shards}")
    return global_batch // world_size


def run(args: argparse.Namespace) -> dict:
    """Train as ``args`` say; returns a summary (also written to <out>/summary.json by rank 0)."""
    rank, world_size, device = distributed.init_from_env(args.device)
    size = configs.resolve_size(args.size)
    config = configs.get_config(args.config, size)
    out = Path(args.out or f"runs/{args.config}_{size}")
    progress = not args.no_progress and rank == 0
    t0 = time.perf_counter()
    if args.stage == "model":
        overrides = {"steps": args.steps} if args.steps is not None else {}
        global_batch = args.batch_size or config["train"]["batch_size"]
        overrides["batch_size"] = _per_process_batch(global_batch, world_size, args.shards)
        run_config = {**config, "train": {**config["train"], **overrides, "batch_size": global_batch}}
        common = dict(progress=progress, checkpoint_dir=out / "checkpoints", resume=args.resume,
                      checkpoint_every=args.checkpoint_every, shards=args.shards, **overrides)
        if "discriminator" in config:
            if args.cache:
                raise ValueError("--cache is for diffusion models, which the chapters load; chapter 4 trains "
                                 "its DDGANs itself")
            result = ddgan.train_config(config, device=device, **common)
            ema, steps, seconds = result.ema_generator, result.steps, result.seconds
        else:
            result = pretrained.train_config(config, device=device, **common)
            ema, steps, seconds = result.ema_model, result.steps, result.seconds
        files = {"model": str(out / "model.safetensors")}
        if rank == 0:
            save_model(ema, out / "model", config={"minidiff_config": run_config, "train_seconds": seconds})
            if args.cache:
                files["cache"] = str(pretrained.store(ema, run_config))
    else:
        if "distill" not in config:
            raise ValueError(f"--stage distill needs a config with a 'distill' entry (pd_toy, pd_digits); "
                             f"{args.config} has none")
        teacher_file = out / "model.safetensors"
        if not teacher_file.exists():
            raise ValueError(f"no teacher at {teacher_file}: run --stage model with the same --out first")
        teacher = load_model(pretrained.seeded_model(config), teacher_file).to(device).eval()
        d = config["distill"]
        global_batch = args.batch_size or d["train"]["batch_size"]
        kwargs = {**d["train"], "batch_size": _per_process_batch(global_batch, world_size, args.shards)}
        if args.steps is not None:
            kwargs["steps"] = args.steps                  # per round
        schedule = pretrained.config_schedule(config)
        rounds = distillation.progressive_distillation(
            teacher, schedule, to_device(pretrained.training_data(config), device), d["start_steps"],
            prediction=d["prediction"], weighting=d["weighting"],
            teacher_prediction=config["diffusion"]["prediction"], progress=progress, shards=args.shards,
            **kwargs)
        steps, seconds = sum(r.steps for r in rounds), time.perf_counter() - t0
        files = {}
        if rank == 0:
            for r in rounds:
                path = save_model(r.student, out / f"student_{r.N}",
                                  config={"minidiff_config": config, "N": r.N})
                files[f"student_{r.N}"] = str(path)
    summary = {"config": args.config, "size": size, "stage": args.stage, "processes": world_size,
               "device": str(device), "steps": steps, "seconds": round(seconds, 3), "files": files}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"summary_{args.stage}.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary))
    distributed.barrier()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
