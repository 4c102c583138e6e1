"""The training loop's own cost: ``train.train`` against a bare loop that does the same work.

The bare loop draws the same batches, computes the same loss, clips, steps AdamW and updates an EMA
with one foreach call per step, with nothing else (no checks, no logging, no progress bar). Both run
interleaved in one process, several repeats each, so a busy machine affects both alike; the table
gives the median ms per step and their ratio. Also timed: the EMA update alone, per-tensor (walking
the module tree on every step) against the foreach update of ``train.EMA``.

Usage:  python benchmarks/bench_train.py [--steps 300] [--repeats 5] [--threads 1]
Prints a Markdown table and saves it (with a JSON copy) to benchmarks/results/train_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from minidiff import configs, diffusion, schedules
from minidiff.pretrained import build_model, training_data
from minidiff.train import EMA, make_batch_sampler, train

RESULTS = Path(__file__).parent / "results"


def bare_loop(model, loss_fn, data, steps, batch_size, lr, warmup, grad_clip, ema_decay, seed):
    """The same optimisation as train.train with its default LossStep, written as plainly as possible."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    ema_model = [p.detach().clone() for p in params]
    data_gen, loss_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    batch = make_batch_sampler(data)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup)
        loss = loss_fn(model, batch(batch_size, data_gen), loss_gen)
        loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_model, [p.detach() for p in params], 1.0 - d)


def per_tensor_ema_update(ema_model, model, decay, n):
    """The EMA update as it was before: walk both module trees (parameters and buffers) every step."""
    d = min(decay, (1 + n) / (10 + n))
    with torch.no_grad():
        for e, p in zip(ema_model.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(ema_model.buffers(), model.buffers(), strict=True):
            e.copy_(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in ("ddpm_toy", "ddpm_digits"):
        cfg = configs.get_config(name, "medium")
        sched = schedules.get_schedule(cfg["diffusion"]["schedule"], T=cfg["diffusion"]["T"])

        def loss_fn(model, batch, generator, sched=sched):
            return diffusion.training_loss(model, sched, batch, generator=generator)

        x = training_data(cfg)
        kw = {k: cfg["train"][k] for k in ("batch_size", "lr", "warmup", "grad_clip", "ema_decay", "seed")}
        steps = args.steps if name == "ddpm_toy" else max(20, args.steps // 10)
        loop_ms, bare_ms = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            train(build_model(cfg), loss_fn, x, steps, progress=False, **kw)
            loop_ms.append(1000 * (time.perf_counter() - t0) / steps)
            t0 = time.perf_counter()
            bare_loop(build_model(cfg), loss_fn, x, steps, **kw)
            bare_ms.append(1000 * (time.perf_counter() - t0) / steps)
        model = build_model(cfg)
        ema = EMA(model, 0.999)
        ref = build_model(cfg).requires_grad_(False)
        walk_us, foreach_us = [], []
        for n in range(200):
            t0 = time.perf_counter()
            per_tensor_ema_update(ref, model, 0.999, n)
            walk_us.append(1e6 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            ema.update(model)
            foreach_us.append(1e6 * (time.perf_counter() - t0))
        loop, bare = statistics.median(loop_ms), statistics.median(bare_ms)
        rows.append({"config": f"{name} (medium)", "train_ms": round(loop, 3), "bare_ms": round(bare, 3),
                     "ratio": round(loop / bare, 3),
                     "ema_per_tensor_us": round(statistics.median(walk_us), 1),
                     "ema_foreach_us": round(statistics.median(foreach_us), 1)})
    lines = ["# The training loop's own cost", "",
             f"{platform.node()}, torch {torch.__version__}, {args.threads} thread(s), medians of "
             f"{args.repeats} interleaved repeats, {time.strftime('%Y-%m-%d %H:%M')}.", "",
             "| config | train() ms/step | bare loop ms/step | ratio | EMA per-tensor (us) "
             "| EMA foreach (us) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['train_ms']} | {r['bare_ms']} | {r['ratio']} | "
                     f"{r['ema_per_tensor_us']} | {r['ema_foreach_us']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_cpu.md").write_text(text)
    (RESULTS / "train_cpu.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
