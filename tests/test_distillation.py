"""Progressive distillation (minidiff.distillation, Salimans & Ho 2022 Algorithm 1): the target x-tilde,
the order of the teacher's times, the weightings, a round that learns, K rounds that halve N, bad inputs."""

import math

import pytest
import torch

from minidiff import configs, distillation, pretrained
from minidiff.diffusion import loss_weight, predict_eps, predict_v, predict_x, q_sample
from minidiff.nn import MLPDenoiser, UNet
from minidiff.samplers import DDIMStep, sample
from minidiff.schedules import CosineSchedule, discretize
from minidiff.train import train

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


class SmoothTeacher(torch.nn.Module):
    """A random smooth network of (z, t), float64: out = tanh(z A + t b + c) B + sin(3 t) z / 2."""

    def __init__(self, dim=2, hidden=16, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = torch.nn.Parameter(torch.randn(dim, hidden, generator=g, dtype=F64))
        self.b = torch.nn.Parameter(torch.randn(hidden, generator=g, dtype=F64))
        self.c = torch.nn.Parameter(torch.randn(hidden, generator=g, dtype=F64))
        self.B = torch.nn.Parameter(torch.randn(hidden, dim, generator=g, dtype=F64) / hidden**0.5)
        self.calls = []

    def forward(self, z, t, **cond):
        self.calls.append(t.detach().clone())
        h = torch.tanh(z @ self.A + t[:, None].to(z.dtype) * self.b + self.c)
        return h @ self.B + 0.5 * torch.sin(3 * t[:, None].to(z.dtype)) * z


class TargetStudent(torch.nn.Module):
    """A 'student' that outputs the distillation target x-tilde of a teacher, in its own parameterisation."""

    def __init__(self, teacher, schedule, N, prediction, teacher_prediction):
        super().__init__()
        self.teacher, self.schedule, self.N = teacher, schedule, N
        self.prediction, self.teacher_prediction = prediction, teacher_prediction

    def forward(self, z, t, **cond):
        t64 = t.to(F64)
        _, t_end = distillation.teacher_times(t64, self.N)
        _, z_end = distillation.teacher_two_steps(self.teacher, self.schedule, z, t64, self.N,
                                                  self.teacher_prediction)
        a_t, s_t = self.schedule.alpha_sigma(t64)
        a_e, s_e = self.schedule.alpha_sigma(t_end)
        x_tilde = distillation.distillation_target(z, z_end, a_t, s_t, a_e, s_e)
        if self.prediction == "x":
            return x_tilde
        if self.prediction == "v":
            return predict_v(x_tilde, "x", z, a_t, s_t)
        return predict_eps(x_tilde, "x", z, a_t, s_t)


SCHEDULES = {"cosine": CosineSchedule(), "discrete": discretize(CosineSchedule(), 64)}


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize("prediction", ["v", "x"])
@pytest.mark.parametrize("teacher_prediction", ["v", "x", "eps"])
def test_one_student_step_with_x_tilde_lands_on_two_teacher_steps(schedule_name, prediction,
                                                                   teacher_prediction):
    """Algorithm 1 line 13: a student whose output is x-tilde takes one DDIM step (the library's sampler)
    from t to t'' and lands exactly where the teacher's two DDIM steps t -> t' -> t'' land, also at
    t'' = 0."""
    schedule = SCHEDULES[schedule_name]
    teacher = SmoothTeacher()
    z_t = torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    for N in (1, 2, 8, 32):
        for i in sorted({1, 2, N // 2 + 1, N} & set(range(1, N + 1))):  # i = 1: t'' = 0; i = N: t = 1
            if teacher_prediction == "eps" and i == N:
                continue  # an eps-teacher at t = 1 divides by alpha_1 ~ 4.5e-5: not the point here
            t, t_mid, t_end = i / N, (i - 0.5) / N, (i - 1) / N
            two = sample(teacher, schedule, [t, t_mid, t_end], DDIMStep(0.0), z=z_t,
                         prediction=teacher_prediction, progress=False)
            student = TargetStudent(teacher, schedule, N, prediction, teacher_prediction)
            one = sample(student, schedule, [t, t_end], DDIMStep(0.0), z=z_t, prediction=prediction,
                         progress=False)
            assert two.nfe == 2 and one.nfe == 1
            scale = 1 + two.x.abs().max().item()
            assert torch.allclose(one.x, two.x, rtol=0, atol=1e-10 * scale), (N, i)


def test_x_tilde_at_zero_noise_is_z_end():
    """sigma_t'' = 0 (t'' = 0 on a discrete schedule): x-tilde = z_t'' directly."""
    schedule = SCHEDULES["discrete"]
    assert schedule.sigma(torch.tensor(0.0, dtype=F64)).item() == 0.0
    g = torch.Generator().manual_seed(2)
    z_t, z_end = torch.randn(8, 2, dtype=F64, generator=g), torch.randn(8, 2, dtype=F64, generator=g)
    a_t, s_t = schedule.alpha_sigma(torch.tensor(1 / 8, dtype=F64))
    x_tilde = distillation.distillation_target(z_t, z_end, a_t, s_t, 1.0, 0.0)
    assert torch.equal(x_tilde, z_end)


def test_ddim_step_matches_the_library_step_rule():
    """distillation.ddim_step (per-example times) == samplers.DDIMStep(0.0) (one time per batch)."""
    schedule, teacher = CosineSchedule(), SmoothTeacher()
    z = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    for prediction in ("v", "x", "eps"):
        for t, s in ((0.75, 0.5), (0.25, 0.0), (1.0, 0.875)):
            mine, _ = distillation.ddim_step(teacher, schedule, z, t=t, s=s, prediction=prediction)
            lib = sample(teacher, schedule, [t, s], DDIMStep(0.0), z=z, prediction=prediction,
                         progress=False).x
            assert torch.allclose(mine, lib, rtol=0, atol=1e-12)
    # per-example times: each row as if it were alone
    t = torch.tensor([0.5, 1.0, 0.25, 0.125], dtype=F64)
    mine, _ = distillation.ddim_step(teacher, schedule, z[:4], t=t, s=t - 0.125, prediction="v")
    for k in range(4):
        row, _ = distillation.ddim_step(teacher, schedule, z[k:k + 1], t=t[k].item(), s=t[k].item() - 0.125,
                                        prediction="v")
        assert torch.allclose(mine[k:k + 1], row, rtol=0, atol=1e-12)


def test_teacher_times_are_in_the_right_order():
    """t > t' = t - 0.5/N > t'' = t - 1/N >= 0, and the teacher is called at t first, then at t'."""
    for N in (1, 2, 4, 64):
        t = torch.arange(1, N + 1, dtype=F64) / N
        t_mid, t_end = distillation.teacher_times(t, N)
        assert torch.equal(t_mid, t - 0.5 / N) and torch.equal(t_end, t - 1 / N)
        assert bool((t > t_mid).all() and (t_mid > t_end).all() and (t_end >= 0).all())
    teacher = SmoothTeacher()
    z = torch.randn(3, 2, dtype=F64)
    t = torch.tensor([1.0, 0.5, 0.25], dtype=F64)
    distillation.teacher_two_steps(teacher, CosineSchedule(), z, t, 4, "v")
    assert len(teacher.calls) == 2
    assert torch.equal(teacher.calls[0], t) and torch.equal(teacher.calls[1], t - 0.125)
    with pytest.raises(ValueError, match="1/N"):
        distillation.teacher_times(torch.tensor([0.1]), 4)  # not on the student's grid i/N, i >= 1


def test_student_times_are_on_the_grid():
    g = torch.Generator().manual_seed(0)
    t = distillation.sample_student_times(8, 4000, g)
    assert t.dtype == F64 and set((t * 8).round().long().tolist()) == set(range(1, 9))
    assert torch.equal(t * 8, (t * 8).round())
    grid = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=F64)
    assert torch.equal(distillation.student_timesteps(4), grid)


def test_weightings_are_the_formulas_of_the_paper():
    """Truncated SNR: w = max(SNR, 1), i.e. max(x-MSE, eps-MSE); SNR+1: w = SNR + 1, i.e. v-MSE
    (seed 004, eqs 9-10; Salimans & Ho 2022, Sec. 4)."""
    schedule = CosineSchedule()
    t = torch.linspace(0.01, 1.0, 50, dtype=F64)
    lam = schedule.logsnr(t)
    snr = lam.exp()
    assert torch.allclose(loss_weight("truncated_snr", lam), snr.clamp(min=1.0), rtol=1e-12)
    assert torch.allclose(loss_weight("snr+1", lam), snr + 1, rtol=1e-12)
    assert torch.allclose(loss_weight("eps", lam), snr, rtol=1e-12)
    # the weighted x-MSE equals max(x-MSE, eps-MSE) and v-MSE, per example
    g = torch.Generator().manual_seed(4)
    z = torch.randn(50, 3, dtype=F64, generator=g)
    x_hat, x_tilde = torch.randn(50, 3, dtype=F64, generator=g), torch.randn(50, 3, dtype=F64, generator=g)
    a, s = schedule.alpha_sigma(t)
    x_mse = (x_hat - x_tilde).pow(2).mean(1)
    eps_mse = (predict_eps(x_hat, "x", z, a, s) - predict_eps(x_tilde, "x", z, a, s)).pow(2).mean(1)
    v_mse = (predict_v(x_hat, "x", z, a, s) - predict_v(x_tilde, "x", z, a, s)).pow(2).mean(1)
    assert torch.allclose(loss_weight("truncated_snr", lam) * x_mse, torch.maximum(x_mse, eps_mse), rtol=1e-9)
    assert torch.allclose(loss_weight("snr+1", lam) * x_mse, v_mse, rtol=1e-9)
    assert torch.allclose(loss_weight("eps", lam) * x_mse, eps_mse, rtol=1e-9)


def test_distillation_loss_is_algorithm_1():
    """The loss rebuilt by hand from the same random draws (t first, then the noise)."""
    schedule, teacher, student = CosineSchedule(), SmoothTeacher(seed=0), SmoothTeacher(seed=1)
    x = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    for weighting in ("truncated_snr", "snr+1", "eps"):
        loss = distillation.distillation_loss(student, teacher, schedule, x, 4, "v", weighting,
                                              generator=torch.Generator().manual_seed(6), reduction="none")
        g = torch.Generator().manual_seed(6)
        t = torch.randint(1, 5, (64,), generator=g).to(F64) / 4
        z, _ = q_sample(schedule, x, t, generator=g)
        _, z_end = distillation.teacher_two_steps(teacher, schedule, z, t, 4, "v")
        a, s = schedule.alpha_sigma(t)
        a2, s2 = schedule.alpha_sigma(t - 0.25)
        x_tilde = (z_end - (s2 / s)[:, None] * z) / (a2 - s2 / s * a)[:, None]
        x_hat = predict_x(student(z, t), "v", z, a, s)
        expected = loss_weight(weighting, schedule.logsnr(t)) * (x_hat - x_tilde).pow(2).mean(1)
        assert loss.shape == (64,) and torch.allclose(loss, expected, rtol=1e-10)


def toy_points(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[-0.5, -0.5], [0.5, 0.5], [-0.5, 0.5], [0.5, -0.5]])
    return centres[torch.randint(4, (n,), generator=g)] + 0.05 * torch.randn(n, 2, generator=g)


def tiny_teacher(seed=0, steps=60):
    """A small v-prediction MLP on the cosine schedule, trained briefly with the v-MSE."""
    from minidiff.diffusion import training_loss

    schedule = CosineSchedule()
    torch.manual_seed(seed)
    net = MLPDenoiser(hidden=32, depth=2, emb_dim=16, fourier_features=4)

    def loss_fn(model, batch, generator):
        return training_loss(model, schedule, batch, prediction="v", weighting="snr+1", generator=generator)

    res = train(net, loss_fn, toy_points(), steps, batch_size=64, lr=3e-3, warmup=5, ema_decay=0.0,
                progress=False)
    return res.model, schedule


def eval_loss(model, teacher, schedule, N, weighting="truncated_snr"):
    x = toy_points(256, seed=9)
    with torch.no_grad():
        return distillation.distillation_loss(model, teacher, schedule, x, N, "v", weighting,
                                              generator=torch.Generator().manual_seed(11)).item()


@pytest.mark.slow
def test_a_short_round_lowers_its_own_loss():
    teacher, schedule = tiny_teacher()
    before = eval_loss(teacher, teacher, schedule, 1)  # the student starts as the teacher
    rnd = distillation.distill_round(teacher, schedule, toy_points(), 1, 60, "v", "truncated_snr",
                                     batch_size=64, lr=3e-3, warmup=0, ema_decay=0.0, progress=False)
    after = eval_loss(rnd.student, teacher, schedule, 1)
    assert rnd.N == 1 and rnd.steps == 60 and rnd.teacher_calls == 120 and len(rnd.losses) == 60
    assert after < 0.5 * before, (before, after)
    # the teacher is untouched and the student is a different module
    assert rnd.student is not teacher
    assert all(p.requires_grad is False for p in rnd.student.parameters())


def test_rounds_halve_N_and_each_student_teaches_the_next():
    teacher, schedule = tiny_teacher(steps=20)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    rounds = distillation.progressive_distillation(teacher, schedule, toy_points(), 8, 3, batch_size=16,
                                                   lr=1e-3, warmup=0, ema_decay=0.0, progress=False)
    assert [r.N for r in rounds] == [8, 4, 2, 1]
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    short = distillation.progressive_distillation(teacher, schedule, toy_points(), 8, 2, rounds=2,
                                                  batch_size=16, warmup=0, progress=False)
    assert [r.N for r in short] == [8, 4]
    with pytest.raises(ValueError, match="rounds"):
        distillation.progressive_distillation(teacher, schedule, toy_points(), 8, 2, rounds=5, progress=False)
    uneven = distillation.progressive_distillation(teacher, schedule, toy_points(), 2, [1, 3], batch_size=8,
                                                   warmup=0, progress=False)
    assert [(r.N, r.steps, len(r.losses)) for r in uneven] == [(2, 1, 1), (1, 3, 3)]
    with pytest.raises(ValueError, match="one integer per round"):
        distillation.progressive_distillation(teacher, schedule, toy_points(), 2, [1, 2, 3], progress=False)


def test_same_seed_gives_bit_identical_students():
    teacher, schedule = tiny_teacher(steps=10)
    kw = dict(batch_size=32, lr=1e-3, warmup=0, ema_decay=0.9, progress=False, seed=3)
    a = distillation.distill_round(teacher, schedule, toy_points(), 2, 8, **kw)
    b = distillation.distill_round(teacher, schedule, toy_points(), 2, 8, **kw)
    assert a.losses == b.losses
    for p, q in zip(a.student.state_dict().values(), b.student.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    c = distillation.distill_round(teacher, schedule, toy_points(), 2, 8, **{**kw, "seed": 4})
    assert c.losses != a.losses


def test_bad_inputs_say_what_to_do():
    teacher, schedule = SmoothTeacher(), CosineSchedule()
    x = torch.randn(8, 2, dtype=F64)
    for bad in (0, 3, 6, -4, 2.0, True):
        with pytest.raises(ValueError, match="power of two"):
            distillation.distillation_loss(teacher, teacher, schedule, x, bad)
    with pytest.raises(ValueError, match="power of two"):
        distillation.check_steps(12)
    with pytest.raises(ValueError, match="unknown weighting"):
        distillation.distillation_loss(teacher, teacher, schedule, x, 2, weighting="lsimple")
    with pytest.raises(ValueError, match="unknown student prediction"):
        distillation.distillation_loss(teacher, teacher, schedule, x, 2, prediction="score")
    with pytest.raises(ValueError, match="unknown teacher prediction"):
        distillation.distillation_loss(teacher, teacher, schedule, x, 2, teacher_prediction="mu")
    with pytest.raises(ValueError, match="unknown weighting"):
        distillation.distill_round(teacher, schedule, x, 2, 1, weighting="snr_trunc")
    mlp = MLPDenoiser(hidden=32, depth=2, emb_dim=16)
    other = MLPDenoiser(hidden=16, depth=2, emb_dim=16)
    with pytest.raises(ValueError, match="architecture"):
        distillation.make_student(mlp, other)
    with pytest.raises(ValueError, match="architecture"):
        unet = UNet(base_channels=8, image_size=8)
        distillation.distill_round(mlp, schedule, toy_points(), 2, 1, student=unet)
    same = MLPDenoiser(hidden=32, depth=2, emb_dim=16, dropout=0.1)  # same weights, other dropout: allowed
    student = distillation.make_student(mlp, same)
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), mlp.parameters(), strict=True))
    with pytest.raises(ValueError, match="undefined"):
        distillation.distillation_target(x, x, 0.5, 0.5, 0.5, 0.5)


