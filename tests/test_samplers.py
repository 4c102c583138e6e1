"""The sampling loop and the DDPM step rule (minidiff.samplers)."""

import pytest
import torch

from minidiff.contracts import network_evaluations
from minidiff.diffusion import predict_eps, predict_x
from minidiff.samplers import DDPMStep, SampleResult, ddpm_timesteps, sample
from minidiff.schedules import get_schedule

F64 = torch.float64


class GaussianDenoiser:
    """The exact denoiser for data x ~ N(mu, std^2 I): E[x | z_t] in closed form.

    With z_t = alpha x + sigma eps, z_t ~ N(alpha mu, alpha^2 std^2 + sigma^2) and
    E[x | z_t] = mu + alpha std^2 / (alpha^2 std^2 + sigma^2) (z_t - alpha mu).
    Returns the prediction of type `prediction`; counts its calls.
    """

    def __init__(self, schedule, mu, std, prediction="eps"):
        self.schedule, self.mu, self.std, self.prediction = schedule, mu, std, prediction
        self.calls = 0

    def __call__(self, z, t):
        self.calls += 1
        alpha, sigma = self.schedule.alpha_sigma(t[0])  # sample() gives all examples the same t
        x_hat = self.mu + alpha * self.std**2 / (alpha**2 * self.std**2 + sigma**2) * (z - alpha * self.mu)
        if self.prediction == "x":
            return x_hat
        return predict_eps(x_hat, "x", z, alpha, sigma)


def test_ddpm_timesteps():
    ts = ddpm_timesteps(4)
    assert torch.equal(ts, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=F64))
    assert len(ddpm_timesteps(1000)) == 1001


@pytest.mark.parametrize("variance", ["posterior", "beta"])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddpm_step_is_algorithm_2_line_4(variance, name):
    """x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps) + sigma_t z (Ho et al. 2020),
    with sigma_t^2 = beta-tilde_t (variance="posterior") or beta_t (variance="beta")."""
    T = 1000
    schedule = get_schedule(name, T=T)
    betas, alphas, abar = schedule.betas, schedule.alphas, schedule.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(8, 3, generator=g, dtype=F64)
    eps_hat = torch.randn(8, 3, generator=g, dtype=F64)
    step = DDPMStep(variance)
    for i in [1, 2, 10, 500, 999, 1000]:
        t, s = i / T, (i - 1) / T
        alpha_t, sigma_t = schedule.alpha_sigma(torch.tensor(t, dtype=F64))
        x_hat = predict_x(eps_hat, "eps", x_t, alpha_t, sigma_t)
        x_s = step(x_t, t, s, x_hat, eps_hat, schedule, torch.Generator().manual_seed(i))

        j = i - 1  # 0-indexed
        abar_prev = abar[j - 1] if i > 1 else torch.tensor(1.0, dtype=F64)
        beta_tilde = (1 - abar_prev) / (1 - abar[j]) * betas[j]
        sigma2 = beta_tilde if variance == "posterior" else betas[j]
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(i), dtype=F64) if i > 1 else 0
        expected = (x_t - betas[j] / (1 - abar[j]).sqrt() * eps_hat) / alphas[j].sqrt() + sigma2.sqrt() * z
        torch.testing.assert_close(x_s, expected, rtol=1e-9, atol=1e-9)


def test_no_noise_at_s_zero():
    schedule = get_schedule("linear", T=100)
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    x_hat = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    for variance in ("posterior", "beta"):
        out1 = DDPMStep(variance)(z, 0.01, 0.0, x_hat, None, schedule, torch.Generator().manual_seed(2))
        out2 = DDPMStep(variance)(z, 0.01, 0.0, x_hat, None, schedule, None)
        assert torch.equal(out1, out2)
        torch.testing.assert_close(out1, x_hat)  # alpha_0 = 1: the last step returns x-hat


@pytest.mark.parametrize("variance,prediction", [("posterior", "eps"), ("beta", "x")])
def test_exact_denoiser_for_gaussian_data_gives_the_data_distribution(variance, prediction):
    T, n = 1000, 10_000
    schedule = get_schedule("linear", T=T)
    mu, std = torch.tensor([0.5, -0.25]), 0.4
    model = GaussianDenoiser(schedule, mu, std, prediction)
    result = sample(model, schedule, ddpm_timesteps(T), DDPMStep(variance), shape=(n, 2),
                    prediction=prediction, generator=torch.Generator().manual_seed(0), progress=False)
    assert isinstance(result, SampleResult) and result.x.shape == (n, 2)
    assert result.nfe == T == model.calls
    # standard errors: 0.004 for the mean, 0.003 for the std
    torch.testing.assert_close(result.x.mean(0), mu, rtol=0, atol=0.02)
    torch.testing.assert_close(result.x.std(0), torch.full((2,), std), rtol=0, atol=0.015)


