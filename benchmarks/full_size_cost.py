"""What the ``full`` configs cost: measured per training step here, modelled for a GPU.

For every config at its full size: the main network's parameters; one training step at the full batch
(``train.LossStep``: forward, backward, clipping and AdamW; DDGAN: ``DDGANStep``, both players, on a step
without R1) counted in FLOPs (``torch.utils.flop_counter``) and in ATen operator calls (each a kernel
launch on a GPU), and timed on this machine (``--steps`` steps after one warm-up step); the config's step
count; the sampling work of its ``sample`` entry (``n`` samples x ``steps`` network calls, forward FLOPs).

The GPU columns are a **model, not a measurement** (no GPU was available when it was written): per step,
max(FLOPs / (utilisation x peak), operator calls x launch cost), for each ``--gpu NAME=TFLOPS`` (defaults:
Colab's T4 in fp32, 8.1 TFLOP/s, which has no bf16; an A100 in bf16, 312 TFLOP/s), at ``--utilisation``
(30%) and ``--launch-us`` (10 us per operator).
Run it with ``--device cuda`` on a GPU to replace the model by a measurement (the "measured" columns).

Only each config's main training run and its sampling are counted: the chapters' other runs (ablations,
distillation rounds, guidance stages, several patch sizes) come on top.

Usage:  python benchmarks/full_size_cost.py [--device cpu] [--steps 2] [--configs ddpm_toy,...]
Prints a Markdown table and saves it (with a JSON copy) to
benchmarks/results/full_size_cost_<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from minidiff import configs, ddgan, patchdm, pretrained
from minidiff.report import markdown_table, save_results
from minidiff.train import LossStep, make_batch_sampler, to_device

RESULTS = Path(__file__).parent / "results"


class OpCounter(TorchDispatchMode):
    """Counts ATen operator calls (on a GPU each is at least one kernel launch)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def one_step(cfg: dict, device: torch.device):
    """(step(), model, sample_forward(batch)) for one optimisation step of a config's main training."""
    data = to_device(pretrained.training_data(cfg), device)
    draw = make_batch_sampler(data)
    batch = draw(cfg["train"]["batch_size"], torch.Generator().manual_seed(0))
    gen = torch.Generator(device=device).manual_seed(1)
    if "discriminator" in cfg:
        G, D = (m.to(device) for m in ddgan.build(cfg))
        t = {k: cfg["train"][k] for k in ("lr_g", "lr_d", "betas_g", "betas_d", "r1_gamma", "lazy_reg")}
        sched = ddgan.ddgan_schedule(cfg["diffusion"]["T"])
        step = ddgan.DDGANStep(G, D, sched, cfg["train"]["steps"], **t)
        # index 1: a step without R1 (every lazy_reg-th step adds it; the FLOP counter cannot follow the
        # double backward of R1's autograd.grad)
        return (lambda: step(1, batch, gen)), G
    model = pretrained.seeded_model(cfg).to(device)
    t = cfg["train"]
    step = LossStep(model, pretrained.loss_function(cfg, pretrained.config_schedule(cfg)), lr=t["lr"],
                    warmup=t.get("warmup", 100), grad_clip=t.get("grad_clip", 1.0))  # train.train's step
    return (lambda: step(0, batch, gen)), model


