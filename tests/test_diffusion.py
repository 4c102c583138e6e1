"""Identities of the forward process, the posterior, the predictions and the loss (minidiff.diffusion)."""

import itertools

import pytest
import torch

from minidiff.diffusion import (
    PREDICTIONS,
    NonFiniteLossError,
    convert_prediction,
    denoise,
    expand_like,
    loss_weight,
    null_conditioning,
    posterior,
    posterior_coefficients,
    predict_eps,
    predict_v,
    predict_x,
    prediction_from,
    q_sample,
    q_step,
    training_loss,
    transition,
)
from minidiff.schedules import SCHEDULES, DiscreteSchedule, get_schedule

F64 = torch.float64
SCHEDULE_LIST = [get_schedule(name) for name in SCHEDULES]
IDS = list(SCHEDULES)
CONVERT = {"x": predict_x, "eps": predict_eps, "v": predict_v}


class TinyModel(torch.nn.Module):
    """A fixed linear map of (z, t): enough to test losses without minidiff.nn."""

    def __init__(self, dim, dtype=F64):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(dim + 1, dim, dtype=dtype)

    def forward(self, z, t, **cond):
        h = torch.cat([z.flatten(1), t[:, None].to(z.dtype)], dim=1)
        return self.linear(h).reshape(z.shape)


def random_times(n, low=0.0, high=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, generator=g, dtype=F64)


# ----------------------------------------------------------------------------- forward process


@pytest.mark.parametrize("schedule", SCHEDULE_LIST, ids=IDS)
def test_closed_form_equals_iterated_kernel_coefficients(schedule):
    """q(z_t|x) (eq. 4) equals q(z_0|x) followed by the one-step kernels, exactly (as coefficients)."""
    times = torch.cat([torch.zeros(1, dtype=F64), random_times(30).sort().values, torch.ones(1, dtype=F64)])
    alpha0, sigma0 = schedule.alpha_sigma(times[:1])
    mean_coef, var = alpha0, sigma0**2
    for s, t in itertools.pairwise(times):
        alpha_ts, var_ts = transition(schedule, s=s, t=t)
        mean_coef, var = alpha_ts * mean_coef, alpha_ts**2 * var + var_ts
        alpha_t, sigma_t = schedule.alpha_sigma(t)
        torch.testing.assert_close(mean_coef.squeeze(), alpha_t, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(var.squeeze(), sigma_t**2, rtol=1e-10, atol=1e-14)


def test_kernel_on_the_grid_is_ddpm_eq2():
    """On t = i/T the kernel is q(x_i | x_{i-1}) = N(sqrt(1 - beta_i) x_{i-1}, beta_i I)."""
    schedule = get_schedule("cosine", T=200)
    i = torch.arange(1, 201, dtype=F64)
    alpha_ts, var_ts = transition(schedule, s=(i - 1) / 200, t=i / 200)
    torch.testing.assert_close(alpha_ts, (1 - schedule.betas).sqrt(), rtol=1e-10, atol=0)
    torch.testing.assert_close(var_ts, schedule.betas, rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", ["linear", "cosine_continuous"])
def test_closed_form_equals_iterated_kernel_monte_carlo(name):
    schedule = get_schedule(name)
    n, t_end = 50_000, 0.7
    x = torch.full((n, 1), 0.8, dtype=F64)
    g = torch.Generator().manual_seed(1)
    times = [0.0, 0.05, 0.1, 0.3, 0.31, 0.5, t_end]
    z = q_sample(schedule, x, times[0], generator=g)[0]
    for s, t in itertools.pairwise(times):
        z = q_step(schedule, z, s=s, t=t, generator=g)
    z_direct = q_sample(schedule, x, t_end, generator=g)[0]
    alpha, sigma = schedule.alpha_sigma(torch.tensor(t_end, dtype=F64))
    for samples in (z, z_direct):
        assert abs(samples.mean() - alpha * 0.8) < 5 * sigma / n**0.5
        assert abs(samples.var() / sigma**2 - 1) < 5 * (2 / n) ** 0.5


def test_q_sample_uses_given_noise_and_generator():
    schedule = get_schedule("linear", T=100)
    x = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.1, 0.2, 0.5, 1.0])
    z, noise = q_sample(schedule, x, t, generator=torch.Generator().manual_seed(3))
    assert torch.equal(noise, torch.randn(x.shape, generator=torch.Generator().manual_seed(3)))
    alpha, sigma = schedule.alpha_sigma(t)
    torch.testing.assert_close(z, alpha[:, None, None, None] * x + sigma[:, None, None, None] * noise)
    z_again, _ = q_sample(schedule, x, t, noise=noise)
    assert torch.equal(z, z_again) and z.dtype == x.dtype