class TwoCallStep:
    """A toy step rule that evaluates the network once more per step (like Heun), via `denoise`, and keeps
    a per-run state (like a multistep solver): the number of steps taken in this run."""

    needs_denoise = True

    def __init__(self):
        self.states = []

    def init_state(self):
        state = {"steps": 0}
        self.states.append(state)
        return state

    def __call__(self, z_t, t, s, x_hat, eps_hat, schedule, generator, *, denoise, state):
        state["steps"] += 1
        x_mid, _ = denoise(z_t, (t + s) / 2)
        return DDPMStep()(z_t, t, s, 0.5 * (x_hat + x_mid), None, schedule, generator)


class TwoCallWrapper:
    """A model wrapper that calls its network twice per call, as classifier-free guidance does
    ((1 + w) pred_c - w pred_u with w = 0 here): one call costs 2 network evaluations, or twice what
    the wrapped model's call costs when it is itself a wrapper."""

    def __init__(self, net):
        self.net = net

    @property
    def nfe_per_call(self):
        return 2 * network_evaluations(self.net)

    def __call__(self, z, t, **cond):
        return 0.5 * (self.net(z, t, **cond) + self.net(z, t, **cond))


def test_nfe_counts_every_network_call_and_each_run_gets_a_fresh_state():
    schedule = get_schedule("cosine", T=20)
    model = GaussianDenoiser(schedule, torch.zeros(2), 1.0)
    result = sample(model, schedule, ddpm_timesteps(20), DDPMStep(), shape=(4, 2), progress=False)
    assert result.nfe == 20 == model.calls
    model.calls = 0
    step = TwoCallStep()
    timesteps = torch.tensor([1.0, 0.6, 0.3, 0.1, 0.0])
    result = sample(model, schedule, timesteps, step, shape=(4, 2), progress=False)
    assert result.nfe == 8 == model.calls
    sample(model, schedule, timesteps[1:], step, shape=(4, 2), progress=False)
    assert [state["steps"] for state in step.states] == [4, 3]  # one state per run


def test_nfe_counts_network_evaluations_of_a_two_call_wrapper():
    """A wrapper that calls the network twice costs 2 per call: NFE counts network evaluations."""
    schedule = get_schedule("cosine", T=20)
    net = GaussianDenoiser(schedule, torch.zeros(2), 1.0)
    wrapped = TwoCallWrapper(net)
    assert network_evaluations(net) == 1 and network_evaluations(wrapped) == 2
    result = sample(wrapped, schedule, ddpm_timesteps(20), DDPMStep(), shape=(4, 2), progress=False)
    assert result.nfe == 40 == net.calls
    plain = sample(net, schedule, ddpm_timesteps(20), DDPMStep(), shape=(4, 2), progress=False,
                   generator=torch.Generator().manual_seed(0))
    again = sample(wrapped, schedule, ddpm_timesteps(20), DDPMStep(), shape=(4, 2), progress=False,
                   generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.x, plain.x)  # the same model, counted twice
    net.calls = 0  # with a step rule that calls the model again inside the step: 2 calls x 2 per step
    result = sample(wrapped, schedule, torch.tensor([1.0, 0.6, 0.3, 0.1, 0.0]), TwoCallStep(), shape=(4, 2),
                    progress=False)
    assert result.nfe == 16 == net.calls
    net.calls = 0  # a wrapper of a wrapper: 4 network evaluations per call
    result = sample(TwoCallWrapper(wrapped), schedule, ddpm_timesteps(5), DDPMStep(), shape=(4, 2),
                    progress=False)
    assert result.nfe == 20 == net.calls


def test_the_contracts_are_protocols():
    from minidiff import contracts
    from minidiff.nn import MLPDenoiser
    from minidiff.samplers import (
        AncestralGammaStep,
        DDIMStep,
        DPMSolverPP2MStep,
        EulerStep,
        HeunStep,
        PredictorCorrectorStep,
        ReverseSDEStep,
    )

    for step in (DDPMStep(), DDIMStep(0.5), AncestralGammaStep(0.3), EulerStep(), HeunStep(),
                 DPMSolverPP2MStep(), TwoCallStep(), ReverseSDEStep(), PredictorCorrectorStep()):
        assert isinstance(step, contracts.StepRule)
    assert isinstance(HeunStep(), contracts.DenoisingStepRule) and contracts.needs_denoise(HeunStep())
    assert contracts.needs_denoise(PredictorCorrectorStep()) and not contracts.needs_denoise(ReverseSDEStep())
    assert not contracts.needs_denoise(DDIMStep())
    assert isinstance(DPMSolverPP2MStep(), contracts.StatefulStepRule)
    assert not isinstance(DDIMStep(), contracts.StatefulStepRule) and contracts.init_state(DDIMStep()) is None
    assert contracts.init_state(DPMSolverPP2MStep()) == {"prev": None}
    assert isinstance(DDIMStep(), contracts.InvertibleStepRule)
    assert contracts.is_invertible(DDIMStep(0.0)) and not contracts.is_invertible(DDIMStep(1.0))
    assert not contracts.is_invertible(DDPMStep())
    assert isinstance(MLPDenoiser(), contracts.Model)
    assert not isinstance(MLPDenoiser(), contracts.CountedModel)
    assert isinstance(TwoCallWrapper(MLPDenoiser()), contracts.CountedModel)


