"""minidiff.ddgan and the discriminators: posterior step, sampler, pairs, losses, R1, training."""

import math

import pytest
import torch
from torch import nn

from minidiff import configs, ddgan, diffusion, metrics
from minidiff.data import eight_gaussians
from minidiff.diffusion import NonFiniteLossError
from minidiff.nn import ConvDiscriminator, MLPDenoiser, MLPDiscriminator, UNet
from minidiff.train import load_model

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


class ToyGenerator(nn.Module):
    """A deterministic stand-in for G(x_t, u, t): x-hat = tanh(x_t + u[:, :2] + t)."""

    config = {"latent_dim": 3}

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, z, t, latent=None):
        return torch.tanh(self.w * z + latent[:, : z.shape[1]] + t[:, None])


def tiny_nets(seed=0, latent_dim=4):
    torch.manual_seed(seed)
    return (MLPDenoiser(dim=2, hidden=32, depth=2, emb_dim=16, latent_dim=latent_dim, fourier_features=0),
            MLPDiscriminator(dim=2, hidden=32, depth=2, emb_dim=16))


# ----------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("T", [1, 2, 4, 8])
def test_schedule_is_the_discretised_vp_schedule_of_the_official_code(T):
    sched = ddgan.ddgan_schedule(T)
    assert sched.T == T
    torch.testing.assert_close(sched.alphas_cumprod, ddgan.official_alpha_bars(T), atol=2e-3, rtol=0)
    abar = torch.exp(torch.tensor(-0.1 - 0.5 * 19.9, dtype=F64))        # exp(-int_0^1 beta) at t = 1
    torch.testing.assert_close(sched.alphas_cumprod[-1], abar, rtol=1e-9, atol=0)


@pytest.mark.parametrize("T", [0, 17, 2.5, True, "4"])
def test_bad_T(T):
    with pytest.raises(ValueError, match="integer in 1..16"):
        ddgan.ddgan_schedule(T)


# ----------------------------------------------------------------------------- posterior step and sampler


def test_posterior_sample_is_the_posterior_mean_plus_noise_and_exact_at_the_last_step():
    sched = ddgan.ddgan_schedule(4)
    g = torch.Generator().manual_seed(0)
    x_t, x0 = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
    i = torch.tensor([1, 2, 3, 4, 1, 2, 3, 4])
    t, s = i.to(F64) / 4, (i.to(F64) - 1) / 4
    out = ddgan.posterior_sample(sched, x_t, x0, t, s, torch.Generator().manual_seed(5))
    mean, var = diffusion.posterior(sched, x_t, x0, t=t, s=s)
    noise = diffusion.randn_like(x_t, torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, mean + var.sqrt() * noise)
    last = i == 1
    assert torch.equal(out[last], x0[last])                               # no noise at the last step
    assert bool((var.flatten()[~last] > 0).all())


def test_sampler_is_the_posterior_step_with_a_fresh_latent():
    """ddgan.sample == x_1 ~ N(0, I); per step u ~ N(0, I), x-hat = G(x_t, u, t), posterior step."""
    sched, G = ddgan.ddgan_schedule(2), ToyGenerator()
    res = ddgan.sample(G, sched, (16, 2), generator=torch.Generator().manual_seed(3), return_trajectory=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 2, generator=g)
    u = torch.randn(16, 3, generator=g)
    mean, var = diffusion.posterior(sched, x, G(x, torch.full((16,), 1.0), latent=u), t=1.0, s=0.5)
    x = mean + var.sqrt() * torch.randn(16, 2, generator=g)
    u = torch.randn(16, 3, generator=g)
    x0 = G(x, torch.full((16,), 0.5), latent=u)
    torch.testing.assert_close(res.trajectory[1], x)
    torch.testing.assert_close(res.x, x0)                             # last step: x_0 = G(x_{1/2}, u, 1/2)
    assert res.nfe == 2
    # a given x_1 (a table's common initial noise): the same steps, with the generator's draws after x_1
    z1 = torch.randn(16, 2, generator=torch.Generator().manual_seed(4))
    given = ddgan.sample(G, sched, z=z1, generator=torch.Generator().manual_seed(3), return_trajectory=True)
    torch.testing.assert_close(given.trajectory[0], z1)
    assert given.x.shape == (16, 2) and given.nfe == 2


