"""Training on several processes: torchrun + DistributedDataParallel on the CPU (gloo), 2 processes.

The claim under test (minidiff.distributed): 2 processes with batch B each train the same weights as one
process with batch 2B split into 2 blocks (``shards=2``), because both draw the same global batch and
key each block's noise by (seed, step, block). Each method that trains is run both ways through the
command line (``python -m minidiff.train_cli``): DDPM's loss, DDGAN's two-player step, Patch-DM's loss
(which calls the network's encode / decode, outside its forward) and the distillation rounds.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from minidiff import distributed, train_cli
from minidiff.diffusion import training_loss
from minidiff.nn import MLPDenoiser
from minidiff.schedules import get_schedule
from minidiff.train import LossStep, train

pytestmark = pytest.mark.slow


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    env.pop("MINIDIFF_SIZE", None)
    return env


def _cli(args, processes=1, timeout=600):
    """Run train_cli in fresh processes: under torchrun with `processes` > 1 (gloo on the CPU)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
    cmd = [*launcher, "-m", "minidiff.train_cli", *args, "--no-progress", "--device", "cpu"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _weights(path):
    return load_file(str(path))


def _max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


WAYS = {"ddp": (2, []), "shards": (1, ["--shards", "2"]), "plain": (1, [])}


def _two_ways(tmp_path, config, args, file="model.safetensors", stage_first=None, ways=("ddp", "shards")):
    """Weights from 2 processes x batch B ("ddp"), from 1 process x batch 2B with 2 shards ("shards") and,
    if asked, from 1 process x 2B with one generator ("plain"), for the same config and arguments."""
    out = {}
    for name in ways:
        procs, extra = WAYS[name]
        folder = tmp_path / name
        if stage_first is not None:
            _cli([config, "--size", "small", "--out", str(folder), *stage_first, *extra], processes=procs)
        _cli([config, "--size", "small", "--out", str(folder), *args, *extra], processes=procs)
        out[name] = _weights(folder / file)
    return out


def test_ddpm_two_processes_equal_one_process_with_two_shards_and_resume(tmp_path):
    w = _two_ways(tmp_path, "ddpm_toy", ["--steps", "6", "--batch-size", "32"], ways=tuple(WAYS))
    assert _max_difference(w["ddp"], w["shards"]) < 1e-6
    assert _max_difference(w["ddp"], w["plain"]) > 1e-5       # the noise layout matters: the test can fail
    # (a loss whose gradients DDP did not average shows as ddp != shards in the tests below)
    summary = json.loads((tmp_path / "ddp" / "summary_model.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 6
    # resume under torchrun: 3 steps, then on to 6 from the checkpoint, equals 6 steps at once
    folder = tmp_path / "resumed"
    base = ["ddpm_toy", "--size", "small", "--out", str(folder), "--batch-size", "32"]
    _cli([*base, "--steps", "3"], processes=2)
    _cli([*base, "--steps", "6", "--resume"], processes=2)
    assert _max_difference(_weights(folder / "model.safetensors"), w["ddp"]) < 1e-6
    # a run that changes the global layout cannot resume from it
    with pytest.raises(AssertionError, match="settings differ"):
        _cli(["ddpm_toy", "--size", "small", "--out", str(folder), "--steps", "8", "--batch-size", "16",
              "--resume"], processes=2)


def test_ddgan_two_player_step_under_torchrun(tmp_path):
    w = _two_ways(tmp_path, "ddgan_toy", ["--steps", "4", "--batch-size", "32"])   # R1 at step 0
    assert _max_difference(w["ddp"], w["shards"]) < 1e-6


def test_patch_dm_loss_calls_encode_decode_and_still_syncs(tmp_path):
    w = _two_ways(tmp_path, "patchdm_textures", ["--steps", "2", "--batch-size", "4"])
    assert _max_difference(w["ddp"], w["shards"]) < 1e-6


def test_distillation_rounds_under_torchrun(tmp_path):
    w = _two_ways(tmp_path, "pd_toy", ["--stage", "distill", "--steps", "2", "--batch-size", "16"],
                  file="student_1.safetensors", stage_first=["--steps", "3", "--batch-size", "16"])
    assert _max_difference(w["ddp"], w["shards"]) < 1e-6


# ----------------------------------------------------------------------------- in-process pieces


def test_keyed_generator_depends_on_the_key_only():
    a = torch.rand(5, generator=distributed.keyed_generator(3, 10, 1))
    assert torch.equal(a, torch.rand(5, generator=distributed.keyed_generator(3, 10, 1)))
    for key in ((3, 10, 0), (3, 11, 1), (4, 10, 1)):
        assert not torch.equal(a, torch.rand(5, generator=distributed.keyed_generator(*key)))


def test_split_blocks_and_its_errors():
    x, y = torch.arange(12).reshape(6, 2), torch.arange(6)
    blocks = distributed.split_blocks((x, y), 3)
    assert [tuple(b[1].tolist()) for b in blocks] == [(0, 1), (2, 3), (4, 5)]
    assert torch.equal(torch.cat(distributed.split_blocks(x, 2)), x)
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        distributed.split_blocks(x, 4)


def _toy_run(**kwargs):
    torch.manual_seed(0)
    net = MLPDenoiser(dim=2, hidden=16, depth=1, emb_dim=8)
    sched = get_schedule("linear", T=100)
    data = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))
    loss = lambda m, b, g: training_loss(m, sched, b, prediction="eps", weighting="eps", generator=g)  # noqa: E731
    return train(net, loss, data, kwargs.pop("steps", 4), batch_size=kwargs.pop("batch_size", 16), warmup=0,
                 lr=1e-2, progress=False, **kwargs)


def test_shards_are_gradient_accumulation_over_keyed_blocks(one_thread):
    """shards=2: the mean gradient of two blocks, each with its keyed generator, written out by hand."""
    got = _toy_run(steps=1, shards=2, ema_decay=0.0).model
    torch.manual_seed(0)
    net = MLPDenoiser(dim=2, hidden=16, depth=1, emb_dim=8)
    sched = get_schedule("linear", T=100)
    data = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))
    batch = data[torch.randint(256, (16,), generator=torch.Generator().manual_seed(0))]
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.0)
    for j, block in enumerate(batch.split(8)):
        g = distributed.keyed_generator(0, 0, j)
        (training_loss(net, sched, block, prediction="eps", weighting="eps", generator=g) / 2).backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    for p, q in zip(got.parameters(), net.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-7)


