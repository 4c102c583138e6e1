"""Identities of the forward process, the posterior, the predictions and the loss (minidiff.diffusion)."""

import itertools

import pytest
import torch

from minidiff.diffusion import (
    PREDICTIONS,
    NonFiniteLossError,
    expand_like,
    loss_weight,
    posterior,
    predict_eps,
    predict_v,
    predict_x,
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
        alpha_ts, var_ts = transition(schedule, s, t)
        mean_coef, var = alpha_ts * mean_coef, alpha_ts**2 * var + var_ts
        alpha_t, sigma_t = schedule.alpha_sigma(t)
        torch.testing.assert_close(mean_coef.squeeze(), alpha_t, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(var.squeeze(), sigma_t**2, rtol=1e-10, atol=1e-14)


def test_kernel_on_the_grid_is_ddpm_eq2():
    """On t = i/T the kernel is q(x_i | x_{i-1}) = N(sqrt(1 - beta_i) x_{i-1}, beta_i I)."""
    schedule = get_schedule("cosine", T=200)
    i = torch.arange(1, 201, dtype=F64)
    alpha_ts, var_ts = transition(schedule, (i - 1) / 200, i / 200)
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
        z = q_step(schedule, z, s, t, generator=g)
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
                          t, s)
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
    mean, var = posterior(schedule, z_t, x, t, s)
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
    mean_z, var = posterior(schedule, ones, zeros, i / T, (i - 1) / T)
    mean_x, _ = posterior(schedule, zeros, ones, i / T, (i - 1) / T)
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
        posterior(schedule, x, x, 0.5, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        q_sample(schedule, x, 1.2)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        training_loss(TinyModel(2, torch.float32), schedule, x, t=0.0)
    with pytest.raises(ValueError, match="reduction"):
        training_loss(TinyModel(2, torch.float32), schedule, x, reduction="sum")
    with pytest.raises(NonFiniteLossError, match="learning rate") as info:
        training_loss(lambda z, t: torch.full_like(z, float("nan")), schedule, x)
    assert isinstance(info.value, ValueError)