def test_sampler_needs_a_latent_generator_and_a_discrete_schedule():
    with pytest.raises(ValueError, match="latent_dim"):
        ddgan.sample(MLPDenoiser(hidden=8, depth=1, emb_dim=8), ddgan.ddgan_schedule(2), (4, 2))
    from minidiff.schedules import LinearVPSchedule

    with pytest.raises(ValueError, match="discrete"):
        ddgan.sample(ToyGenerator(), LinearVPSchedule(), (4, 2))


def test_real_pairs_follow_the_forward_process():
    """x_{t-1} ~ q(x_{t-1}|x_0) and x_t | x_{t-1} ~ q(x_t|x_{t-1}): check both moments (Monte Carlo)."""
    sched, n = ddgan.ddgan_schedule(4), 200_000
    x0 = torch.full((n, 1), 0.6, dtype=F64)
    i = torch.full((n,), 3)
    x_prev, x_t = ddgan.real_pairs(sched, x0, i, torch.Generator().manual_seed(0))
    a_s, s_s = sched.alpha_sigma(torch.tensor(0.5, dtype=F64))
    a_t, s_t = sched.alpha_sigma(torch.tensor(0.75, dtype=F64))
    assert abs(x_prev.mean() - a_s * 0.6) < 0.01 and abs(x_prev.var() - s_s**2) < 0.01
    assert abs(x_t.mean() - a_t * 0.6) < 0.01 and abs(x_t.var() - s_t**2) < 0.01
    cov = ((x_prev - x_prev.mean()) * (x_t - x_t.mean())).mean()
    assert abs(cov - a_t / a_s * s_s**2) < 0.01                          # Cov = alpha_{t|s} Var(x_{t-1})
    x_prev, _ = ddgan.real_pairs(sched, x0[:8], torch.ones(8, dtype=torch.long))
    assert torch.equal(x_prev, x0[:8])                                    # at i = 1, x_{t-1} = x_0
    with pytest.raises(ValueError, match="1..T"):
        ddgan.real_pairs(sched, x0[:8], torch.zeros(8, dtype=torch.long))


# ----------------------------------------------------------------------------- discriminators


def test_discriminator_shapes():
    D = MLPDiscriminator(dim=2, hidden=16, depth=2, emb_dim=16, fourier_features=4)
    x = torch.randn(5, 2)
    assert D(x, x, torch.rand(5)).shape == (5,)
    assert D(x, x, 0.5).shape == (5,)                                     # one time for the whole batch
    C = ConvDiscriminator(in_channels=3, base_channels=8, channel_mults=(1, 2), image_size=8, emb_dim=16)
    img = torch.randn(4, 3, 8, 8)
    assert C(img, img, torch.rand(4)).shape == (4,)
    C16 = ConvDiscriminator(in_channels=1, base_channels=8, channel_mults=(1, 2, 2), image_size=16)
    assert C16(torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16), 0.25).shape == (2,)


def test_discriminator_bad_inputs():
    D = MLPDiscriminator(dim=2, hidden=16, depth=1, emb_dim=16)
    x = torch.randn(5, 2)
    with pytest.raises(ValueError, match="same shape"):
        D(x, torch.randn(5, 3), 0.5)
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        D(torch.randn(5, 3), torch.randn(5, 3), 0.5)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        D(x, x, torch.rand(4))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        D(x, x, torch.full((5,), 2.0))
    C = ConvDiscriminator(in_channels=1, base_channels=8, image_size=8)
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        C(torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16), 0.5)
    with pytest.raises(ValueError, match="divisible"):
        ConvDiscriminator(image_size=6, channel_mults=(1, 2))


# ----------------------------------------------------------------------------- losses and R1


def test_losses_are_the_non_saturating_gan_losses():
    real, fake = torch.randn(64, dtype=F64), torch.randn(64, dtype=F64)
    d_ref = -(torch.sigmoid(real).log().mean() + (1 - torch.sigmoid(fake)).log().mean())
    torch.testing.assert_close(ddgan.discriminator_loss(real, fake), d_ref)
    torch.testing.assert_close(ddgan.generator_loss(fake), -torch.sigmoid(fake).log().mean())


