"""Patch-DM (minidiff.patchdm, Chapter 8): the collage geometry, exactly; the four patch-wise models; the
training loss and its mask; bad layouts."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minidiff import samplers, schedules
from minidiff.nn import UNet
from minidiff.patchdm import (
    FeatureCollage,
    NaivePatches,
    OverlapAverage,
    SemanticCodes,
    ShiftedWindows,
    check_patch_layout,
    collage,
    collage_windows,
    crop_half,
    from_patches,
    pad_half,
    patch_dm_loss,
    patch_positions,
    seam_score,
    to_patches,
)

F64 = torch.float64


class PixelwiseUNet(nn.Module):
    """A UNet whose layers act pixel by pixel: 1x1 convolutions, 2x2 average pooling down, nearest x2 up,
    skips concatenated, t added as a constant, no position. On a grid aligned with its pooling, any way of
    cutting the image into windows must give the full-image output: the exact check of the collage."""

    def __init__(self, channels=3, width=4, levels=3):
        super().__init__()
        self.levels, self.factor = levels, 2 ** (levels - 1)
        g = torch.Generator().manual_seed(0)

        def conv(i, o):
            c = nn.Conv2d(i, o, 1).double()
            with torch.no_grad():
                c.weight.copy_(torch.randn(c.weight.shape, generator=g, dtype=F64) / i**0.5)
                c.bias.copy_(torch.randn(c.bias.shape, generator=g, dtype=F64) * 0.1)
            return c

        self.inp = conv(channels, width)
        self.down = nn.ModuleList(conv(width, width) for _ in range(levels))
        self.mid = conv(width, width)
        self.up = nn.ModuleList(conv(2 * width, width) for _ in range(levels))
        self.out = conv(width, channels)
        self.embedded = []

    def embed(self, t, batch_size, **cond):
        self.embedded.append(cond.get("position"))
        t = torch.as_tensor(t, dtype=F64)
        return (t.expand(batch_size) if t.ndim == 0 else t)[:, None, None, None]

    def encode(self, x, t, **cond):
        emb = self.embed(t, len(x), **cond)
        h, skips = self.inp(x) + emb, []
        for k, layer in enumerate(self.down):
            h = F.silu(layer(h))
            skips.append(h)
            if k < self.levels - 1:
                h = F.avg_pool2d(h, 2)
        return F.silu(self.mid(h)) + emb, skips, emb

    def decode(self, h, skips, emb):
        skips = list(skips)
        for k, layer in enumerate(self.up):
            h = F.silu(layer(torch.cat([h, skips.pop()], dim=1))) + emb
            if k < self.levels - 1:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
        return self.out(h)

    def forward(self, x, t, **cond):
        return self.decode(*self.encode(x, t, **cond))


def image(h=32, w=48, c=3, seed=0):
    return torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_every_pixel_is_covered_exactly_once_by_the_shifted_patches():
    p, rows, cols = 8, 3, 5
    ids = torch.arange(rows * p * cols * p, dtype=F64).reshape(1, 1, rows * p, cols * p) + 1
    padded = pad_half(ids, p)                                     # border: 0
    shifted = from_patches(collage(to_patches(padded, p), rows, cols), rows, cols)
    assert torch.equal(shifted, ids)                              # each pixel once, in its place, no border
    assert torch.equal(crop_half(padded, p), ids)
    assert torch.equal(from_patches(to_patches(ids, p), rows, cols), ids)


def test_feature_collage_reproduces_the_full_image_network_at_every_resolution():
    net = PixelwiseUNet()
    p, z, t = 16, image(), torch.tensor([0.3, 0.7], dtype=F64)
    rows, cols = check_patch_layout(32, 48, p, net.factor)
    h_full, skips_full, _ = net.encode(z, t)
    h_p, skips_p, _ = net.encode(to_patches(pad_half(z, p), p), t.repeat_interleave((rows + 1) * (cols + 1)))
    for full, patched in zip([h_full, *skips_full], [h_p, *skips_p], strict=True):   # every level, exactly
        collaged = from_patches(collage(patched, rows, cols), rows, cols)
        torch.testing.assert_close(collaged, full, rtol=0, atol=1e-12)
    torch.testing.assert_close(FeatureCollage(net, p)(z, t), net(z, t), rtol=0, atol=1e-12)
    torch.testing.assert_close(FeatureCollage(net, p, stream=True)(z, t), net(z, t), rtol=0, atol=1e-12)


@pytest.mark.parametrize("stream", [False, True])
def test_the_margin_collage_is_exact_and_keeps_the_centre_of_each_window(stream):
    net, p, z, t = PixelwiseUNet(), 16, image(), torch.tensor([0.3, 0.7], dtype=F64)
    torch.testing.assert_close(FeatureCollage(net, p, stream=stream, margin=True)(z, t), net(z, t),
                               rtol=0, atol=1e-12)
    ids = torch.arange(3 * 8 * 5 * 8, dtype=F64).reshape(1, 1, 24, 40) + 1
    windows = collage_windows(to_patches(pad_half(ids, 8), 8), 3, 5)
    assert windows.shape == (15, 1, 16, 16)
    assert torch.equal(from_patches(windows[..., 4:12, 4:12], 3, 5), ids)   # the centres: the shifted patches
    assert torch.equal(windows[6, 0, 4:12, :12], ids[0, 0, 8:16, 4:16])    # a margin of p/2: its neighbours


def test_the_margin_collage_differs_from_the_collage_for_a_real_unet():
    torch.manual_seed(0)
    net = UNet(in_channels=1, base_channels=8, channel_mults=(1, 2), image_size=8, position_embedding=True)
    for param in net.parameters():                 # the output layer starts at zero: give it weights
        torch.nn.init.normal_(param, std=0.3)
    z = torch.randn(1, 1, 16, 24)
    with torch.no_grad():
        margin, plain = FeatureCollage(net, 8, margin=True)(z, 0.5), FeatureCollage(net, 8)(z, 0.5)
        streamed = FeatureCollage(net, 8, margin=True, stream=True)(z, 0.5)
    assert margin.shape == z.shape and bool(torch.isfinite(margin).all())
    assert not torch.allclose(margin, plain)
    torch.testing.assert_close(streamed, margin)


@pytest.mark.parametrize("method", [NaivePatches, OverlapAverage, "shifted"])
def test_every_patch_method_is_exact_for_a_pixelwise_network(method):
    net, p, z, t = PixelwiseUNet(), 16, image(), torch.tensor(0.4, dtype=F64)
    grid = torch.tensor([0.4, 0.2, 0.0], dtype=F64)
    model = ShiftedWindows(net, p, grid) if method == "shifted" else method(net, p)
    torch.testing.assert_close(model(z, t), net(z, t.expand(2)), rtol=0, atol=1e-12)
    if method == "shifted":
        assert [model.shifted_at(s) for s in (0.4, 0.2)] == [False, True]
        t2 = torch.tensor(0.2, dtype=F64)
        torch.testing.assert_close(model(z, t2), net(z, t2.expand(2)), rtol=0, atol=1e-12)
        with pytest.raises(ValueError, match="not a time of this sampler's grid"):
            model(z, 0.3)


def test_a_real_unet_breaks_the_naive_split_but_the_collage_has_the_full_image_shape():
    torch.manual_seed(0)
    net = UNet(in_channels=1, base_channels=8, channel_mults=(1, 2), image_size=8, position_embedding=True)
    z = torch.randn(2, 1, 16, 24)
    for model in (NaivePatches(net, 8), FeatureCollage(net, 8), OverlapAverage(net, 8),
                  ShiftedWindows(net, 8, [0.5, 0.0])):
        with torch.no_grad():
            out = model(z, 0.5)
        assert out.shape == z.shape and bool(torch.isfinite(out).all())
    assert OverlapAverage(net, 8).nfe_per_call == 4 and FeatureCollage(net, 8).nfe_per_call == 1
    with torch.no_grad():   # row by row, the same output as all patches at once
        streamed, at_once = FeatureCollage(net, 8, stream=True)(z, 0.5), FeatureCollage(net, 8)(z, 0.5)
    torch.testing.assert_close(streamed, at_once)
    run = samplers.sample(FeatureCollage(net, 8), schedules.get_schedule("linear", T=1000),
                          schedules.respace(1000, 3, "trailing"), samplers.DDIMStep(0.0), z=z, progress=False)
    assert run.x.shape == z.shape and run.nfe == 3


def test_the_decoder_sees_the_shifted_positions_and_the_encoder_the_padded_grid():
    net, p = PixelwiseUNet(), 16
    net.embedding = type("E", (), {"position": True})()           # make the wrapper pass positions
    FeatureCollage(net, p)(image(), 0.5)
    enc, dec = net.embedded[0], net.embedded[1]
    rows, cols = 2, 3
    torch.testing.assert_close(enc, patch_positions(rows + 1, cols + 1, rows, cols, 0.0).repeat(2, 1))
    torch.testing.assert_close(dec, patch_positions(rows, cols, rows, cols, 0.5).repeat(2, 1))
    assert float(enc.min()) == -1.0 and float(enc.max()) == 1.0   # the padded grid spans the image's corners
    assert float(dec.abs().max()) < 1.0                           # the image's own patches lie inside


def test_bad_layouts_get_clear_errors():
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        check_patch_layout(20, 16, 8)
    with pytest.raises(ValueError, match="larger than the image"):
        check_patch_layout(16, 16, 32)
    with pytest.raises(ValueError, match="even integer"):
        check_patch_layout(15, 15, 5)
    with pytest.raises(ValueError, match="downsampling factor 4"):
        check_patch_layout(24, 24, 12, factor=4)
    net = PixelwiseUNet()
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        FeatureCollage(net, 16)(image(h=40), 0.5)
    with pytest.raises(ValueError, match="larger than the image"):
        NaivePatches(net, 64)(image(), 0.5)


class Recorder(UNet):
    """A UNet that keeps its decoder outputs, to read the loss's gradient with respect to them."""

    def decode(self, h, skips, emb):
        out = super().decode(h, skips, emb)
        out.retain_grad()
        self.outputs.append(out)
        return out


