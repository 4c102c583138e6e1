"""Speed of the core: training steps and sampling steps of every chapter-1 config, and the
overhead of the one sampling loop.

Prints a Markdown table and saves it (with a JSON copy) under benchmarks/results/.
Usage:  python benchmarks/bench_core.py [--sizes small full] [--train-steps 20] [--sample-steps 20]
Numbers are wall-clock medians on whatever machine runs it; the table records the device and
the number of torch threads. Speed targets live here, not in unit tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from minidiff import configs, diffusion, samplers, schedules
from minidiff.pretrained import build_model, training_data
from minidiff.train import train

RESULTS = Path(__file__).parent / "results"


def time_training(cfg, steps, device):
    """Median ms per step of minidiff.train.train (forward, backward, AdamW, EMA) at the config's batch."""
    sched = schedules.get_schedule(cfg["diffusion"]["schedule"], T=cfg["diffusion"]["T"])

    def loss_fn(model, batch, generator):
        return diffusion.training_loss(model, sched, batch, generator=generator)

    x = training_data(cfg).to(device)
    kwargs = {**cfg["train"], "steps": 3, "progress": False}
    train(build_model(cfg).to(device), loss_fn, x, **kwargs)  # warm-up
    t0 = time.perf_counter()
    train(build_model(cfg).to(device), loss_fn, x, **{**kwargs, "steps": steps})
    return 1000 * (time.perf_counter() - t0) / steps


def time_sampling(model, cfg, steps, device):
    """Median ms per sampling step (one network evaluation + DDPM step) at the config's sample size."""
    sched = schedules.get_schedule(cfg["diffusion"]["schedule"], T=cfg["diffusion"]["T"])
    n = cfg["sample"]["n"]
    shape = (n, 2) if cfg["architecture"] == "mlp" else (n, 1, cfg["data"]["size"], cfg["data"]["size"])
    model = model.to(device).eval()
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        samplers.sample(model, sched, samplers.ddpm_timesteps(steps), samplers.DDPMStep(), shape=shape,
                        generator=torch.Generator().manual_seed(0), progress=False, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        runs.append(1000 * (time.perf_counter() - t0) / steps)
    return statistics.median(runs), n


def loop_overhead(steps=200):
    """ms per step of the sampling loop itself, with a model that costs nothing."""
    sched = schedules.get_schedule("linear", T=1000)

    def zero_model(z, t):
        return torch.zeros_like(z)

    t0 = time.perf_counter()
    samplers.sample(zero_model, sched, samplers.ddpm_timesteps(steps), samplers.DDPMStep(), shape=(2, 2),
                    generator=torch.Generator().manual_seed(0), progress=False)
    return 1000 * (time.perf_counter() - t0) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["small"], choices=configs.SIZES)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--sample-steps", type=int, default=20)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for size in args.sizes:
        for name in ("ddpm_toy", "ddpm_digits"):
            cfg = configs.get_config(name, size)
            model = build_model(cfg)
            params = sum(p.numel() for p in model.parameters())
            ms_train = time_training(cfg, args.train_steps, device)
            ms_sample, n = time_sampling(model, cfg, args.sample_steps, device)
            rows.append({"config": name, "size": size, "params": params, "batch": cfg["train"]["batch_size"],
                         "ms_per_train_step": ms_train, "sample_n": n, "ms_per_sample_step": ms_sample,
                         "est_train_s": ms_train * cfg["train"]["steps"] / 1000,
                         "est_1000_step_sampling_s": ms_sample})
    overhead = loop_overhead()
    cpu = platform.processor() or platform.machine()
    where = f"{device}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, {cpu}"
    lines = [f"# core speed ({where})", "",
             "| config | size | params | batch | ms / train step | est. training (s) | samples "
             "| ms / sampling step | est. 1000-step sampling (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['size']} | {r['params']:,} | {r['batch']} "
                     f"| {r['ms_per_train_step']:.1f} | {r['est_train_s']:.0f} | {r['sample_n']} "
                     f"| {r['ms_per_sample_step']:.1f} "
                     f"| {r['est_1000_step_sampling_s']:.0f} |")
    lines += ["", f"sampling-loop overhead (model that costs nothing): {overhead:.2f} ms per step"]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stem = f"core_{device}_{'_'.join(args.sizes)}"
    (RESULTS / f"{stem}.md").write_text(text + "\n")
    record = {"where": where, "rows": rows, "loop_overhead_ms": overhead}
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