def test_chapter_5_configs_build(monkeypatch):
    """The chapter's teacher configs train through pretrained.ddpm_model (continuous cosine, v, SNR+1) and
    their distillation settings bind to distill_round / train."""
    import inspect

    monkeypatch.delenv("MINIDIFF_SIZE", raising=False)  # conftest sets "small", which overrides "full"

    for name in ("pd_toy", "pd_digits"):
        for size in ("small", "full"):
            cfg = configs.get_config(name, size)
            d = cfg["diffusion"]
            assert d["schedule"] == "cosine_continuous" and d["T"] is None and d["prediction"] == "v"
            inspect.signature(train).bind_partial(**cfg["train"])
            inspect.signature(train).bind_partial(**cfg["distill"]["train"])
            N = distillation.check_steps(cfg["distill"]["start_steps"])
            assert cfg["sample"]["steps"] == 2 * N
            model = pretrained.build_model(cfg)
            size = cfg["data"].get("size")
            z = torch.randn(2, 2) if cfg["architecture"] == "mlp" else torch.randn(2, 1, size, size)
            with torch.no_grad():
                assert model(z, torch.rand(2)).shape == z.shape
        small, full = configs.get_config(name, "small"), configs.get_config(name, "full")
        assert small["train"]["steps"] < full["train"]["steps"]
        for size in configs.SIZES:                   # per-round step counts: one per round, down to 1 step
            d = configs.get_config(name, size)["distill"]
            steps = d["train"]["steps"]
            assert isinstance(steps, int) or len(steps) == d["start_steps"].bit_length()


def test_continuous_teacher_trains_through_pretrained(tmp_path):
    """pretrained.ddpm_model accepts the continuous cosine schedule (T None): times t ~ U(0, 1]."""
    cfg = configs.get_config("pd_toy", "small")
    cfg["model"] = {"dim": 2, "hidden": 16, "depth": 1, "emb_dim": 8}
    cfg["train"] = {**cfg["train"], "steps": 3, "batch_size": 16}
    cfg["data"] = {**cfg["data"], "n": 64}
    out = pretrained.ddpm_model(cfg, cache=tmp_path, progress=False)
    assert isinstance(out.schedule, CosineSchedule) and out.losses is not None and len(out.losses) == 3
    again = pretrained.ddpm_model(cfg, cache=tmp_path, progress=False)
    assert again.losses is None and again.train_seconds == 0.0
    assert out.recorded_seconds == out.train_seconds
    assert again.recorded_seconds == pytest.approx(out.train_seconds)  # the cache remembers the cost
    assert math.isclose(out.schedule.logsnr_min, -20.0) and math.isclose(out.schedule.logsnr_max, 20.0)