def test_the_masked_loss_ignores_the_padded_border():
    torch.manual_seed(0)
    net = Recorder(in_channels=1, base_channels=8, channel_mults=(1, 2), image_size=8,
                   position_embedding=True)
    net.outputs = []
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    sched = schedules.get_schedule("linear", T=1000)
    gen = torch.Generator().manual_seed(1)
    loss = patch_dm_loss(net, sched, x, 8, generator=gen)
    loss.backward()
    unshifted, centre = net.outputs                                  # (4B, 1, 8, 8) and (B, 1, 8, 8)
    g = torch.Generator().manual_seed(1)                             # the loss's first draws: the blocks
    a, b = torch.randint(2, (3,), generator=g), torch.randint(2, (3,), generator=g)
    inside = pad_half(torch.ones(3, 1, 16, 16), 8)
    for k in range(3):
        block_mask = inside[k, :, a[k] * 8:a[k] * 8 + 16, b[k] * 8:b[k] * 8 + 16]
        grad = from_patches(unshifted.grad[4 * k:4 * k + 4], 2, 2)[0]
        assert bool((grad[block_mask == 0] == 0).all())             # the border has no say in the loss
        assert bool((grad[block_mask == 1] != 0).all())
    assert bool((centre.grad != 0).all())                            # the shifted centre is never border


