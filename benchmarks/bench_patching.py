"""The cost of one step per patch size (Luhman & Luhman 2022, Table 1 and Sec. 3; Chapter 7; issue 12).

The same UNet (one width, one depth) is built for the patch grid of each P (``patching.patched_unet_kwargs``:
C P^2 channels in and out, image size H / P) and wrapped in ``patching.Patched``. For each P, on images
of H x H (default 32) and batch B (default 32), interleaved repeat after repeat in this one process:

* forward: CPU time of one forward pass under no_grad (a sampling step; images/s = B / that time);
* train step: CPU time of one forward, backward and Adam step of the x-prediction loss;
* activation memory: the bytes of the tensors that autograd saves for the backward pass of one training
  step (``torch.autograd.graph.saved_tensors_hooks``, each storage counted once). This is the activation
  memory the paper's 4x refers to. Parameters and optimiser state are not included.

Ratios are against P = 1. Target (issue 12): P = 4 at least 3x faster forward and 3.5x less activation
memory. Writes benchmarks/results/patching_cpu.{md,json} (or --out).
Usage:  python benchmarks/bench_patching.py [--size 32] [--batch 32] [--patches 1 2 4 8] [--repeats 7]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from minidiff import diffusion
from minidiff.nn import UNet
from minidiff.patching import Patched, patched_unet_kwargs, saved_activation_bytes
from minidiff.report import save_results
from minidiff.schedules import CosineSchedule

RESULTS = Path(__file__).parent / "results"


def build(P: int, size: int, width: int, mults: tuple[int, ...]) -> Patched:
    torch.manual_seed(0)
    net = UNet(
        **patched_unet_kwargs(
            P, 3, size, base_channels=width, channel_mults=mults, num_res_blocks=1, attention_resolutions=()
        )
    )
    return Patched(net, P)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=32, help="base_channels of every UNet")
    parser.add_argument("--mults", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--patches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "patching_cpu"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    schedule = CosineSchedule()
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).clamp(
        -1, 1
    )
    t = torch.rand(args.batch, generator=torch.Generator().manual_seed(1))
    models = {P: build(P, args.size, args.width, tuple(args.mults)) for P in args.patches}
    opts = {P: torch.optim.Adam(m.parameters(), lr=1e-4) for P, m in models.items()}

    def forward(P):
        with torch.no_grad():
            models[P](x, t)

    def train_step(P):
        loss = diffusion.training_loss(
            models[P], schedule, x, prediction="x", weighting="x", generator=torch.Generator().manual_seed(0)
        )
        opts[P].zero_grad(set_to_none=True)
        loss.backward()
        opts[P].step()

    for P in args.patches:  # warm-up
        forward(P)
        train_step(P)
    times = {(P, k): [] for P in args.patches for k in ("forward", "train")}
    for r in range(args.repeats):
        order = args.patches if r % 2 == 0 else args.patches[::-1]
        for P in order:
            for key, fn in (("forward", forward), ("train", train_step)):
                start = time.process_time()
                fn(P)
                times[(P, key)].append(time.process_time() - start)
    rows = []
    for P in args.patches:
        memory = saved_activation_bytes(
            lambda P=P: diffusion.training_loss(models[P], schedule, x, prediction="x", weighting="x",
                                                generator=torch.Generator().manual_seed(0)),
            exclude=models[P].parameters())
        models[P].zero_grad(set_to_none=True)
        rows.append(
            {
                "P": P,
                "grid": f"{args.size // P}x{args.size // P}x{3 * P * P}",
                "parameters": sum(p.numel() for p in models[P].parameters()),
                "forward ms": 1e3 * statistics.median(times[(P, "forward")]),
                "train step ms": 1e3 * statistics.median(times[(P, "train")]),
                "activation MiB": memory / 2**20,
            }
        )
    base = rows[0]
    for row in rows:
        row["images/s (forward)"] = args.batch / (row["forward ms"] / 1e3)
        row["forward speed-up vs P=1"] = base["forward ms"] / row["forward ms"]
        row["train speed-up vs P=1"] = base["train step ms"] / row["train step ms"]
        row["activation memory ratio P=1 / P"] = base["activation MiB"] / row["activation MiB"]
    cpu = platform.processor() or platform.machine()
    where = (
        f"cpu ({cpu}), {torch.get_num_threads()} torch thread(s), torch {torch.__version__}; "
        f"{args.size}x{args.size}x3 images, batch {args.batch}, UNet base_channels {args.width}, "
        f"channel_mults {tuple(args.mults)}, 1 res block per level; "
        f"CPU time, median of {args.repeats} interleaved repeats"
    )
    cols = list(rows[0])
    lines = [
        f"# patch size and the cost of a step ({where})",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for row in rows:
        lines.append(
            "| "
            + " | ".join(
                f"{v:,}" if isinstance(v, int) else f"{v:.2f}" if isinstance(v, float) else str(v)
                for v in row.values()
            )
            + " |"
        )
    four = next((r for r in rows if r["P"] == 4), None)
    if four is not None and base["P"] == 1:
        lines += [
            "",
            f"Target (P = 4 vs P = 1): forward at least 3x faster: {four['forward speed-up vs P=1']:.2f}x "
            f"({'met' if four['forward speed-up vs P=1'] >= 3 else 'NOT met'}); "
            f"activation memory at least 3.5x less: {four['activation memory ratio P=1 / P']:.2f}x "
            f"({'met' if four['activation memory ratio P=1 / P'] >= 3.5 else 'NOT met'}).",
        ]
    text = "\n".join(lines)
    save_results(args.out, text, {"where": where, "rows": rows})


if __name__ == "__main__":
    main()
