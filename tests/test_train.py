"""Tests for minidiff.train: the training loop, checkpoints, exact resume, model files."""

import json
import math
from pathlib import Path

import pytest
import torch

from minidiff import train as train_module
from minidiff.diffusion import NonFiniteLossError
from minidiff.nn import MLPDenoiser, UNet
from minidiff.train import (
    EMA,
    LossStep,
    TrainStep,
    latest_checkpoint,
    load_config,
    load_model,
    save_model,
    train,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def eps_loss(model, batch, generator):
    """L_simple (Ho et al. 2020, eq. (14)) with alpha_t = cos(pi t / 2), sigma_t = sin(pi t / 2)."""
    x, cond = (batch[0], {"labels": batch[1]}) if isinstance(batch, tuple) else (batch, {})
    t = 0.01 + 0.98 * torch.rand(x.shape[0], generator=generator)
    eps = torch.randn(x.shape, generator=generator)
    shape = (-1,) + (1,) * (x.ndim - 1)
    z = torch.cos(math.pi / 2 * t).view(shape) * x + torch.sin(math.pi / 2 * t).view(shape) * eps
    return (model(z, t, **cond) - eps).pow(2).mean()


def toy_points(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[-0.5, -0.5], [0.5, 0.5], [-0.5, 0.5], [0.5, -0.5]])
    return centres[torch.randint(4, (n,), generator=g)] + 0.05 * torch.randn(n, 2, generator=g)


