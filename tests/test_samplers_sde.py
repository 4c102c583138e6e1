"""The reverse-time SDE (Song et al. 2021, eq. (6); Chapter 3 §5): its drift and noise against the
definitions, Euler-Maruyama against the ancestral step to O(h^2), and the Langevin corrector."""

from dataclasses import dataclass

import pytest
import torch

from minidiff import samplers, schedules
from minidiff.analytic import GaussianMixtureDenoiser
from minidiff.diffusion import posterior_coefficients

F64 = torch.float64
SCHEDULES = [schedules.CosineSchedule(), schedules.LinearVPSchedule()]


def gaussian_denoiser(c2: float, schedule, dim: int):
    """The exact x-hat of data N(0, c2 I) in `dim` dimensions: the one-component mixture denoiser."""
    return GaussianMixtureDenoiser(torch.zeros(1, dim, dtype=F64), c2 ** 0.5, schedule, "x")


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["cosine", "linear-vp"])
def test_drift_and_noise_are_the_sde_of_the_definitions(schedule):
    """f = d log alpha / dt, g^2 = d sigma^2/dt - 2 f sigma^2 (eq. (9)) and drift = f z - g^2 score,
    score = -eps-hat / sigma, computed here from alpha' and sigma' alone (no log-SNR)."""
    gen = torch.Generator().manual_seed(0)
    x_hat, eps_hat = torch.randn(5, 3, generator=gen, dtype=F64), torch.randn(5, 3, generator=gen, dtype=F64)
    for t in (0.1, 0.5, 0.9):
        tt = torch.tensor(t, dtype=F64)
        alpha, sigma = schedule.alpha_sigma(tt)
        d_alpha, d_sigma = schedule.alpha_sigma_dt(tt)
        f = d_alpha / alpha
        g2 = 2 * sigma * d_sigma - 2 * f * sigma**2
        z = alpha * x_hat + sigma * eps_hat
        torch.testing.assert_close(samplers.diffusion_coefficient_sq(schedule, t), g2, rtol=1e-10, atol=0)
        expected = f * z - g2 * (-eps_hat / sigma)
        torch.testing.assert_close(samplers.reverse_sde_drift(schedule, t, x_hat, eps_hat), expected,
                                   rtol=1e-10, atol=1e-12)
        # the probability-flow ODE is the same with half the score term (Song et al. eq. (13))
        ode = samplers.probability_flow_velocity(schedule, t, x_hat, eps_hat)
        torch.testing.assert_close(ode, f * z - 0.5 * g2 * (-eps_hat / sigma), rtol=1e-10, atol=1e-12)


def test_euler_maruyama_step_is_drift_plus_scaled_noise_from_the_generator():
    schedule = schedules.CosineSchedule()
    gen = torch.Generator().manual_seed(1)
    x_hat, eps_hat = torch.randn(4, 2, generator=gen, dtype=F64), torch.randn(4, 2, generator=gen, dtype=F64)
    alpha, sigma = schedule.alpha_sigma(torch.tensor(0.6, dtype=F64))
    z = alpha * x_hat + sigma * eps_hat
    out = samplers.ReverseSDEStep()(z, 0.6, 0.5, x_hat, eps_hat, schedule, torch.Generator().manual_seed(7))
    xi = torch.randn(4, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    g2 = samplers.diffusion_coefficient_sq(schedule, 0.6)
    expected = z - 0.1 * samplers.reverse_sde_drift(schedule, 0.6, x_hat, eps_hat) + (0.1 * g2).sqrt() * xi
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # to sigma = 0 (t = 0 of a discrete schedule): x-hat, no noise
    ddpm = schedules.get_schedule("linear", T=1000)
    last = samplers.ReverseSDEStep()(z, 0.001, 0.0, x_hat, eps_hat, ddpm, torch.Generator().manual_seed(7))
    torch.testing.assert_close(last, x_hat * ddpm.alpha(torch.tensor(0.0, dtype=F64)))


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["cosine", "linear-vp"])
def test_the_ancestral_step_is_euler_maruyama_to_first_order(schedule):
    """DDPM's posterior step and Euler-Maruyama from t to s = t - h: the coefficients of z_t and x-hat in
    their means and their variances agree up to O(h^2), so both discretise the same reverse SDE (Ch. 3 §5)."""
    t = 0.5
    alpha, sigma = schedule.alpha_sigma(torch.tensor(t, dtype=F64))
    errors = []
    for h in (0.02, 0.01, 0.005, 0.0025):
        c_z, c_x, var = posterior_coefficients(schedule, t=torch.tensor(t, dtype=F64),
                                               s=torch.tensor(t - h, dtype=F64))
        em = []
        for z, x in ((1.0, 0.0), (0.0, 1.0)):       # the mean's coefficients on z_t and on x-hat
            z_t, x_hat = torch.tensor([[z]], dtype=F64), torch.tensor([[x]], dtype=F64)
            eps_hat = (z_t - alpha * x_hat) / sigma
            em.append(float(z_t + (-h) * samplers.reverse_sde_drift(schedule, t, x_hat, eps_hat)))
        var_em = float(samplers.diffusion_coefficient_sq(schedule, t)) * h
        err = max(abs(em[0] - float(c_z)), abs(em[1] - float(c_x)), abs(var_em - float(var)))
        assert err < 0.3 * (1 - float(c_z))        # both move z_t by O(h); they differ far less ...
        errors.append(err)
    for big, small in zip(errors, errors[1:], strict=False):
        assert 3.5 < big / small < 4.5                 # ... by O(h^2): halving h divides it by about 4