def test_bad_costs_and_states_raise_value_errors():
    schedule = get_schedule("linear", T=10)
    net = GaussianDenoiser(schedule, torch.zeros(2), 1.0)

    class Declared:
        def __init__(self, cost):
            self.nfe_per_call = cost

        def __call__(self, z, t, **cond):
            return net(z, t, **cond)

    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="nfe_per_call must be an integer >= 1"):
            sample(Declared(bad), schedule, ddpm_timesteps(10), DDPMStep(), shape=(2, 2), progress=False)

    class ListState(TwoCallStep):
        def init_state(self):
            return []

    with pytest.raises(ValueError, match="must return a dict"):
        sample(net, schedule, ddpm_timesteps(10), ListState(), shape=(2, 2), progress=False)


def test_determinism_with_a_seeded_generator():
    schedule = get_schedule("linear", T=50)
    model = GaussianDenoiser(schedule, torch.zeros(2), 0.5)

    def run(seed):
        return sample(model, schedule, ddpm_timesteps(50), DDPMStep(), shape=(16, 2),
                      generator=torch.Generator().manual_seed(seed), progress=False).x

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_trajectory_clip_cond_and_given_start():
    schedule = get_schedule("linear", T=10)
    seen = {}

    def model(z, t, labels=None):
        seen["labels"], seen["t"] = labels, t
        return 3 * z  # an eps-prediction with large x-hat

    z0 = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    timesteps = ddpm_timesteps(10)[5:]  # start part-way, from a given z at t = 0.5
    result = sample(model, schedule, timesteps, DDPMStep(), z=z0, cond={"labels": "seven"}, clip_x=1.0,
                    return_trajectory=True, generator=torch.Generator().manual_seed(1), progress=True)
    assert seen["labels"] == "seven" and torch.equal(seen["t"], torch.full((6,), 0.1))
    assert len(result.trajectory) == 6 and len(result.x_hats) == 5 == result.nfe
    assert torch.equal(result.trajectory[0], z0) and torch.equal(result.trajectory[-1], result.x)
    assert all(x_hat.abs().max() <= 1.0 for x_hat in result.x_hats)
    assert result.x.abs().max() <= 1.0  # the last step returns the clipped x-hat
    assert sample(model, schedule, timesteps, DDPMStep(), z=z0, progress=False).trajectory is None


def test_bad_inputs_raise_useful_errors():
    schedule = get_schedule("linear", T=10)
    model = GaussianDenoiser(schedule, torch.zeros(2), 1.0)
    ok = {"shape": (2, 2), "progress": False}
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(model, schedule, [0.0, 0.5, 1.0], DDPMStep(), **ok)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(model, schedule, [1.0, 0.5, 0.5, 0.0], DDPMStep(), **ok)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sample(model, schedule, [2.0, 1.0, 0.0], DDPMStep(), **ok)
    with pytest.raises(ValueError, match="at least 2"):
        sample(model, schedule, [1.0], DDPMStep(), **ok)
    with pytest.raises(ValueError, match="exactly one of `shape`"):
        sample(model, schedule, ddpm_timesteps(10), DDPMStep(), progress=False)
    with pytest.raises(ValueError, match="exactly one of `shape`"):
        sample(model, schedule, ddpm_timesteps(10), DDPMStep(), z=torch.zeros(2, 2), **ok)
    with pytest.raises(ValueError, match="unknown prediction 'score'"):
        sample(model, schedule, ddpm_timesteps(10), DDPMStep(), prediction="score", **ok)
    with pytest.raises(ValueError, match="shaped like its input z"):
        sample(lambda z, t: z[:, :1], schedule, ddpm_timesteps(10), DDPMStep(), **ok)
    with pytest.raises(ValueError, match="unknown DDPM variance"):
        DDPMStep("learned")
    with pytest.raises(ValueError, match="positive integer"):
        ddpm_timesteps(0)
