"""The sampler's own cost: samplers.sample against a bare loop of the same network calls, and against
diffusers' scheduler loop driving the same network, for every step rule (Chapter 1 §6; issue 10 §5).

For each network (chapter 1's toy MLP and digits UNet at their small configs, random weights,
batch 128) and each step rule, three loops run interleaved in this one process, repeat after
repeat, so that a busy machine slows all three alike:

* bare:      only the network calls that sample() makes (the same number, the same times);
* minidiff:  samplers.sample(model, schedule, respace(1000, steps, "trailing"), step, z=z);
* diffusers: the scheduler's own loop (set_timesteps, scale_model_input, model, step), if diffusers
             imports (``--diffusers-path DIR`` adds DIR to sys.path first, for a copy installed with
             ``pip install --no-deps --target DIR diffusers huggingface_hub regex httpx2 click``);
             AncestralGammaStep(0.3) has no diffusers scheduler and is compared with DDPM's.

Reported per step rule, per sampling step (medians over the repeats): each loop's CPU time; the
median of the per-repeat ratios minidiff / bare and minidiff / diffusers; and, inside one run, each
loop's own time (the run's total minus the time spent inside its network calls, timed call by call)
and the run's total over its network time. That in-run ratio compares the loop with the very network
calls it made, so load that changes between runs does not enter it. Times are CPU seconds of this
process (time.process_time; one torch thread), which a second process on the same cores disturbs less
than wall-clock time. Also: how often the schedule's formulas are evaluated per step, in
the first run on a schedule and in later runs (the issue found 9 for a DDPM step; the schedule's
memoized copy now keeps its answers across runs). Writes benchmarks/results/sampler_cpu.{md,json} (or --out).
Usage:  python benchmarks/bench_sampler.py [--steps 50] [--unet-steps 10] [--repeats 9] [--nets toy unet]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from minidiff import configs, samplers, schedules
from minidiff.pretrained import build_model
from minidiff.report import save_results

RESULTS = Path(__file__).parent / "results"
T = 1000
STEPS = {
    "DDPM (posterior)": samplers.DDPMStep("posterior"),
    "DDPM (beta)": samplers.DDPMStep("beta"),
    "DDIM (eta 0)": samplers.DDIMStep(0.0),
    "DDIM (eta 1)": samplers.DDIMStep(1.0),
    "gamma 0.3": samplers.AncestralGammaStep(0.3),
    "Euler": samplers.EulerStep(),
    "Heun": samplers.HeunStep(),
    "DPM-Solver++(2M)": samplers.DPMSolverPP2MStep(),
}


def diffusers_schedulers():
    """The diffusers scheduler that matches each step rule (trailing spacing, DDPM's linear betas)."""
    import diffusers

    kw = dict(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
              timestep_spacing="trailing")
    ddpm_small = dict(cls=diffusers.DDPMScheduler, kw=dict(kw, variance_type="fixed_small"), eta=None)
    return diffusers.__version__, {
        "DDPM (posterior)": ddpm_small,
        "DDPM (beta)": dict(cls=diffusers.DDPMScheduler, kw=dict(kw, variance_type="fixed_large"), eta=None),
        "DDIM (eta 0)": dict(cls=diffusers.DDIMScheduler, kw=kw, eta=0.0),
        "DDIM (eta 1)": dict(cls=diffusers.DDIMScheduler, kw=kw, eta=1.0),
        "gamma 0.3": ddpm_small,
        "Euler": dict(cls=diffusers.EulerDiscreteScheduler, kw=kw, eta=None),
        "Heun": dict(cls=diffusers.HeunDiscreteScheduler, kw=kw, eta=None),
        "DPM-Solver++(2M)": dict(cls=diffusers.DPMSolverMultistepScheduler,
                                 kw=dict(kw, algorithm_type="dpmsolver++", solver_order=2), eta=None),
    }


def network(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """Chapter 1's small config of `name` with seeded random weights (zero-initialised output layers
    would make every sample trivial), in eval mode, and a batch-128 shape."""
    cfg = configs.get_config(name, "small")
    net = build_model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    size = cfg["data"].get("size")
    return net, ((128, 2) if cfg["architecture"] == "mlp" else (128, 1, size, size))


class Timed:
    """The network, with the CPU time spent inside its calls added up (``model(z, t, **cond)``)."""

    def __init__(self, net):
        self.net, self.seconds = net, 0.0

    def __call__(self, z, t, **cond):
        start = time.process_time()
        out = self.net(z, t, **cond)
        self.seconds += time.process_time() - start
        return out


def cpu_seconds(loop, net) -> tuple[float, float]:
    """(CPU seconds of one run of loop(model), of which inside the network)."""
    timed = Timed(net)
    start = time.process_time()
    loop(timed)
    return time.process_time() - start, timed.seconds


def count_schedule_evaluations(net, schedule, ts, step, z) -> tuple[float, float]:
    """Schedule evaluations (alpha/sigma, log-SNR, lambda', alpha'/sigma' computed, not answered from
    the memoized copy's memory) per step: (in the first run on a fresh schedule, in a second run)."""
    schedule = copy.copy(schedule)  # a schedule that has not been memoized yet
    memo = schedule.memoized()._memo
    counts = []
    for _ in range(2):
        before = len(memo)
        samplers.sample(net, schedule, ts, step, z=z, progress=False,
                        generator=torch.Generator().manual_seed(0))
        counts.append((len(memo) - before) / (len(ts) - 1))
    return counts[0], counts[1]


def _median_ratio(a, b) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def bench(net, shape, steps: int, repeats: int, dfs) -> list[dict]:
    schedule = schedules.get_schedule("linear", T=T)
    ts = schedules.respace(T, steps, "trailing")
    z = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    rows = []
    for name, step in STEPS.items():
        run = samplers.sample(net, schedule, ts, step, z=z, progress=False)  # warm-up; the calls it makes
        times = [float(t) for t in ts[:-1]]
        if name == "Heun":  # one more call per step, at s, except the last step's (to s = 0)
            times = times + [float(s) for s in ts[1:-1]]
        t_vecs = [torch.full((shape[0],), t) for t in times]
        assert len(t_vecs) == run.nfe

        def bare(model, t_vecs=t_vecs):
            with torch.no_grad():
                for t in t_vecs:
                    model(z, t)

        def mini(model, step=step):
            samplers.sample(model, schedule, ts, step, z=z, generator=torch.Generator().manual_seed(2),
                            progress=False)

        loops = {"bare": bare, "minidiff": mini}
        if dfs is not None:
            spec = dfs[name]
            scheduler = spec["cls"](**spec["kw"])
            takes_generator = "generator" in inspect.signature(scheduler.step).parameters

            def diffusers_loop(model, scheduler=scheduler, eta=spec["eta"], takes_generator=takes_generator):
                scheduler.set_timesteps(steps)
                x = z.clone()
                extra = {"eta": eta} if eta is not None else {}
                if takes_generator:
                    extra["generator"] = torch.Generator().manual_seed(2)
                with torch.no_grad():
                    for t in scheduler.timesteps:
                        inp = scheduler.scale_model_input(x, t)
                        out = model(inp, (t.float().expand(shape[0]) + 1) / T)
                        x = scheduler.step(out, t, x, **extra).prev_sample

            loops["diffusers"] = diffusers_loop
        for loop in loops.values():
            loop(net)  # warm-up
        seconds = {k: [] for k in loops}
        inside = {k: [] for k in loops}
        order = list(loops)
        for r in range(repeats):  # alternate the order, so that a drifting load favours no loop
            for key in order if r % 2 == 0 else order[::-1]:
                total, in_net = cpu_seconds(loops[key], net)
                seconds[key].append(total)
                inside[key].append(in_net)
        per_step = {k: 1e6 * statistics.median(v) / steps for k, v in seconds.items()}
        own = {k: 1e6 * statistics.median(a - b for a, b in zip(seconds[k], inside[k], strict=True)) / steps
               for k in loops}
        row = {"step rule": name, "steps": steps, "nfe": run.nfe,
               "schedule evaluations per step (first run, later runs)":
                   "{:.1f}, {:.1f}".format(*count_schedule_evaluations(net, schedule, ts, step, z)),
               **{f"{k} us/step": v for k, v in per_step.items()},
               "minidiff / bare": _median_ratio(seconds["minidiff"], seconds["bare"]),
               "minidiff own us/step": own["minidiff"],
               "minidiff / its network time": _median_ratio(seconds["minidiff"], inside["minidiff"])}
        if dfs is not None:
            row["diffusers own us/step"] = own["diffusers"]
            row["diffusers / its network time"] = _median_ratio(seconds["diffusers"], inside["diffusers"])
            row["minidiff / diffusers"] = _median_ratio(seconds["minidiff"], seconds["diffusers"])
        rows.append(row)
        print(f"  {name}: " + ", ".join(f"{k} {v if isinstance(v, str) else format(v, '.3g')}"
                                   for k, v in row.items() if k != "step rule"),
              flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="sampling steps for the toy MLP")
    parser.add_argument("--unet-steps", type=int, default=10, help="sampling steps for the digits UNet")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--diffusers-path", default=None, help="a folder to add to sys.path for diffusers")
    parser.add_argument("--nets", nargs="+", default=["toy", "unet"], choices=["toy", "unet"])
    parser.add_argument("--out", default=str(RESULTS / "sampler_cpu"), help="output path without suffix")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.diffusers_path:
        sys.path.insert(0, args.diffusers_path)
    try:
        dfs_version, dfs = diffusers_schedulers()
    except ImportError as err:
        dfs_version, dfs = None, None
        print(f"diffusers not importable ({err}); comparing with the bare loop only")
    results = {}
    nets = {"toy": ("toy MLP", "ddpm_toy", args.steps),
            "unet": ("digits UNet", "ddpm_digits", args.unet_steps)}
    for label, name, steps in (nets[k] for k in args.nets):
        net, shape = network(name)
        print(f"{label} ({name}, small, batch {shape[0]}, {steps} steps):", flush=True)
        results[label] = bench(net, shape, steps, args.repeats, dfs)
    cpu = platform.processor() or platform.machine()
    where = (f"cpu, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, {cpu}; diffusers "
             f"{dfs_version or 'not installed'}; CPU time, median of {args.repeats} interleaved repeats")
    lines = [f"# sampler cost ({where})", ""]
    for label, rows in results.items():
        cols = ["step rule", "nfe", "schedule evaluations per step (first run, later runs)", "bare us/step",
                "minidiff us/step", "minidiff / bare", "minidiff own us/step", "minidiff / its network time"]
        if dfs is not None:
            cols += ["diffusers us/step", "diffusers own us/step", "diffusers / its network time",
                     "minidiff / diffusers"]
        lines += [f"## {label}, {rows[0]['steps']} steps, batch 128", "", "| " + " | ".join(cols) + " |",
                  "|" + "---|" * len(cols)]
        for r in rows:
            cells = [r["step rule"], str(r["nfe"])] + [
                r[c] if isinstance(r[c], str) else f"{r[c]:.2f}" if "/ " in c else f"{r[c]:.0f}"
                for c in cols[2:]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    text = "\n".join(lines)
    save_results(args.out, text, {"where": where, "results": results})


if __name__ == "__main__":
    main()
