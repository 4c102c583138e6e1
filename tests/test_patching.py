"""PDM patching (minidiff.patching, Chapter 7): patch order, round trip, the Patched wrapper, model
splitting, and the optimal denoiser x* of a data set (analytic.EmpiricalDenoiser)."""

import pytest
import torch

from minidiff import diffusion, samplers
from minidiff.analytic import EmpiricalDenoiser
from minidiff.nn import UNet
from minidiff.patching import Patched, SplitModel, patched_unet_kwargs, patchify, split_time, unpatchify
from minidiff.schedules import CosineSchedule, get_schedule

F64 = torch.float64


def images(b=3, c=2, h=8, w=12, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("P", [1, 2, 4])
def test_patchify_has_tf_extract_patches_order_and_round_trips(P):
    """Channel (p1 * P + p2) * C + c of grid cell (i, j) is pixel (i P + p1, j P + p2) of channel c:
    TF image.extract_patches' (row, column, channel) order, as in the official code."""
    x = images()
    out = patchify(x, P)
    B, C, H, W = x.shape
    assert out.shape == (B, C * P * P, H // P, W // P)
    expected = torch.empty_like(out)
    for i in range(H // P):
        for j in range(W // P):
            for p1 in range(P):
                for p2 in range(P):
                    for c in range(C):
                        expected[:, (p1 * P + p2) * C + c, i, j] = x[:, c, i * P + p1, j * P + p2]
    assert torch.equal(out, expected)
    assert torch.equal(unpatchify(out, P), x)


def paper_appendix_b_unpatchify(x, p):
    """Appendix B's convert_patches_to_image, as printed: the first reshape's result is dropped."""
    B, C, H, W = x.shape
    x = x.permute(0, 3, 2, 1)
    x.reshape(B, W, H * p, C // p)  # noqa: B018 - the paper's dropped result
    x = x.permute(0, 2, 1, 3)
    x = x.reshape(B, H * p, W * p, C // (p * p))
    return x.permute(0, 3, 1, 2)


def test_the_papers_unpatchify_has_the_right_shape_and_scrambled_pixels():
    x = images(h=8, w=8)
    back = paper_appendix_b_unpatchify(patchify(x, 4), 4)
    assert back.shape == x.shape and not torch.equal(back, x)
    assert torch.equal(
        torch.sort(back.flatten()).values, torch.sort(x.flatten()).values
    )  # the same pixels, moved


def test_bad_patch_sizes_get_clear_errors():
    with pytest.raises(ValueError, match="not divisible by the patch size P = 3"):
        patchify(images(), 3)
    with pytest.raises(ValueError, match="integer >= 1"):
        patchify(images(), 0)
    with pytest.raises(ValueError, match="integer >= 1"):
        Patched(torch.nn.Identity(), 1.5)
    with pytest.raises(ValueError, match="multiple of P"):
        unpatchify(torch.randn(1, 6, 2, 2), 2)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        patchify(torch.randn(4, 8), 2)


def test_a_patched_model_with_p_one_is_the_model_and_patched_unets_train_and_sample():
    torch.manual_seed(0)
    net = UNet(in_channels=1, base_channels=8, channel_mults=(1, 2), image_size=8)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    z, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    assert torch.equal(Patched(net, 1)(z, t), net(z, t))
    pnet = UNet(**patched_unet_kwargs(2, 1, 16, base_channels=8, channel_mults=(1, 2)))
    model = Patched(pnet, 2)
    x = torch.randn(6, 1, 16, 16)
    loss = diffusion.training_loss(
        model, CosineSchedule(), x, prediction="x", weighting="x", generator=torch.Generator().manual_seed(0)
    )
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in pnet.parameters() if p.requires_grad)
    run = samplers.sample(
        model.eval(),
        CosineSchedule(),
        torch.linspace(1, 0, 5, dtype=F64),
        samplers.DDIMStep(0.0),
        shape=(2, 1, 16, 16),
        prediction="x",
        progress=False,
    )
    assert run.x.shape == (2, 1, 16, 16) and run.nfe == 4


def test_split_time_is_the_papers_step_396_on_the_linear_schedule():
    """The official code's 0-indexed timestep 396 is our step i = 397 (alpha-bar_i = alphas_cumprod[i-1])."""
    linear = get_schedule("linear", T=1000)
    S = split_time(linear, 0.25)
    assert S == pytest.approx(0.397)
    assert float(linear.alphas_cumprod[396] / (1 - linear.alphas_cumprod[396])) <= 0.25
    assert float(linear.alphas_cumprod[395] / (1 - linear.alphas_cumprod[395])) > 0.25
    S = split_time(CosineSchedule(), 0.25)
    assert float(CosineSchedule().snr(torch.tensor(S, dtype=F64))) == pytest.approx(0.25, rel=1e-6)
    with pytest.raises(ValueError, match="snr must be > 0"):
        split_time(CosineSchedule(), 0.0)


def test_split_model_picks_the_network_of_each_time_on_both_sides_of_the_split():
    low = lambda z, t, **c: torch.zeros_like(z)  # noqa: E731
    high = lambda z, t, **c: torch.ones_like(z)  # noqa: E731
    split = SplitModel([low, high], [0.396])
    t = torch.tensor([0.1, 0.395, 0.396, 0.3961, 0.9, 1.0])
    z = torch.randn(6, 1, 4, 4)
    out = split(z, t, labels=torch.arange(6))
    assert out[:, 0, 0, 0].tolist() == [0, 0, 0, 1, 1, 1]  # t <= S: the low-noise network
    assert split.ranges == [(0.0, 0.396), (0.396, 1.0)]
    assert split(z[:2], 0.2).abs().sum() == 0 and bool((split(z[:2], 0.7) == 1).all())
    # a mixed split: P = 2 at high noise, P = 1 at low noise, as one model
    net_lo = UNet(in_channels=1, base_channels=8, channel_mults=(1,), image_size=4)
    net_hi = UNet(**patched_unet_kwargs(2, 1, 4, base_channels=8, channel_mults=(1,)))
    mixed = SplitModel([net_lo, Patched(net_hi, 2)], [0.5])
    assert mixed(z, t).shape == z.shape
    # at the paper's S = 0.397, float32 0.397 > float64 0.397: it must still go to the network below S
    S = split_time(get_schedule("linear", T=1000), 0.25)
    at_S = SplitModel([low, high], [S])
    for dtype in (torch.float32, torch.float64):
        t = torch.tensor([S - 1e-3, S, S + 1e-3], dtype=dtype)
        assert at_S.index(t).tolist() == [0, 0, 1], dtype
    with pytest.raises(ValueError, match="one more network"):
        SplitModel([low], [0.5])
    with pytest.raises(ValueError, match="increasing"):
        SplitModel([low, high, low], [0.6, 0.4])


def brute_force_x_star(data, z, alpha, sigma):
    """E[x | z] under q(x) = mean of deltas, by Bayes' rule term by term (eq. (4))."""
    out = []
    for zi in z:
        like = torch.stack([torch.exp(-((zi - alpha * x) ** 2).sum() / (2 * sigma**2)) for x in data])
        out.append((like[:, None] * data.reshape(len(data), -1)).sum(0) / like.sum())
    return torch.stack(out).reshape(z.shape)


@pytest.mark.parametrize("t", [0.2, 0.5, 0.8])
def test_x_star_is_the_exact_posterior_mean_and_minimises_the_x_mse(t):
    schedule = CosineSchedule()
    data = torch.randn(20, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    z = torch.randn(7, 1, 3, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    alpha, sigma = schedule.alpha_sigma(torch.tensor(t, dtype=F64))
    for batch in (1, 6, 1024):  # chunked over the data or all at once
        x_star = EmpiricalDenoiser(data, schedule, batch_size=batch)(z, torch.full((7,), t, dtype=F64))
        torch.testing.assert_close(x_star, brute_force_x_star(data, z, alpha, sigma), rtol=1e-10, atol=1e-12)
    # it minimises E_{q(x|z)} |f - x|^2: every perturbation delta raises it by exactly |delta|^2
    den = EmpiricalDenoiser(data, schedule)
    w = den.posterior_weights(z, t)
    flat = data.reshape(20, -1)
    like = torch.exp(-((z.reshape(7, 1, -1) - alpha * flat[None]) ** 2).sum(-1) / (2 * sigma**2))
    torch.testing.assert_close(w, like / like.sum(1, keepdim=True), rtol=1e-10, atol=1e-14)

    def posterior_mse(f):
        return (w * ((f.reshape(7, 1, -1) - flat[None]) ** 2).sum(-1)).sum(1)

    best = posterior_mse(x_star)
    for seed in range(5):
        delta = 0.1 * torch.randn(z.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
        torch.testing.assert_close(posterior_mse(x_star + delta) - best, (delta**2).reshape(7, -1).sum(1))
        assert bool((posterior_mse(x_star + delta) > best).all())


def test_x_star_predictions_and_errors():
    schedule = CosineSchedule()
    data = torch.randn(10, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    z, t = torch.randn(4, 2, dtype=F64), torch.full((4,), 0.3, dtype=F64)
    x = EmpiricalDenoiser(data, schedule, "x")(z, t)
    eps = EmpiricalDenoiser(data, schedule, "eps")(z, t)
    alpha, sigma = schedule.alpha_sigma(t)
    torch.testing.assert_close(alpha[:, None] * x + sigma[:, None] * eps, z)
    nearest = EmpiricalDenoiser(data, schedule)(
        data[:3] + 1e-9, torch.zeros(3, dtype=F64)
    )  # sigma = 0: the data point
    torch.testing.assert_close(nearest, data[:3], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="example shape"):
        EmpiricalDenoiser(data, schedule)(torch.randn(4, 3, dtype=F64), t)
    with pytest.raises(ValueError, match="batch_size"):
        EmpiricalDenoiser(data, schedule, batch_size=0)


def test_power_spectrum_finds_a_sinusoid_and_blur_lowers_the_high_frequency_share():
    from minidiff.patching import high_frequency_fraction, radial_power_spectrum

    n = torch.arange(32, dtype=F64)
    wave = torch.cos(2 * torch.pi * 5 * n / 32)[None, None, None, :].expand(
        2, 1, 32, 32
    )  # 5 cycles per image
    freqs, power = radial_power_spectrum(wave)
    assert int(freqs[power.argmax()]) == 5 and float(power[0]) < 1e-20
    sharp = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0), dtype=F64)
    blurred = torch.nn.functional.avg_pool2d(sharp, 3, stride=1, padding=1)
    more = torch.nn.functional.avg_pool2d(sharp, 5, stride=1, padding=2)
    hf = [high_frequency_fraction(x) for x in (more, blurred, sharp)]
    assert hf[0] < hf[1] < 0.7 * hf[2]
    assert 0.9 < high_frequency_fraction(sharp, 0.01) <= 1.0  # white noise: nearly all above 1% of Nyquist
    with pytest.raises(ValueError, match="cutoff"):
        high_frequency_fraction(sharp, 1.5)


def test_patching_divides_the_saved_activation_memory():
    from minidiff.patching import saved_activation_bytes

    x = torch.randn(4, 1, 16, 16)

    def memory(P):
        torch.manual_seed(0)
        model = Patched(UNet(**patched_unet_kwargs(P, 1, 16, base_channels=8, channel_mults=(1, 2))), P)
        return saved_activation_bytes(
            lambda: diffusion.training_loss(model, CosineSchedule(), x, prediction="x", weighting="x"),
            exclude=model.parameters(),
        )

    m1, m4 = memory(1), memory(4)
    assert m1 > 0 and m1 / m4 > 3.5


def test_peak_allocated_bytes_sees_a_temporary_allocation():
    from minidiff.patching import peak_allocated_bytes

    def make_and_drop():
        a = torch.empty(1_000_000)           # 4 MB, freed before the next one
        del a
        b = torch.empty(500_000)
        return float(b.sum() * 0)

    peak = peak_allocated_bytes(make_and_drop)
    assert 4_000_000 <= peak < 7_000_000