def test_the_loss_trains_with_codes_dropout_and_gradients_reach_the_codes():
    torch.manual_seed(0)
    codes = SemanticCodes(5, 6, generator=torch.Generator().manual_seed(0))
    net = UNet(in_channels=1, base_channels=8, channel_mults=(1, 2), image_size=8, position_embedding=True,
               latent_dim=6)
    with torch.no_grad():   # the UNet's zero-initialised output layers would stop every gradient to the codes
        for p in net.parameters():
            if not bool(p.abs().sum() > 0):
                p.normal_(0, 0.05)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    loss = patch_dm_loss(net, schedules.get_schedule("linear", T=1000), x, 8,
                         cond={"latent": codes(torch.arange(4))}, generator=torch.Generator().manual_seed(0),
                         p_uncond=0.5, p_drop_position=0.5)
    loss.backward()
    assert torch.isfinite(loss) and codes.table.grad is not None
    assert bool(codes.table.grad[:4].abs().sum() > 0) and not bool(codes.table.grad[4].abs().sum() > 0)
    assert bool(torch.isnan(codes(torch.tensor([-1, 2]))[0]).all())
    assert not bool(torch.isnan(codes(torch.tensor([2]))).any())
    with pytest.raises(ValueError, match="out of range"):
        codes(torch.tensor([5]))


def test_seam_score_is_about_one_for_real_textures_and_large_for_tiles():
    from minidiff import data

    real = data.photo_crops(16, 64, ("grass",), grayscale=True, generator=torch.Generator().manual_seed(0))
    assert seam_score(real, 16) == pytest.approx(1.0, abs=0.05)   # its borders fall at random places
    g = torch.Generator().manual_seed(0)
    offsets = torch.randn(16, 1, 4, 4, generator=g).repeat_interleave(16, 2).repeat_interleave(16, 3)
    tiles = real + 0.5 * offsets                                    # a constant step at every patch border
    assert seam_score(tiles, 16) > 2
    with pytest.raises(ValueError, match="not a multiple"):
        seam_score(real, 24)


def test_seam_score_offset_finds_seams_on_the_half_shifted_grid():
    tiles = torch.zeros(1, 1, 32, 32)
    tiles[..., 8:24, 8:24] = 1.0                     # one square with edges at 8 and 24: the p/2-shifted grid
    tiles = tiles + 0.01 * torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert seam_score(tiles, 16, offset=8) > 5 * seam_score(tiles, 16)
    for bad in (-1, 16, 2.0, True):
        with pytest.raises(ValueError, match="offset must be an integer"):
            seam_score(tiles, 16, offset=bad)