def test_r1_against_finite_differences():
    torch.manual_seed(0)
    D = MLPDiscriminator(dim=2, hidden=16, depth=2, emb_dim=16).double()    # float64 throughout
    g = torch.Generator().manual_seed(1)
    x_prev, x_t = torch.randn(6, 2, generator=g, dtype=F64), torch.randn(6, 2, generator=g, dtype=F64)
    t = torch.rand(6)
    gamma, h = 0.7, 1e-6
    grads = torch.zeros(6, 2, dtype=F64)
    with torch.no_grad():
        for j in range(2):                                            # central differences, per coordinate
            e = torch.zeros(6, 2, dtype=F64)
            e[:, j] = h
            grads[:, j] = (D(x_prev + e, x_t, t) - D(x_prev - e, x_t, t)) / (2 * h)
    expected = gamma / 2 * grads.pow(2).sum(1).mean()
    r1 = ddgan.r1_penalty(D, x_prev, x_t, t, gamma)
    torch.testing.assert_close(r1, expected, rtol=1e-6, atol=1e-10)
    r1.backward()                                                         # differentiable in D's weights
    assert all(p.grad is not None for p in D.parameters() if p.requires_grad and p.ndim == 2)


def test_r1_for_images_against_the_jacobian():
    torch.manual_seed(0)
    C = ConvDiscriminator(in_channels=1, base_channels=4, channel_mults=(1,), image_size=4, emb_dim=8)
    C = C.double()
    x_prev, x_t = torch.randn(3, 1, 4, 4, dtype=F64), torch.randn(3, 1, 4, 4, dtype=F64)
    t = torch.tensor([0.25, 0.5, 1.0])
    jac = torch.autograd.functional.jacobian(lambda x: C(x, x_t, t), x_prev)   # (3, 3, 1, 4, 4)
    per_example = torch.stack([jac[b, b].pow(2).sum() for b in range(3)])
    torch.testing.assert_close(ddgan.r1_penalty(C, x_prev, x_t, t, 2.0), per_example.mean())


# ----------------------------------------------------------------------------- training


