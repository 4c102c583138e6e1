"""Memory and time against image size: a full-image UNet and Patch-DM's patch network (Ding et al. 2023;
Chapter 8; issue 13).

For each image size S (default 32 ... 256) and one image (batch 1), with the widths of the chapter's patch
network (``patchdm_textures``, medium) and patch p (default 16):

* full UNet: a UNet built for S x S. Sampling: CPU time of one forward pass (no_grad) and its peak allocated
  memory (``patching.peak_allocated_bytes``, from the profiler). Training: the activation bytes autograd
  saves for one denoising loss (``patching.saved_activation_bytes``).
* Patch-DM: ``patchdm.FeatureCollage`` over the patch network, at once and streamed row by row
  (``stream=True``): time and peak of one call. Training: ``patchdm.patch_dm_loss`` on the S x S image (one
  2 x 2 block of patches per image, whatever S).

Writes benchmarks/results/patchdm_cpu.{md,json} (or --out).
Usage:  python benchmarks/bench_patchdm.py [--sizes 32 64 128 256] [--patch 16] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from minidiff import configs, diffusion, patchdm
from minidiff.nn import UNet
from minidiff.patching import peak_allocated_bytes, saved_activation_bytes
from minidiff.report import markdown_table, save_results
from minidiff.schedules import get_schedule

RESULTS = Path(__file__).parent / "results"
MIB = 2**20


def cpu_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return 1000 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "patchdm_cpu"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_cfg = configs.get_config("patchdm_textures", "medium")["model"]
    keys = ("base_channels", "channel_mults", "num_res_blocks", "attention_resolutions")
    widths = {k: model_cfg[k] for k in keys}
    schedule = get_schedule("linear", T=1000)
    torch.manual_seed(0)
    patch_net = patchdm.PatchDenoiser(args.patch, in_channels=1, **widths).eval()
    collage = patchdm.FeatureCollage(patch_net, args.patch)
    streamed = patchdm.FeatureCollage(patch_net, args.patch, stream=True)
    rows, t = [], torch.tensor([0.5])
    for size in args.sizes:
        torch.manual_seed(0)
        full = UNet(in_channels=1, image_size=size, **widths).eval()
        x = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        with torch.no_grad():
            full_ms = cpu_ms(lambda full=full, x=x: full(x, t), args.repeats)
            full_peak = peak_allocated_bytes(lambda full=full, x=x: full(x, t))
            col_ms = cpu_ms(lambda x=x: collage(x, t), args.repeats)
            col_peak = peak_allocated_bytes(lambda x=x: collage(x, t))
            str_ms = cpu_ms(lambda x=x: streamed(x, t), args.repeats)
            str_peak = peak_allocated_bytes(lambda x=x: streamed(x, t))
        gen = torch.Generator().manual_seed(0)
        def full_loss(full=full, x=x, gen=gen):
            return diffusion.training_loss(full.train(), schedule, x, generator=gen)

        def patch_loss(x=x, gen=gen):
            return patchdm.patch_dm_loss(patch_net.train(), schedule, x, args.patch, generator=gen)

        full_train = saved_activation_bytes(full_loss, exclude=list(full.parameters()))
        patch_train = saved_activation_bytes(patch_loss, exclude=list(patch_net.parameters()))
        patch_net.eval()
        rows.append({"size": size, "full_ms": full_ms, "full_peak_mib": full_peak / MIB,
                     "full_train_mib": full_train / MIB, "collage_ms": col_ms,
                     "collage_peak_mib": col_peak / MIB, "streamed_ms": str_ms,
                     "streamed_peak_mib": str_peak / MIB, "patch_train_mib": patch_train / MIB})
        print(rows[-1], flush=True)
    title = (f"memory and time against image size ({platform.machine()}, {args.threads} torch thread(s), "
             f"torch {torch.__version__}; batch 1; UNet {widths['base_channels']} x "
             f"{tuple(widths['channel_mults'])}; "
             f"Patch-DM patch {args.patch}; CPU time, median of {args.repeats})")
    head = ["image", "full UNet ms", "full UNet sampling peak MiB", "full UNet training MiB",
            "Patch-DM collage ms", "collage peak MiB", "streamed collage ms", "streamed peak MiB",
            "Patch-DM training MiB"]
    keys = ["full_ms", "full_peak_mib", "full_train_mib", "collage_ms", "collage_peak_mib", "streamed_ms",
            "streamed_peak_mib", "patch_train_mib"]
    table = markdown_table(head, [[f"{r['size']} x {r['size']}", *(r[k] for k in keys)] for r in rows],
                           [None] + [".2f"] * len(keys))
    lines = [f"# {title}", "", table]
    first, last = rows[0], rows[-1]
    area = (last["size"] / first["size"]) ** 2
    lines += ["", f"From {first['size']}^2 to {last['size']}^2 ({area:.0f}x the pixels): full UNet "
              f"training memory x{last['full_train_mib'] / first['full_train_mib']:.1f}, sampling peak "
              f"x{last['full_peak_mib'] / first['full_peak_mib']:.1f}; Patch-DM training memory "
              f"x{last['patch_train_mib'] / first['patch_train_mib']:.2f}, streamed sampling peak "
              f"x{last['streamed_peak_mib'] / first['streamed_peak_mib']:.1f}."]
    text = "\n".join(lines) + "\n"
    save_results(args.out, text, {"title": title, "rows": rows})


if __name__ == "__main__":
    main()