def test_ancestral_and_reverse_sde_samplers_converge_to_the_data_for_gaussian_data():
    """With the exact denoiser of N(0, c^2) data, both samplers' final variance tends to c^2 as the steps
    shrink, and so does their difference (common random numbers)."""
    schedule, c2 = schedules.CosineSchedule(), 0.25
    model = gaussian_denoiser(c2, schedule, 4)
    z = torch.randn(40000, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    gaps = {}
    for steps in (10, 40, 160):
        grid = torch.linspace(0.98, 0.0, steps + 1, dtype=F64)
        var = {}
        for name, step in (("ddpm", samplers.DDPMStep()), ("sde", samplers.ReverseSDEStep())):
            x = samplers.sample(model, schedule, grid, step, z=z.clone(), prediction="x",
                                generator=torch.Generator().manual_seed(1), progress=False).x
            var[name] = float(x.var())
        gaps[steps] = (abs(var["sde"] - c2), abs(var["sde"] - var["ddpm"]))
    assert gaps[160][0] < 0.02 * c2 and gaps[160][0] < gaps[10][0] / 4      # the SDE reaches the data
    assert gaps[160][1] < gaps[10][1] / 4                                      # and DDPM reaches the SDE


@dataclass(frozen=True)
class Stay:
    """A predictor that does not move: PC with it is the Langevin corrector alone."""

    def __call__(self, z_t, t, s, x_hat, eps_hat, schedule, generator=None):
        return z_t


def test_langevin_corrector_keeps_the_right_marginal_and_pulls_a_wrong_one_back():
    schedule, c2 = schedules.CosineSchedule(), 0.25
    model = gaussian_denoiser(c2, schedule, 64)
    alpha, sigma = schedule.alpha_sigma(torch.tensor(0.3, dtype=F64))
    v = float(alpha**2 * c2 + sigma**2)                        # the marginal variance of z_s at s = 0.3
    gen = torch.Generator().manual_seed(0)
    pc = samplers.PredictorCorrectorStep(Stay(), corrector_steps=1, snr=0.16)
    for start, n_steps in ((v, 1), (2 * v, 40)):
        z = (start ** 0.5) * torch.randn(20000, 64, generator=gen, dtype=F64)
        grid = torch.tensor([0.3 + 1e-3 * k for k in range(n_steps, -1, -1)], dtype=F64)
        run = samplers.sample(model, schedule, grid, pc, z=z, prediction="x", generator=gen, progress=False)
        assert run.nfe == 2 * n_steps                          # one predictor call and one corrector call
        if start == v:
            assert float(run.x.var()) == pytest.approx(v, rel=0.01)   # stationary: the right marginal
        else:
            assert abs(float(run.x.var()) - v) < 0.5 * (start - v)   # a wrong variance moves toward it


def test_predictor_corrector_rejects_bad_settings():
    with pytest.raises(ValueError, match="corrector_steps"):
        samplers.PredictorCorrectorStep(corrector_steps=-1)
    with pytest.raises(ValueError, match="snr"):
        samplers.PredictorCorrectorStep(snr=0.0)
    with pytest.raises(ValueError, match="one-call step rule"):
        samplers.PredictorCorrectorStep(samplers.HeunStep())
    with pytest.raises(ValueError, match="denoise="):
        samplers.PredictorCorrectorStep()(torch.zeros(1, 2), 0.5, 0.4, torch.zeros(1, 2), torch.zeros(1, 2),
                                          schedules.CosineSchedule())


def test_dpm_solver_last_step_into_the_data_is_first_order_on_a_clipped_schedule():
    """On the clipped cosine schedule sigma_0 > 0, yet the last step to s = 0 must not extrapolate x-hat
    (lower_order_final): with a history it equals DDIM's step."""
    schedule = schedules.CosineSchedule()
    assert float(schedule.sigma(torch.tensor(0.0, dtype=F64))) > 0
    gen = torch.Generator().manual_seed(3)
    z, x_hat, x_prev = (torch.randn(4, 2, generator=gen, dtype=F64) for _ in range(3))
    alpha, sigma = schedule.alpha_sigma(torch.tensor(0.25, dtype=F64))
    eps_hat = (z - alpha * x_hat) / sigma
    step = samplers.DPMSolverPP2MStep()
    state = {"prev": (x_prev, 0.5 * schedule.logsnr(torch.tensor(0.5, dtype=F64)), 0.25)}
    last = step(z, 0.25, 0.0, x_hat, eps_hat, schedule, state=state)
    ddim = samplers.DDIMStep(0.0)(z, 0.25, 0.0, x_hat, eps_hat, schedule)
    torch.testing.assert_close(last, ddim, rtol=1e-9, atol=1e-9)
    state = {"prev": (x_prev, 0.5 * schedule.logsnr(torch.tensor(0.5, dtype=F64)), 0.25)}
    inner = step(z, 0.25, 0.125, x_hat, eps_hat, schedule, state=state)        # a step inside: second order
    assert not torch.allclose(inner, samplers.DDIMStep(0.0)(z, 0.25, 0.125, x_hat, eps_hat, schedule))