def tiny_mlp(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return MLPDenoiser(hidden=32, depth=2, emb_dim=16, dropout=dropout)


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet(base_channels=8, channel_mults=(1, 2), groups=4, image_size=8, num_classes=3, dropout=0.1)


def digits_like(n=64):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(3, (n,), generator=g)


def same_weights(a, b):
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return all(torch.equal(p, q) for p, q in pairs)


FAST = dict(batch_size=16, lr=3e-3, warmup=5, progress=False)


def test_training_lowers_the_loss():
    res = train(tiny_mlp(), eps_loss, toy_points(), 150, batch_size=32, lr=3e-3, warmup=10, progress=False)
    assert res.steps == 150 and len(res.losses) == 150 and res.seconds > 0
    first, last = sum(res.losses[:20]) / 20, sum(res.losses[-50:]) / 50
    assert last < 0.6 * first, (first, last)
    assert not res.model.training and not res.ema_model.training
    assert not same_weights(res.model, res.ema_model)


def test_same_seed_same_weights_and_global_rng_untouched():
    state = torch.get_rng_state()
    a = train(tiny_mlp(dropout=0.2), eps_loss, toy_points(), 20, seed=3, **FAST)
    assert torch.equal(torch.get_rng_state(), state)
    b = train(tiny_mlp(dropout=0.2), eps_loss, toy_points(), 20, seed=3, **FAST)
    c = train(tiny_mlp(dropout=0.2), eps_loss, toy_points(), 20, seed=4, **FAST)
    assert same_weights(a.model, b.model) and same_weights(a.ema_model, b.ema_model)
    assert a.losses == b.losses
    assert not same_weights(a.model, c.model)


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_resume_is_exact(tmp_path, kind):
    """N steps in one go == N/2 steps, stop, a fresh call with resume=True up to N (dropout on)."""
    make = (lambda seed: tiny_mlp(seed, dropout=0.2)) if kind == "mlp" else tiny_unet
    data = toy_points() if kind == "mlp" else digits_like()
    kw = dict(FAST, ema_decay=0.9)
    full = train(make(0), eps_loss, data, 12, **kw)
    half = train(make(0), eps_loss, data, 6, checkpoint_dir=tmp_path, **kw)
    assert latest_checkpoint(tmp_path).name == "ckpt_00000006"
    resumed = train(make(1), eps_loss, data, 12, checkpoint_dir=tmp_path, resume=True, **kw)
    assert resumed.steps == 12 and half.steps == 6
    assert same_weights(full.model, resumed.model)
    assert same_weights(full.ema_model, resumed.ema_model)
    assert full.losses == resumed.losses


def test_resume_after_a_crash(tmp_path):
    """Periodic checkpoints: a run that dies in step 7 resumes from step 6 and ends as if never stopped."""
    full = train(tiny_mlp(dropout=0.1), eps_loss, toy_points(), 10, **FAST)
    calls = []

    def crashing_loss(model, batch, generator):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("power cut")
        return eps_loss(model, batch, generator)

    with pytest.raises(RuntimeError, match="power cut"):
        train(tiny_mlp(dropout=0.1), crashing_loss, toy_points(), 10, checkpoint_dir=tmp_path,
              checkpoint_every=2, keep_checkpoints=2, **FAST)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["ckpt_00000004.json", "ckpt_00000004.safetensors",
                     "ckpt_00000006.json", "ckpt_00000006.safetensors"]
    resumed = train(tiny_mlp(5, dropout=0.1), eps_loss, toy_points(), 10, checkpoint_dir=tmp_path,
                    resume=True, **FAST)
    assert same_weights(full.model, resumed.model) and same_weights(full.ema_model, resumed.ema_model)
    # a finished run resumed with the same steps does nothing more
    again = train(tiny_mlp(dropout=0.1), eps_loss, toy_points(), 10, checkpoint_dir=tmp_path,
                  resume=True, **FAST)
    assert same_weights(full.model, again.model) and again.steps == 10


def test_checkpoint_contents(tmp_path):
    train(tiny_mlp(), eps_loss, toy_points(), 5, checkpoint_dir=tmp_path, log_every=2,
          **{**FAST, "warmup": 10, "lr": 1e-3})
    meta = json.loads((tmp_path / "ckpt_00000005.json").read_text())
    assert meta["step"] == 5 and len(meta["losses"]) == 2 and meta["window"][1] == 1
    assert meta["settings"]["batch_size"] == 16 and meta["model_config"]["hidden"] == 32
    assert all(isinstance(v, int) for v in meta["rng"]["data"][:10])
    assert meta["optimizers"]["opt"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 5 / 10)  # warm-up
    with pytest.raises(ValueError, match="settings differ"):
        train(tiny_mlp(), eps_loss, toy_points(), 8, checkpoint_dir=tmp_path, resume=True,
              **{**FAST, "lr": 1})
    with pytest.raises(ValueError, match="does not match"):
        train(MLPDenoiser(hidden=16, depth=2, emb_dim=16), eps_loss, toy_points(), 8, checkpoint_dir=tmp_path,
              resume=True, log_every=2, **{**FAST, "warmup": 10, "lr": 1e-3})


def test_data_forms():
    images, labels = digits_like()
    res = train(tiny_unet(), eps_loss, (images, labels), 2, **FAST)  # tuple sampled with the same indices
    assert res.steps == 2
    seen = []

    def sampler(batch_size, generator):
        seen.append(batch_size)
        return toy_points(batch_size, seed=int(torch.randint(100, (1,), generator=generator)))

    train(tiny_mlp(), eps_loss, sampler, 3, **FAST)
    assert seen == [16, 16, 16]
    with pytest.raises(ValueError, match="data must be"):
        train(tiny_mlp(), eps_loss, [1.0, 2.0], 1, **FAST)
    with pytest.raises(ValueError, match="first dimension"):
        train(tiny_mlp(), eps_loss, (torch.zeros(4, 2), torch.zeros(5)), 1, **FAST)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        train(tiny_mlp(), eps_loss, toy_points(), 1, resume=True, **FAST)


def test_non_finite_loss_raises_with_advice():
    def bad_loss(model, batch, generator):
        return eps_loss(model, batch, generator) * float("nan")

    with pytest.raises(NonFiniteLossError, match="learning rate"):
        train(tiny_mlp(), bad_loss, toy_points(), 3, **FAST)
    assert issubclass(NonFiniteLossError, ValueError)


def test_ema_update_rule():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(model)  # first update: d = min(0.99, 1/10)
    assert ema.model.weight.item() == pytest.approx(0.1 * 1.0 + 0.9 * 2.0)
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)


def test_save_and_load_model(tmp_path):
    model = tiny_unet()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    path = save_model(model, tmp_path / "digits", {"model": model.config, "note": "test"})
    assert path.name == "digits.safetensors" and (tmp_path / "digits.json").exists()
    cfg = load_config(tmp_path / "digits.safetensors")
    assert cfg["note"] == "test"
    fresh = UNet(**cfg["model"])
    assert not same_weights(fresh, model)
    load_model(fresh, tmp_path / "digits")
    assert same_weights(fresh, model)
    # default config: model.config
    save_model(model, tmp_path / "b.safetensors")
    assert load_config(tmp_path / "b") == model.config
    wrong = UNet(base_channels=16, channel_mults=(1, 2), groups=4, image_size=8, num_classes=3)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_model(wrong, tmp_path / "digits")
    with pytest.raises(ValueError, match="missing from file"):
        load_model(UNet(base_channels=8, groups=4, image_size=8, num_classes=3, latent_dim=2), path)
    with pytest.raises(FileNotFoundError):
        load_model(model, tmp_path / "nothing")


