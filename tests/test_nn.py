"""Tests for minidiff.nn: embeddings, UNet and MLP denoisers."""

import itertools
import math

import pytest
import torch

from minidiff.nn import (
    ClassEmbedding,
    ConditioningEmbedding,
    MLPDenoiser,
    PositionEmbedding,
    TimeEmbedding,
    UNet,
    sinusoidal_embedding,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


TINY = dict(base_channels=8, channel_mults=(1, 2), groups=4, image_size=8)


def tiny_unet(**kw):
    torch.manual_seed(0)
    return UNet(**{**TINY, **kw})


def randomize(model):
    """Zero-initialised output layers hide bugs: give every parameter a random value."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


# ----------------------------------------------------------------------------- embeddings


def test_sinusoidal_embedding_values():
    x = torch.tensor([0.0, 1.0, 2.5])
    e = sinusoidal_embedding(x, 6)
    assert e.shape == (3, 6)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(3) / 3)
    assert torch.allclose(e[:, :3], torch.cos(x[:, None] * freqs))
    assert torch.allclose(e[:, 3:], torch.sin(x[:, None] * freqs))
    assert sinusoidal_embedding(x, 7).shape == (3, 7)
    with pytest.raises(ValueError, match="1-D"):
        sinusoidal_embedding(torch.zeros(3, 1), 4)


def test_time_and_position_embeddings_shapes():
    assert TimeEmbedding(16)(torch.rand(5)).shape == (5, 16)
    assert PositionEmbedding(16)(torch.rand(5, 2) * 2 - 1).shape == (5, 16)


def test_class_embedding_null_token():
    emb = ClassEmbedding(3, 4)
    null = emb.table.weight[3]
    out = emb(torch.tensor([0, -1, 3, 2]))
    assert torch.equal(out[1], null) and torch.equal(out[2], null)
    assert torch.equal(out[0], emb.table.weight[0])
    assert torch.equal(emb(None, batch_size=2), null.expand(2, 4))
    with pytest.raises(ValueError, match="labels must be in"):
        emb(torch.tensor([4]))
    with pytest.raises(ValueError, match="integer"):
        emb(torch.tensor([0.0]))


def test_conditioning_embedding_sums_terms():
    torch.manual_seed(0)
    ce = ConditioningEmbedding(16, num_classes=3, guidance=True, latent_dim=5, position=True)
    t, labels, w = torch.rand(4), torch.tensor([0, 1, 2, -1]), torch.rand(4)
    latent, pos = torch.randn(4, 5), torch.rand(4, 2)
    total = ce(t, labels=labels, w=w, latent=latent, position=pos)
    parts = ce.time(t) + ce.labels(labels) + ce.w(w) + ce.latent(latent) + ce.position(pos)
    assert torch.allclose(total, parts, atol=1e-6)
    assert ce.active == ("labels", "w", "latent", "position")


def test_conditioning_embedding_nan_rows_drop_a_term():
    torch.manual_seed(0)
    ce = ConditioningEmbedding(16, position=True, latent_dim=3)
    t, latent = torch.rand(3), torch.randn(3, 3)
    pos = torch.tensor([[0.5, -0.5], [float("nan")] * 2, [0.1, 0.2]])
    out = ce(t, latent=latent, position=pos)
    expected_row1 = ce.time(t[1:2]) + ce.latent(latent[1:2])
    assert torch.allclose(out[1:2], expected_row1, atol=1e-6)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="all NaN"):
        ce(t, latent=latent, position=torch.tensor([[0.5, float("nan")]] * 3))


def test_conditioning_embedding_errors():
    ce = ConditioningEmbedding(16, num_classes=3, position=True)
    t, pos = torch.rand(2), torch.zeros(2, 2)
    with pytest.raises(ValueError, match="unknown conditioning"):
        ce(t, position=pos, label=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="'position' is required"):
        ce(t)
    with pytest.raises(ValueError, match="built without"):
        ce(t, position=pos, w=torch.ones(2))
    with pytest.raises(ValueError, match=r"t must be continuous time in \[0, 1\]"):
        ce(torch.tensor([3.0, 500.0]), position=pos)
    with pytest.raises(ValueError, match=r"t must be continuous time"):
        ce(torch.tensor([0.5, float("nan")]), position=pos)
    with pytest.raises(ValueError, match="shape"):
        ce(t, position=torch.zeros(2, 3))
    # labels may be omitted (null token); a float t is broadcast
    assert ce(0.5, batch_size=2, position=pos).shape == (2, 16)


# ----------------------------------------------------------------------------- UNet

COND_OPTIONS = {
    "labels": (dict(num_classes=10), lambda b: torch.randint(10, (b,))),
    "w": (dict(guidance_embedding=True), lambda b: torch.rand(b) * 4),
    "latent": (dict(latent_dim=7), lambda b: torch.randn(b, 7)),
    "position": (dict(position_embedding=True), lambda b: torch.rand(b, 2) * 2 - 1),
}


@pytest.mark.parametrize(
    "keys", [c for r in range(len(COND_OPTIONS) + 1) for c in itertools.combinations(COND_OPTIONS, r)]
)
def test_unet_shapes_all_conditioning_combinations(keys):
    kw = {k: v for key in keys for k, v in COND_OPTIONS[key][0].items()}
    model = tiny_unet(in_channels=3, **kw)
    x = torch.randn(3, 3, 8, 8)
    cond = {key: COND_OPTIONS[key][1](3) for key in keys}
    assert model(x, torch.rand(3), **cond).shape == x.shape


def test_unet_encode_decode_equals_forward():
    model = randomize(tiny_unet(num_classes=4, attention_resolutions=(4,), num_res_blocks=2))
    x, t, labels = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 3])
    h, skips, emb = model.encode(x, t, labels=labels)
    assert len(skips) == 4 and emb.shape == (2, 32)
    assert torch.equal(model.decode(h, skips, emb), model(x, t, labels=labels))
    with pytest.raises(ValueError, match="skip"):
        model.decode(h, skips[:-1], emb)


def test_unet_null_token():
    model = randomize(tiny_unet(num_classes=3))
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    null = model(x, t)
    assert torch.equal(model(x, t, labels=None), null)
    assert torch.allclose(model(x, t, labels=torch.full((3,), -1)), null)
    assert torch.allclose(model(x, t, labels=torch.tensor([-1, 1, -1]))[[0, 2]], null[[0, 2]])
    assert not torch.allclose(model(x, t, labels=torch.tensor([0, 1, 2])), null)


def test_null_conditioning_drops_every_conditioning_of_the_networks():
    """diffusion.null_conditioning builds what the networks read as 'absent': the null label token and
    NaN rows (Chapter 6). Dropping every conditioning leaves the embedding of time and the null token
    only; `where` drops it for some examples only."""
    from minidiff.diffusion import null_conditioning

    model = randomize(tiny_unet(num_classes=3, latent_dim=3, position_embedding=True,
                                guidance_embedding=True))
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(4, 1, 8, 8, generator=g), torch.rand(4, generator=g)
    cond = dict(labels=torch.tensor([0, 1, 2, 1]), latent=torch.randn(4, 3, generator=g),
                position=torch.rand(4, 2, generator=g) * 2 - 1, w=torch.rand(4, generator=g))
    null = model(x, t, **null_conditioning(cond))
    emb = model.embedding.time(t) + model.embedding.labels(None, 4)  # time and the null token only
    torch.testing.assert_close(model.embedding(t, **null_conditioning(cond)), emb)
    where = torch.tensor([True, False, False, True])
    some = model(x, t, **null_conditioning(cond, where=where))
    full = model(x, t, **cond)
    torch.testing.assert_close(some[where], null[where], rtol=0, atol=1e-6)
    torch.testing.assert_close(some[~where], full[~where], rtol=0, atol=1e-6)
    assert not torch.allclose(null, full)
    mlp = randomize(MLPDenoiser(num_classes=3, hidden=16, depth=1, emb_dim=16))
    z = torch.randn(4, 2, generator=g)
    assert torch.equal(mlp(z, t, **null_conditioning({"labels": cond["labels"]})), mlp(z, t))


def test_unet_conditioning_changes_output():
    model = randomize(tiny_unet(latent_dim=3, position_embedding=True, guidance_embedding=True))
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    base = dict(latent=torch.zeros(2, 3), position=torch.zeros(2, 2), w=torch.zeros(2))
    out = model(x, t, **base)
    for key, value in [("latent", torch.ones(2, 3)), ("position", torch.ones(2, 2)), ("w", torch.ones(2))]:
        assert not torch.allclose(model(x, t, **{**base, key: value}), out), key


def test_unet_bad_inputs():
    model = tiny_unet(in_channels=1, position_embedding=True)
    t, pos = torch.rand(2), torch.zeros(2, 2)
    with pytest.raises(ValueError, match="in_channels=1"):
        model(torch.randn(2, 3, 8, 8), t, position=pos)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(2, 1, 7, 8), t, position=pos)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(2, 8, 8), t, position=pos)
    with pytest.raises(ValueError, match="'position' is required"):
        model(torch.randn(2, 1, 8, 8), t)
    with pytest.raises(ValueError, match="unknown conditioning"):
        model(torch.randn(2, 1, 8, 8), t, position=pos, classes=torch.zeros(2))
    with pytest.raises(ValueError, match="built without"):
        model(torch.randn(2, 1, 8, 8), t, position=pos, labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(2, 1, 8, 8), torch.rand(3), position=pos)
    with pytest.raises(ValueError, match="divisible by groups"):
        UNet(base_channels=12, groups=8)
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNet(image_size=16, attention_resolutions=(32,))
    with pytest.raises(ValueError, match="image_size"):
        UNet(image_size=12, channel_mults=(1, 2, 2, 2))


def test_unet_other_sizes_and_levels():
    model = tiny_unet(channel_mults=(1, 2, 2), image_size=32, attention_resolutions=(8,))
    for size in (32, 16, 12):  # fully convolutional: any size divisible by 4
        assert model(torch.randn(1, 1, size, size), torch.rand(1)).shape == (1, 1, size, size)
    assert model(torch.randn(1, 1, 8, 16), 0.3).shape == (1, 1, 8, 16)


def test_unet_parameter_count():
    model = UNet()  # default small config
    n = sum(p.numel() for p in model.parameters())
    assert 3e5 < n < 1e6
    n_cond = sum(p.numel() for p in UNet(num_classes=10).parameters())
    assert n_cond - n == 11 * 128  # one row per class plus the null token


def test_unet_output_starts_at_zero_and_is_deterministic():
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    a, b = tiny_unet(), tiny_unet()
    assert torch.equal(a(x, t), torch.zeros_like(x))  # zero-initialised last layer (Ho et al. 2020 code)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_unet_gradients_reach_every_parameter():
    model = randomize(tiny_unet(num_classes=2, latent_dim=2, attention_resolutions=(8,)))
    x = torch.randn(2, 1, 8, 8)
    model(x, torch.rand(2), labels=torch.tensor([0, 1]), latent=torch.randn(2, 2)).pow(2).mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == ["embedding.labels.table.weight"] or dead == []
    # the null-token row gets a gradient only when a label is -1
    assert model.embedding.labels.table.weight.grad[2].abs().sum() == 0


# ----------------------------------------------------------------------------- MLP


def test_mlp_shapes_and_conditioning():
    torch.manual_seed(0)
    model = randomize(MLPDenoiser(hidden=32, depth=2, emb_dim=16, num_classes=5, latent_dim=3))
    z, t = torch.randn(6, 2), torch.rand(6)
    out = model(z, t, labels=torch.randint(5, (6,)), latent=torch.randn(6, 3))
    assert out.shape == (6, 2)
    null = model(z, t, latent=torch.zeros(6, 3))
    assert torch.allclose(model(z, t, labels=torch.full((6,), -1), latent=torch.zeros(6, 3)), null)
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        model(torch.randn(6, 3), t, latent=torch.zeros(6, 3))
    with pytest.raises(ValueError, match="'latent' is required"):
        model(z, t)
    with pytest.raises(ValueError, match="built without"):
        model(z, t, latent=torch.zeros(6, 3), position=torch.zeros(6, 2))
    with pytest.raises(ValueError, match="unknown conditioning"):
        model(z, t, latent=torch.zeros(6, 3), label=torch.zeros(6, dtype=torch.long))
    assert MLPDenoiser(hidden=16, depth=1, emb_dim=16, fourier_features=0)(z, t).shape == (6, 2)
    plain = MLPDenoiser()
    assert 5e5 < sum(p.numel() for p in plain.parameters()) < 1.2e6
    assert torch.equal(plain(z, t), torch.zeros_like(z))


def test_models_run_in_bfloat16():
    unet = tiny_unet(num_classes=3, latent_dim=2, position_embedding=True).to(torch.bfloat16)
    x = torch.randn(2, 1, 8, 8, dtype=torch.bfloat16)
    cond = dict(labels=torch.tensor([0, -1]), latent=torch.randn(2, 2), position=torch.zeros(2, 2))
    out = unet(x, torch.rand(2), **cond)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    mlp = MLPDenoiser(hidden=16, depth=1, emb_dim=16, guidance_embedding=True).to(torch.bfloat16)
    assert mlp(torch.randn(3, 2, dtype=torch.bfloat16), 0.5, w=2.0).dtype == torch.bfloat16