def forward_flops(cfg: dict, model: torch.nn.Module, device: torch.device) -> float:
    """FLOPs of one network call on one example of the config's sampling shape."""
    side = cfg["sample"].get("size", cfg["data"].get("size", cfg["data"].get("resolution")))
    mlp = cfg["architecture"] == "mlp"
    shape = (1, cfg["model"]["dim"]) if mlp else (1, cfg["model"]["in_channels"], side, side)
    z, t = torch.randn(shape, device=device), torch.full((shape[0],), 0.5, device=device)
    kwargs = {}
    if "discriminator" in cfg:                      # DDGAN's generator: its latent u
        kwargs["latent"] = torch.randn(shape[0], cfg["model"]["latent_dim"], device=device)
    if cfg["architecture"] == "patch_dm":           # Patch-DM: the whole image, patch by patch, with a code
        kwargs["latent"] = model.code(torch.zeros(1, dtype=torch.long, device=device))
        model = patchdm.FeatureCollage(model, cfg["model"]["patch"])
    if cfg["model"].get("num_classes"):
        kwargs["labels"] = torch.zeros(shape[0], dtype=torch.long, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(z, t, **kwargs)
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per config (after a warm-up step)")
    parser.add_argument("--configs", default=",".join(configs.config_names()))
    parser.add_argument("--gpu", action="append", default=None, help="NAME=peak TFLOP/s, repeatable")
    parser.add_argument("--utilisation", type=float, default=0.3)
    parser.add_argument("--launch-us", type=float, default=10.0, help="cost of one operator call on the GPU")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpus = {name: float(peak) for name, peak in (g.split("=") for g in (args.gpu or ["T4 fp32=8.1",
                                                                                  "A100 bf16=312"]))}
    rows, payload = [], {"device": str(device), "machine": platform.processor() or platform.machine(),
                         "threads": torch.get_num_threads(), "torch": torch.__version__, "configs": {}}
    for name in args.configs.split(","):
        cfg = configs.get_config(name, "full")
        step, model = one_step(cfg, device)
        with FlopCounterMode(display=False) as flops:
            step()                                       # also the warm-up
        ops = OpCounter()
        with ops:
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_step = (time.perf_counter() - t0) / args.steps
        n_steps = cfg["train"]["steps"]
        step_flops = float(flops.get_total_flops())
        modelled = {gpu: max(step_flops / (args.utilisation * peak * 1e12), ops.calls * args.launch_us * 1e-6)
                    for gpu, peak in gpus.items()}
        sample_calls = cfg["sample"]["n"] * cfg["sample"]["steps"]
        sample_flops = forward_flops(cfg, model, device) * sample_calls
        params = sum(p.numel() for p in model.parameters())
        entry = {"params": params, "batch": cfg["train"]["batch_size"], "train_steps": n_steps,
                 "step_gflops": step_flops / 1e9, "step_ops": ops.calls, "measured_s_per_step": per_step,
                 "measured_train_hours": per_step * n_steps / 3600, "modelled_gpu_s_per_step": modelled,
                 "modelled_gpu_train_minutes": {gpu: m * n_steps / 60 for gpu, m in modelled.items()},
                 "sampling_tflops": sample_flops / 1e12}
        payload["configs"][name] = entry
        rows.append((name, params / 1e6, entry["batch"], n_steps, entry["step_gflops"], ops.calls, per_step,
                     entry["measured_train_hours"], *entry["modelled_gpu_train_minutes"].values(),
                     entry["sampling_tflops"]))
        print(f"{name}: {per_step:.3f} s/step here", flush=True)
    headers = ["config (full)", "params (M)", "batch", "train steps", "GFLOP / step", "ATen ops / step",
               f"measured s / step ({device.type}, {payload['threads']} threads)", "measured train hours",
               *(f"modelled train minutes, {gpu}" for gpu in gpus), "sampling TFLOP"]
    formats = [None, ".2f", "d", "d", ".2f", "d", ".3f", ".1f", *[".1f"] * len(gpus), ".3f"]
    table = markdown_table(headers, rows, formats)
    text = (f"Full-size cost of each config's main training run: measured per step on {payload['machine']} "
            f"({device}); the GPU minutes are modelled, not measured: max(FLOPs / ({args.utilisation:.0%} of "
            f"the peak), {args.launch_us} us per ATen op) per step, peaks "
            + ", ".join(f"{gpu} {peak} TFLOP/s" for gpu, peak in gpus.items()) + f"\n\n{table}\n")
    payload["model"] = {"peak_tflops": gpus, "utilisation": args.utilisation, "launch_us": args.launch_us}
    save_results(RESULTS / f"full_size_cost_{device.type}", text, payload)


if __name__ == "__main__":
    main()