def test_load_model_from_training_checkpoint(tmp_path):
    res = train(tiny_mlp(), eps_loss, toy_points(), 3, checkpoint_dir=tmp_path, **FAST)
    fresh = load_model(tiny_mlp(7), latest_checkpoint(tmp_path))
    assert same_weights(fresh, res.model)


def test_ema_foreach_update_matches_the_per_tensor_rule_bit_for_bit():
    model, ref = tiny_unet(), tiny_unet()
    ema = EMA(model, decay=0.95)
    ema_ref = [p.detach().clone() for p in ref.parameters()]
    for n in range(5):
        with torch.no_grad():
            for p, q in zip(model.parameters(), ref.parameters(), strict=True):
                step = torch.randn(p.shape, generator=torch.Generator().manual_seed(n))
                p.add_(step)
                q.add_(step)
        ema.update(model)
        d = min(0.95, (1 + n) / (10 + n))
        for e, q in zip(ema_ref, ref.parameters(), strict=True):
            e.lerp_(q.detach(), 1.0 - d)
    assert all(torch.equal(a, b) for a, b in zip(ema.model.parameters(), ema_ref, strict=True))


def test_ema_decay_zero_is_the_model_without_per_step_work():
    res = train(tiny_mlp(), eps_loss, toy_points(), 5, ema_decay=0.0, **FAST)
    assert same_weights(res.model, res.ema_model) and res.ema_model is not res.model
    model = tiny_mlp()
    ema = EMA(model, decay=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    assert not same_weights(model, ema.model)   # update() only counts with decay 0 ...
    ema.sync(model)
    assert same_weights(model, ema.model) and ema.num_updates == 1   # ... sync() copies


class CountingStep:
    """A custom TrainStep: plain SGD on eps_loss, logging two values."""

    description = "sgd"

    def __init__(self, model):
        self.model = model
        self.optimizers = {"sgd": torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)}
        self.modules = {}
        self.settings = {"sgd_lr": 0.05}

    def __call__(self, index, batch, generator):
        loss = eps_loss(self.model, batch, generator)
        opt = self.optimizers["sgd"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss.item(), "index": float(index)}


def test_a_custom_train_step_gets_history_and_exact_resume(tmp_path):
    assert isinstance(CountingStep(tiny_mlp()), TrainStep) and isinstance(
        LossStep(tiny_mlp(), eps_loss), TrainStep)
    model = tiny_mlp()
    full = train(model, None, toy_points(), 8, step=CountingStep(model), batch_size=16, progress=False)
    assert full.history["index"] == [float(i) for i in range(8)] and full.losses == full.history["loss"]
    model = tiny_mlp()
    train(model, None, toy_points(), 4, step=CountingStep(model), batch_size=16, progress=False,
          checkpoint_dir=tmp_path)
    model = tiny_mlp(3)
    resumed = train(model, None, toy_points(), 8, step=CountingStep(model), batch_size=16, progress=False,
                    checkpoint_dir=tmp_path, resume=True)
    assert same_weights(full.model, resumed.model) and same_weights(full.ema_model, resumed.ema_model)
    assert resumed.history == full.history
    with pytest.raises(ValueError, match="not both"):
        train(model, eps_loss, toy_points(), 1, step=CountingStep(model), progress=False)
    with pytest.raises(ValueError, match="either loss_fn"):
        train(model, None, toy_points(), 1, progress=False)
    with pytest.raises(ValueError, match="must be a TrainStep"):
        train(model, None, toy_points(), 1, step=lambda i, b, g: {}, progress=False)


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path, monkeypatch):
    full = train(tiny_mlp(), eps_loss, toy_points(), 6, **FAST)
    real_save = train_module.save_file
    calls = []

    def dying_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:                      # the second checkpoint: half a file, then the process dies
            Path(path).write_bytes(b"\x00" * 100)
            raise KeyboardInterrupt("killed mid-write")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(train_module, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_mlp(), eps_loss, toy_points(), 6, checkpoint_dir=tmp_path, checkpoint_every=2, **FAST)
    monkeypatch.setattr(train_module, "save_file", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000002.json", "ckpt_00000002.safetensors"]
    resumed = train(tiny_mlp(4), eps_loss, toy_points(), 6, checkpoint_dir=tmp_path, resume=True, **FAST)
    assert same_weights(full.model, resumed.model) and same_weights(full.ema_model, resumed.ema_model)


def test_save_model_is_atomic(tmp_path, monkeypatch):
    model = tiny_mlp()
    path = save_model(model, tmp_path / "m")
    before = path.read_bytes()

    def dying_save(tensors, path, metadata=None):
        Path(path).write_bytes(b"\x00" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_model(tiny_mlp(1), tmp_path / "m")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.json",
                                                                                          "m.safetensors"]