def test_same_seed_gives_bit_identical_weights(tmp_path):
    runs = []
    for _ in range(2):
        G, D = tiny_nets()
        data = eight_gaussians(256, torch.Generator().manual_seed(0))
        runs.append(ddgan.train_ddgan(G, D, data, T=2, steps=16, batch_size=32, lazy_reg=4, seed=3,
                                      progress=False, save_dir=tmp_path))
    for name in ("generator", "ema_generator", "discriminator"):
        sa, sb = getattr(runs[0], name).state_dict(), getattr(runs[1], name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert runs[0].d_losses == runs[1].d_losses and len(runs[0].r1) == 4 and len(runs[0].g_losses) == 16
    G, _ = tiny_nets(seed=9)
    load_model(G, tmp_path / "generator_ema.safetensors")                # safetensors round trip
    assert all(torch.equal(p, q) for p, q in zip(G.state_dict().values(),
                                                 runs[0].ema_generator.state_dict().values(), strict=True))
    G, D = tiny_nets()
    other = ddgan.train_ddgan(G, D, eight_gaussians(256, torch.Generator().manual_seed(0)), T=2, steps=16,
                              batch_size=32, seed=4, progress=False)
    assert other.d_losses != runs[0].d_losses


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    """DDGAN through the one training loop: stop at step 10 of 16, resume, same weights as one run."""
    data = eight_gaussians(256, torch.Generator().manual_seed(0))
    kw = dict(T=2, batch_size=32, lazy_reg=3, seed=3, progress=False, lr_min=1e-5)
    G, D = tiny_nets()
    full = ddgan.train_ddgan(G, D, data, steps=16, **kw)
    G, D = tiny_nets()
    calls = []
    real_loss = ddgan.generator_loss

    def crashing(logits):
        calls.append(1)
        if len(calls) == 11:
            raise RuntimeError("power cut")
        return real_loss(logits)

    ddgan.generator_loss = crashing
    try:
        with pytest.raises(RuntimeError, match="power cut"):
            ddgan.train_ddgan(G, D, data, steps=16, checkpoint_dir=tmp_path, checkpoint_every=5, **kw)
    finally:
        ddgan.generator_loss = real_loss
    G, D = tiny_nets(seed=7)                                              # other weights: all must load
    resumed = ddgan.train_ddgan(G, D, data, steps=16, checkpoint_dir=tmp_path, resume=True, **kw)
    for name in ("generator", "ema_generator", "discriminator"):
        sa, sb = getattr(full, name).state_dict(), getattr(resumed, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert resumed.d_losses == full.d_losses and resumed.g_losses == full.g_losses and resumed.r1 == full.r1


def test_training_bad_inputs():
    G, D = tiny_nets()
    x = eight_gaussians(64)
    with pytest.raises(ValueError, match="integer in 1..16"):
        ddgan.train_ddgan(G, D, x, T=32, steps=1, progress=False)
    with pytest.raises(ValueError, match="T = 2"):
        ddgan.train_ddgan(G, D, x, T=2, schedule=ddgan.ddgan_schedule(4), steps=1, progress=False)
    with pytest.raises(ValueError, match="lazy_reg"):
        ddgan.train_ddgan(G, D, x, lazy_reg=0, steps=1, progress=False)
    with pytest.raises(ValueError, match="latent_dim"):
        ddgan.train_ddgan(MLPDenoiser(hidden=8, depth=1, emb_dim=8), D, x, steps=1, progress=False)
    with pytest.raises(ValueError, match="data must be"):
        ddgan.train_ddgan(G, D, [1, 2, 3], steps=1, progress=False)
    with pytest.raises(NonFiniteLossError, match="lower lr_d"):
        ddgan.train_ddgan(G, D, torch.full((64, 2), float("nan")), steps=2, progress=False)


@pytest.mark.slow
def test_a_short_run_is_stable_and_covers_the_modes():
    """8 Gaussians, T=2, 500 steps of small MLPs (about 8 s): finite losses and most modes covered."""
    torch.manual_seed(0)
    G = MLPDenoiser(dim=2, hidden=64, depth=2, emb_dim=32, latent_dim=8, fourier_features=0)
    D = MLPDiscriminator(dim=2, hidden=64, depth=2, emb_dim=32, fourier_features=8)
    data = eight_gaussians(4096, torch.Generator().manual_seed(0))
    res = ddgan.train_ddgan(G, D, data, T=2, steps=500, batch_size=128, lr_g=1e-3, lr_d=2e-3, r1_gamma=0.02,
                            ema_decay=0.99, progress=False)
    assert all(map(math.isfinite, res.d_losses + res.g_losses + res.r1)) and len(res.r1) == 34
    x = ddgan.sample(res.ema_generator, res.schedule, (800, 2), generator=torch.Generator().manual_seed(1)).x
    q = metrics.toy_quality(x, eight_gaussians(800, torch.Generator().manual_seed(2)), "8gaussians")
    assert q["modes_covered"] >= 5, q


@pytest.mark.parametrize("name", ["ddgan_toy", "ddgan_digits"])
@pytest.mark.parametrize("size", ["small", "full"])
def test_configs_build(name, size, monkeypatch):
    monkeypatch.delenv("MINIDIFF_SIZE", raising=False)
    cfg = configs.get_config(name, size)
    G, D = ddgan.build(cfg)
    assert isinstance(G, MLPDenoiser if cfg["architecture"] == "mlp" else UNet)
    shape = (3, 2) if cfg["architecture"] == "mlp" else (3, 1, cfg["data"]["size"], cfg["data"]["size"])
    z = torch.randn(shape)
    u = torch.randn(3, cfg["model"]["latent_dim"])
    with torch.no_grad():
        assert G(z, torch.rand(3), latent=u).shape == z.shape
        assert D(z, z, torch.rand(3)).shape == (3,)
    assert cfg["diffusion"]["T"] == 4 and cfg["diffusion"]["prediction"] == "x"