def test_one_shard_keeps_the_single_generator_path(one_thread):
    a, b = _toy_run(), _toy_run(shards=1)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True))
    c = _toy_run(shards=2)
    assert not all(torch.equal(p, q) for p, q in zip(a.model.parameters(), c.model.parameters(), strict=True))


def test_precision_and_compile_settings(one_thread):
    cpu = torch.device("cpu")
    from minidiff.train import resolve_compile, resolve_precision
    assert resolve_precision("auto", cpu) == "fp32" and resolve_compile("auto", cpu) is False
    bf16 = _toy_run(precision="bf16", steps=2)
    fp32 = _toy_run(steps=2)
    assert all(map(lambda v: v == v, bf16.losses)) and bf16.losses != fp32.losses
    with pytest.raises(ValueError, match="precision"):
        _toy_run(precision="fp16")
    with pytest.raises(ValueError, match="compile"):
        _toy_run(compile="yes")
    with pytest.raises(ValueError, match="divides batch_size"):
        _toy_run(shards=3)
    with pytest.raises(ValueError, match="precision"):
        LossStep(torch.nn.Linear(2, 2), lambda m, b, g: m(b).sum(), precision="half")


def test_cli_errors_say_what_to_do(tmp_path, capsys):
    assert train_cli.main(["ddpm_toy", "--size", "small", "--shards", "3", "--out", str(tmp_path),
                           "--no-progress"]) == 2
    assert "multiple of 3" in capsys.readouterr().err
    assert train_cli.main(["ddpm_toy", "--size", "small", "--stage", "distill", "--out", str(tmp_path)]) == 2
    assert "'distill' entry" in capsys.readouterr().err
    assert train_cli.main(["pd_toy", "--size", "small", "--stage", "distill", "--out", str(tmp_path)]) == 2
    assert "run --stage model" in capsys.readouterr().err