# ----------------------------------------------------------------------------- posterior


def bayes_by_quadrature(schedule, z_t, x, s, t):
    """Mean and variance of q(z_s|x) q(z_t|z_s), normalised numerically on a fine grid of z_s."""
    alpha_s, sigma_s = (float(v) for v in schedule.alpha_sigma(torch.tensor(s, dtype=F64)))
    alpha_t, sigma_t = (float(v) for v in schedule.alpha_sigma(torch.tensor(t, dtype=F64)))
    alpha_ts = alpha_t / alpha_s
    var_ts = sigma_t**2 - alpha_ts**2 * sigma_s**2
    # a grid that covers both the prior centre alpha_s x and the likelihood centre z_t / alpha_{t|s}
    low, high = sorted([alpha_s * x, z_t / alpha_ts])
    zs = torch.linspace(low - 12 * sigma_s, high + 12 * sigma_s, 200_001, dtype=F64)
    log_p = -((zs - alpha_s * x) ** 2) / (2 * sigma_s**2) - (z_t - alpha_ts * zs) ** 2 / (2 * var_ts)
    p = torch.exp(log_p - log_p.max())
    p = p / p.sum()
    mean = (p * zs).sum()
    return mean, (p * (zs - mean) ** 2).sum()


def bayes_by_conditioning(schedule, z_t, x, s, t):
    """Closed-form conditioning of the Gaussian joint (z_s, z_t) | x."""
    alpha_s, sigma_s = schedule.alpha_sigma(s)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    cov_st = (alpha_t / alpha_s) * sigma_s**2  # Cov(z_s, z_t | x)
    mean = alpha_s * x + cov_st / sigma_t**2 * (z_t - alpha_t * x)
    return mean, sigma_s**2 - cov_st**2 / sigma_t**2


@pytest.mark.parametrize("schedule", SCHEDULE_LIST, ids=IDS)
@pytest.mark.parametrize("s,t", [(0.1, 0.9), (0.3, 0.35), (0.5, 1.0), (0.02, 0.04), (0.6, 0.6005)])
def test_posterior_equals_bayes_quadrature(schedule, s, t):
    z_t, x = 0.37, -0.8
    mean, var = posterior(schedule, torch.full((1, 1), z_t, dtype=F64), torch.full((1, 1), x, dtype=F64),
                          t=t, s=s)
    mean_ref, var_ref = bayes_by_quadrature(schedule, z_t, x, s, t)
    torch.testing.assert_close(mean.squeeze(), mean_ref, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(var.squeeze(), var_ref, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULE_LIST, ids=IDS)
def test_posterior_equals_gaussian_conditioning(schedule):
    n = 500
    pair = random_times(2 * n, seed=5).reshape(2, n).sort(dim=0).values
    s, t = pair[0], pair[1] + 1e-6
    s[:3], t[:3] = torch.tensor([0.0, 0.0, 0.999], dtype=F64), torch.tensor([1.0, 0.001, 1.0], dtype=F64)
    g = torch.Generator().manual_seed(2)
    z_t, x = torch.randn(n, 2, generator=g, dtype=F64), torch.randn(n, 2, generator=g, dtype=F64)
    mean, var = posterior(schedule, z_t, x, t=t, s=s)
    mean_ref, var_ref = bayes_by_conditioning(schedule, z_t, x, s[:, None], t[:, None])
    assert var.shape == (n, 1)
    torch.testing.assert_close(mean, mean_ref, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(var, var_ref, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_on_grid_is_ddpm_eqs_6_7(name):
    T = 1000
    schedule = get_schedule(name, T=T)
    betas, alphas = schedule.betas, schedule.alphas
    abar = schedule.alphas_cumprod
    abar_prev = torch.cat([torch.ones(1, dtype=F64), abar[:-1]])
    coef_x = abar_prev.sqrt() * betas / (1 - abar)  # eq. (7)
    coef_z = alphas.sqrt() * (1 - abar_prev) / (1 - abar)
    beta_tilde = (1 - abar_prev) / (1 - abar) * betas
    i = torch.arange(1, T + 1, dtype=F64)
    ones, zeros = torch.ones(T, 1, dtype=F64), torch.zeros(T, 1, dtype=F64)
    mean_z, var = posterior(schedule, ones, zeros, t=i / T, s=(i - 1) / T)
    mean_x, _ = posterior(schedule, zeros, ones, t=i / T, s=(i - 1) / T)
    torch.testing.assert_close(mean_z.squeeze(1), coef_z, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mean_x.squeeze(1), coef_x, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(var.squeeze(1), beta_tilde, rtol=1e-9, atol=1e-15)
    assert var[0] == 0 and torch.equal(mean_x[0], ones[0])  # s = 0: z_0 = x exactly


# ----------------------------------------------------------------------------- predictions


def forward_quantities(schedule, shape=(64, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=F64)
    eps = torch.randn(shape, generator=g, dtype=F64)
    t = random_times(shape[0], 0.02, 0.98, seed)
    alpha, sigma = schedule.alpha_sigma(t)
    z = expand_like(alpha, x) * x + expand_like(sigma, x) * eps
    v = expand_like(alpha, x) * eps - expand_like(sigma, x) * x
    return {"x": x, "eps": eps, "v": v}, z, alpha, sigma, t


@pytest.mark.parametrize("schedule", SCHEDULE_LIST, ids=IDS)
@pytest.mark.parametrize("a,b", list(itertools.product(PREDICTIONS, PREDICTIONS)))
def test_prediction_conversions_round_trip(schedule, a, b):
    truth, z, alpha, sigma, _ = forward_quantities(schedule)
    b_from_a = CONVERT[b](truth[a], a, z, alpha, sigma)
    torch.testing.assert_close(b_from_a, truth[b], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(CONVERT[a](b_from_a, b, z, alpha, sigma), truth[a], rtol=1e-9, atol=1e-9)


def test_per_example_coefficients_with_batch_of_two():
    """A (B,) alpha must scale examples, not columns, even when B equals the data dimension."""
    z = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x_hat = predict_x(torch.zeros_like(z), "eps", z, torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.0]))
    assert torch.equal(x_hat, torch.tensor([[1.0, 2.0], [6.0, 8.0]]))


@pytest.mark.parametrize("schedule", SCHEDULE_LIST, ids=IDS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_one_conversion_and_its_inverse(schedule, prediction):
    """convert_prediction gives (x-hat, eps-hat) from any output; prediction_from goes back; clip_x clips
    x-hat and recomputes eps-hat from it (Chapter 1 §4)."""
    truth, z, alpha, sigma, _ = forward_quantities(schedule)
    x_hat, eps_hat = convert_prediction(truth[prediction], prediction, z_t=z, alpha=alpha, sigma=sigma)
    torch.testing.assert_close(x_hat, truth["x"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_hat, truth["eps"], rtol=1e-9, atol=1e-9)
    for other in PREDICTIONS:
        back = prediction_from(x_hat, eps_hat, other, alpha=alpha, sigma=sigma)
        torch.testing.assert_close(back, truth[other], rtol=1e-9, atol=1e-9)
        if (prediction, other) != ("v", "v"):  # predict_v passes a v-output through unchanged
            assert torch.equal(CONVERT[other](truth[prediction], prediction, z, alpha, sigma), back)
    x_c, eps_c = convert_prediction(truth[prediction], prediction, z_t=z, alpha=alpha, sigma=sigma,
                                    clip_x=0.5)
    assert x_c.abs().max() <= 0.5
    torch.testing.assert_close(expand_like(alpha, z) * x_c + expand_like(sigma, z) * eps_c, z)  # still z
    with pytest.raises(TypeError):
        convert_prediction(truth[prediction], prediction, z, alpha, sigma)  # keyword-only: cannot swap


def test_denoise_calls_the_model_once_and_converts():
    schedule = get_schedule("linear", T=100)
    model = TinyModel(4)
    z = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = torch.linspace(0.1, 1.0, 6, dtype=F64)
    x_hat, eps_hat = denoise(model, schedule, z, t, prediction="v", cond={"labels": None})
    alpha, sigma = schedule.alpha_sigma(t)
    with torch.no_grad():
        out = model(z, t)
    assert torch.equal(x_hat.detach(), predict_x(out, "v", z, alpha, sigma))
    assert torch.equal(eps_hat.detach(), predict_eps(out, "v", z, alpha, sigma))
    x_scalar, _ = denoise(model, schedule, z, 0.5, prediction="eps")  # a scalar time for the batch
    with torch.no_grad():
        out = model(z, torch.full((6,), 0.5, dtype=F64))
    alpha, sigma = schedule.alpha_sigma(torch.tensor(0.5, dtype=F64))
    assert torch.equal(x_scalar.detach(), predict_x(out, "eps", z, alpha, sigma))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        denoise(model, schedule, z, t[:3], prediction="eps")
    with pytest.raises(ValueError, match="shaped like its input z"):
        denoise(lambda z, t: z[:, :, :1], schedule, z, t, prediction="eps")
    with pytest.raises(ValueError, match="unknown prediction 'score'"):
        denoise(model, schedule, z, t, prediction="score")


def test_two_times_are_keyword_only():
    """transition, q_step, posterior and posterior_coefficients take s and t by keyword only, so that the
    two times cannot be swapped silently."""
    schedule = get_schedule("linear", T=10)
    z = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(TypeError):
        transition(schedule, 0.1, 0.5)
    with pytest.raises(TypeError):
        q_step(schedule, z, 0.1, 0.5)
    with pytest.raises(TypeError):
        posterior(schedule, z, z, 0.5, 0.1)
    with pytest.raises(TypeError):
        posterior_coefficients(schedule, 0.5, 0.1)
    with pytest.raises(ValueError, match="s < t"):
        transition(schedule, s=0.5, t=0.1)  # swapped by name: caught
    coef_z, coef_x, var = posterior_coefficients(schedule, t=0.5, s=0.4)
    mean, var_2 = posterior(schedule, z + 1, z + 2, t=0.5, s=0.4)
    assert torch.equal(mean, expand_like(coef_z, z) * (z + 1) + expand_like(coef_x, z) * (z + 2))
    assert torch.equal(var_2, var)


# ----------------------------------------------------------------------------- loss weights


@pytest.mark.parametrize("schedule", SCHEDULE_LIST, ids=IDS)
def test_loss_weights(schedule):
    truth, z, alpha, sigma, t = forward_quantities(schedule, shape=(64, 1, 2, 2))
    x_hat = truth["x"] + 0.3 * torch.randn(truth["x"].shape, generator=torch.Generator().manual_seed(9),
                                           dtype=F64)
    eps_hat = predict_eps(x_hat, "x", z, alpha, sigma)
    v_hat = predict_v(x_hat, "x", z, alpha, sigma)

    def mse(a, b):
        return (a - b).pow(2).flatten(1).mean(1)

    mse_x, mse_eps, mse_v = mse(x_hat, truth["x"]), mse(eps_hat, truth["eps"]), mse(v_hat, truth["v"])
    lam = schedule.logsnr(t)

    def weighted(name):
        return loss_weight(name, lam) * mse_x

    torch.testing.assert_close(weighted("eps"), mse_eps)  # eps-MSE == SNR * x-MSE
    torch.testing.assert_close(weighted("snr"), mse_eps)
    torch.testing.assert_close(weighted("x"), mse_x)
    torch.testing.assert_close(weighted("truncated_snr"), torch.maximum(mse_eps, mse_x))
    torch.testing.assert_close(weighted("snr+1"), mse_v)  # SNR + 1 == v-MSE
    torch.testing.assert_close(loss_weight("sqrt_snr", lam), alpha / sigma)
    assert loss_weight("x", lam.float()).dtype == torch.float32


# ----------------------------------------------------------------------------- training loss


@pytest.mark.parametrize("dtype,rtol", [(F64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", ["linear", "cosine_continuous"])
def test_training_loss_eps_is_l_simple(name, dtype, rtol):
    """prediction="eps", weighting="eps" is DDPM's L_simple = mean((eps-hat - eps)^2) (eq. 14)."""
    schedule = get_schedule(name)
    model = TinyModel(4, dtype=dtype)
    x = torch.randn(16, 1, 2, 2, generator=torch.Generator().manual_seed(0)).to(dtype)
    t = torch.linspace(0.01, 1.0, 16, dtype=dtype)
    loss = training_loss(model, schedule, x, t=t, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=dtype)  # same noise
    alpha, sigma = schedule.alpha_sigma(t)
    z = expand_like(alpha, x) * x + expand_like(sigma, x) * eps
    with torch.no_grad():
        expected = (model(z, t) - eps).pow(2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=rtol, atol=0)
    loss.backward()
    assert model.linear.weight.grad is not None


@pytest.mark.parametrize("prediction,weighting,target", [("x", "x", "x"), ("v", "snr+1", "v"),
                                                          ("x", "eps", "eps"), ("eps", "snr+1", "v")])
def test_training_loss_other_pairs(prediction, weighting, target):
    schedule = get_schedule("cosine", T=100)
    model = TinyModel(3)
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = torch.arange(1, 33, dtype=F64) / 40
    loss = training_loss(model, schedule, x, prediction, weighting, t=t,
                         generator=torch.Generator().manual_seed(4), reduction="none")
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    alpha, sigma = schedule.alpha_sigma(t)
    z = alpha[:, None] * x + sigma[:, None] * eps
    with torch.no_grad():
        out = model(z, t)
    truth = {"x": x, "eps": eps, "v": alpha[:, None] * eps - sigma[:, None] * x}
    estimate = CONVERT[target](out, prediction, z, alpha, sigma)
    assert loss.shape == (32,)
    torch.testing.assert_close(loss.detach(), (estimate - truth[target]).pow(2).mean(1), rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", ["linear", "linear_vp"])
def test_training_loss_samples_times_and_passes_cond(name):
    schedule = get_schedule(name, T=10) if name == "linear" else get_schedule(name)
    seen = {}

    def model(z, t, labels=None):
        seen["t"], seen["labels"] = t, labels
        return torch.zeros_like(z)

    x = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4096)
    loss = training_loss(model, schedule, x, generator=torch.Generator().manual_seed(0),
                         cond={"labels": labels})
    t = seen["t"]
    assert seen["labels"] is labels and t.shape == (4096,) and t.dtype == x.dtype
    assert (t > 0).all() and (t <= 1).all()
    if isinstance(schedule, DiscreteSchedule):
        steps = t * 10
        assert torch.equal(steps, steps.round()) and set(steps.round().long().tolist()) == set(range(1, 11))
    else:
        assert 0.45 < t.mean() < 0.55 and t.min() < 0.01 and t.max() > 0.99
    again = training_loss(model, schedule, x, generator=torch.Generator().manual_seed(0),
                          cond={"labels": labels})
    assert torch.equal(loss, again)  # deterministic with a seeded generator


@pytest.mark.parametrize("name", ["linear", "cosine_continuous"])
def test_training_loss_draws_t_from_a_sub_range(name):
    """t_range=(t_min, t_max): t ~ U(t_min, t_max], on a discrete schedule the steps i/T inside it (model
    splitting: each network of a split model trains on its own SNR range; Chapter 7)."""
    schedule = get_schedule(name, T=1000) if name == "linear" else get_schedule(name)
    seen = {}

    def model(z, t, **cond):
        seen["t"] = t
        return torch.zeros_like(z)

    x = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))
    for t_min, t_max in ((0.0, 0.395), (0.395, 1.0), (0.2, 0.3)):
        training_loss(model, schedule, x, generator=torch.Generator().manual_seed(1), t_range=(t_min, t_max))
        t = seen["t"]
        assert bool((t > t_min).all()) and bool((t <= t_max).all())
        if name == "linear":
            steps = (t * 1000).round().long()
            assert steps.min() == round(t_min * 1000) + 1 and steps.max() == round(t_max * 1000)
        else:
            assert t.min() < t_min + 0.01 and t.max() > t_max - 0.01
    # the full range is the default, draw for draw
    a = training_loss(TinyModel(2, torch.float32), schedule, x, generator=torch.Generator().manual_seed(3))
    b = training_loss(TinyModel(2, torch.float32), schedule, x, generator=torch.Generator().manual_seed(3),
                      t_range=(0.0, 1.0))
    assert torch.equal(a, b)


def test_training_loss_with_a_mask_is_the_weighted_pixel_mean():
    """mask: per-pixel weights; the per-example loss is sum(mask err^2) / sum(mask) (Patch-DM's padded
    border; Chapter 8). A mask of ones is the plain loss; a (B, 1, H, W) mask covers every channel."""
    schedule = get_schedule("linear", T=100)
    model = TinyModel(8)
    x = torch.randn(5, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = torch.linspace(0.2, 1.0, 5, dtype=F64)
    mask = torch.zeros(5, 1, 2, 2, dtype=F64)
    mask[:, :, 0, :] = 1.0  # the top row only
    mask[0, 0, 1, 1] = 0.5
    got = training_loss(model, schedule, x, "x", "x", t=t, generator=torch.Generator().manual_seed(4),
                        reduction="none", mask=mask)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    alpha, sigma = schedule.alpha_sigma(t)
    z = expand_like(alpha, x) * x + expand_like(sigma, x) * eps
    with torch.no_grad():
        err2 = (model(z, t) - x).pow(2)
    full = mask.expand_as(x)
    expected = (full * err2).flatten(1).sum(1) / full.flatten(1).sum(1)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-12, atol=0)
    plain = training_loss(model, schedule, x, "x", "x", t=t, generator=torch.Generator().manual_seed(4))
    ones = training_loss(model, schedule, x, "x", "x", t=t, generator=torch.Generator().manual_seed(4),
                         mask=torch.ones(1, 1, 1, 1, dtype=torch.bool))
    torch.testing.assert_close(ones, plain, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="mask must have x's shape"):
        training_loss(model, schedule, x, t=t, mask=torch.ones(5, 2, 2))
    with pytest.raises(ValueError, match="mask must have x's shape"):
        training_loss(model, schedule, x, t=t, mask=torch.ones(5, 3, 2, 2))
    with pytest.raises(ValueError, match=r"zero everywhere for example\(s\) \[2\]"):
        empty = mask.clone()
        empty[2] = 0
        training_loss(model, schedule, x, t=t, mask=empty)
    with pytest.raises(ValueError, match="zero everywhere"):
        training_loss(model, schedule, x, t=t, mask=torch.zeros_like(x))
    with pytest.raises(ValueError, match="finite weights >= 0"):
        training_loss(model, schedule, x, t=t, mask=-mask)


def test_null_conditioning_and_conditioning_dropout():
    """null_conditioning: labels -> -1 (the null token), float conditionings -> NaN rows (dropped), for
    all examples or only `where`; training_loss(p_uncond=p) drops each example's cond with probability p
    (Ho & Salimans 2022, Algorithm 1; Chapter 6)."""
    labels, pos = torch.tensor([3, 1, 4, 1]), torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    cond = {"labels": labels, "position": pos, "w": 0.5, "latent": None}
    null = null_conditioning(cond)
    assert torch.equal(null["labels"], torch.full((4,), -1)) and null["latent"] is None
    assert bool(null["position"].isnan().all()) and bool(torch.as_tensor(null["w"]).isnan())
    assert torch.equal(cond["labels"], labels)  # the input is not changed
    where = torch.tensor([True, False, True, False])
    some = null_conditioning(cond, where=where)
    assert some["labels"].tolist() == [-1, 1, -1, 1]
    assert bool(some["position"][where].isnan().all()) and torch.equal(some["position"][~where], pos[~where])
    assert some["w"].shape == (4,) and some["w"].isnan().tolist() == [True, False, True, False]
    seen = []

    def model(z, t, labels=None):
        seen.append(labels)
        return torch.zeros_like(z)

    schedule = get_schedule("linear", T=10)
    x = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
    y = torch.arange(4000) % 10
    plain = training_loss(model, schedule, x, generator=torch.Generator().manual_seed(2), cond={"labels": y})
    dropped = training_loss(model, schedule, x, generator=torch.Generator().manual_seed(2),
                            cond={"labels": y}, p_uncond=0.2)
    assert seen[0] is y and torch.equal(plain, dropped)  # the drop is drawn after t and the noise
    kept = seen[1] == y
    assert bool((seen[1][~kept] == -1).all()) and 0.17 < (~kept).double().mean() < 0.23
    with pytest.raises(ValueError, match="p_uncond must lie in"):
        training_loss(model, schedule, x, cond={"labels": y}, p_uncond=1.5)
    with pytest.raises(ValueError, match="no cond was given"):
        training_loss(model, schedule, x, p_uncond=0.1)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        null_conditioning(cond, where=torch.tensor([1, 0, 1, 0]))
    with pytest.raises(ValueError, match="batch size 4 but where has 3"):
        null_conditioning(cond, where=torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="integer labels"):
        null_conditioning({"mask": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="must be a dict"):
        null_conditioning(labels)


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_useful_errors():
    schedule = get_schedule("linear", T=10)
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="unknown prediction 'score'.*eps, x, v"):
        predict_x(x, "score", x, 1.0, 0.0)
    with pytest.raises(ValueError, match="unknown prediction"):
        training_loss(TinyModel(2, torch.float32), schedule, x, prediction="noise")
    with pytest.raises(ValueError, match="unknown weighting 'lsnr'.*truncated_snr"):
        loss_weight("lsnr", torch.zeros(3))
    with pytest.raises(ValueError, match="unknown weighting"):
        training_loss(TinyModel(2, torch.float32), schedule, x, weighting="min_snr")
    with pytest.raises(ValueError, match="shapes must match"):
        q_sample(schedule, x, 0.5, noise=torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        q_sample(schedule, x, torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="shapes must match"):
        predict_eps(torch.zeros(4, 3), "x", x, 1.0, 1.0)
    with pytest.raises(ValueError, match="shaped like its input"):
        training_loss(lambda z, t: z[:, :1], schedule, x)
    with pytest.raises(ValueError, match="s < t"):
        posterior(schedule, x, x, t=0.5, s=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        q_sample(schedule, x, 1.2)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        training_loss(TinyModel(2, torch.float32), schedule, x, t=0.0)
    with pytest.raises(ValueError, match="reduction"):
        training_loss(TinyModel(2, torch.float32), schedule, x, reduction="sum")
    with pytest.raises(ValueError, match=r"t_min < t_max"):
        training_loss(TinyModel(2, torch.float32), schedule, x, t_range=(0.5, 0.5))
    with pytest.raises(ValueError, match="pair"):
        training_loss(TinyModel(2, torch.float32), schedule, x, t_range=0.5)
    with pytest.raises(ValueError, match="holds no step"):
        training_loss(TinyModel(2, torch.float32), schedule, x, t_range=(0.31, 0.39))
    with pytest.raises(ValueError, match="not both"):
        training_loss(TinyModel(2, torch.float32), schedule, x, t=0.5, t_range=(0.0, 1.0))
    with pytest.raises(NonFiniteLossError, match="learning rate") as info:
        training_loss(lambda z, t: torch.full_like(z, float("nan")), schedule, x)
    assert isinstance(info.value, ValueError)
