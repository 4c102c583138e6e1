"""Guidance (minidiff.guidance, Chapter 6): exact identities on class-labelled Gaussian mixtures, the
wrappers' NFE and shapes, guided distillation's two stages, and the errors for bad input."""

import math

import pytest
import torch

from minidiff import data, distillation, guidance, samplers
from minidiff.analytic import GaussianMixtureClassifier, GaussianMixtureDenoiser
from minidiff.diffusion import convert_prediction, q_sample
from minidiff.metrics import DigitClassifier
from minidiff.nn import MLPDenoiser
from minidiff.schedules import CosineSchedule, get_schedule

F64 = torch.float64


def grid_mixture(schedule, prediction="eps"):
    """The 25 Gaussians with their 5 rows as classes, as an exact denoiser (float64 in, float64 out)."""
    return GaussianMixtureDenoiser(
        data.twenty_five_gaussians_centers(),
        data.TWENTY_FIVE_GAUSSIANS_STD,
        schedule,
        prediction=prediction,
        classes=data.twenty_five_gaussians_rows(),
    )


def points(n=64, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64) * 0.6


def test_rows_are_the_grid_rows_and_labelled_points_match_the_plain_ones():
    centers, rows = data.twenty_five_gaussians_centers(), data.twenty_five_gaussians_rows()
    for r in range(5):  # every row is one height
        assert torch.unique(centers[rows == r, 1]).numel() == 1
    x, y = data.twenty_five_gaussians_with_rows(300, generator=torch.Generator().manual_seed(3))
    plain = data.twenty_five_gaussians(300, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x, plain) and y.shape == (300,)
    nearest = torch.cdist(x, centers).argmin(1)
    assert torch.equal(rows[nearest], y)


@pytest.mark.parametrize("t", [0.2, 0.5, 0.9])
def test_exact_classifier_is_bayes_rule(t):
    """p(y | z_t) from the mixture sums to 1, and grad log p(y|z) = grad log p(z|y) - grad log p(z),
    i.e. -(eps_y - eps) / sigma (Bayes' rule on scores)."""
    schedule = CosineSchedule()
    mix = grid_mixture(schedule)
    clf = GaussianMixtureClassifier(mix)
    z = points()
    logp = mix.class_log_posterior(z, t)
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(len(z), dtype=F64))
    y = torch.arange(len(z)) % 5
    grad = guidance.classifier_log_prob_grad(clf, z, t, y)
    sigma = schedule.sigma(torch.tensor(t, dtype=F64))
    eps_y, eps = (
        mix(z, torch.full((len(z),), t, dtype=F64), labels=y),
        mix(z, torch.full((len(z),), t, dtype=F64)),
    )
    torch.testing.assert_close(grad, -(eps_y - eps) / sigma, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("prediction", ["eps", "x", "v"])
def test_classifier_guidance_at_scale_one_with_the_exact_classifier_is_the_conditional_denoiser(prediction):
    schedule = CosineSchedule()
    mix = grid_mixture(schedule, prediction)
    clf = GaussianMixtureClassifier(mix)
    guided = guidance.ClassifierGuidance(mix, clf, 1.0, schedule, prediction=prediction)
    z, t = points(), torch.full((64,), 0.6, dtype=F64)
    y = torch.arange(64) % 5
    torch.testing.assert_close(guided(z, t, labels=y), mix(z, t, labels=y), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("w", [0.0, 0.5, 3.0])
def test_cfg_with_exact_denoisers_is_classifier_guidance_at_one_plus_w(w):
    """(1+w) eps(z|c) - w eps(z) = eps(z) - (1+w) sigma grad log p(c|z): CFG is classifier guidance at
    scale 1 + w with the implicit classifier p(c|z) (the score identity
    grad log p(z|c) + w grad log p(c|z) = (1+w) grad log p(z|c) - w grad log p(z))."""
    schedule = CosineSchedule()
    mix = grid_mixture(schedule, "eps")
    clf = GaussianMixtureClassifier(mix)
    z, t = points(), torch.full((64,), 0.4, dtype=F64)
    y = (torch.arange(64) * 3) % 5
    cfg = guidance.ClassifierFreeGuidance(mix, w)(z, t, labels=y)
    scale = guidance.convert_guidance_weight(w, source="w", target="classifier_scale")
    cg = guidance.ClassifierGuidance(mix, clf, scale, schedule, prediction="eps")(z, t, labels=y)
    torch.testing.assert_close(cfg, cg, rtol=1e-6, atol=1e-9)
    # and in scores: grad log p(z|c) + w grad log p(c|z) = (1+w) grad log p(z|c) - w grad log p(z)
    sigma = schedule.sigma(torch.tensor(0.4, dtype=F64))
    score_c, score_u = -mix(z, t, labels=y) / sigma, -mix(z, t) / sigma
    grad = guidance.classifier_log_prob_grad(clf, z, 0.4, y)
    torch.testing.assert_close(score_c + w * grad, (1 + w) * score_c - w * score_u, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("w", [0.0, 1.0, 4.0])
def test_guidance_in_eps_x_or_v_space_gives_the_same_step(w):
    schedule = CosineSchedule()
    z, t = points(), torch.full((64,), 0.7, dtype=F64)
    y = torch.arange(64) % 5
    alpha, sigma = schedule.alpha_sigma(t)
    x_hats = []
    for prediction in ("eps", "x", "v"):
        out = guidance.ClassifierFreeGuidance(grid_mixture(schedule, prediction), w)(z, t, labels=y)
        x_hats.append(
            convert_prediction(out, prediction, z_t=z, alpha=alpha[:, None], sigma=sigma[:, None])[0]
        )
    torch.testing.assert_close(x_hats[1], x_hats[0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(x_hats[2], x_hats[0], rtol=1e-6, atol=1e-9)
    # the same DDIM step, then
    steps = [
        samplers.DDIMStep(0.0)(z, 0.7, 0.5, xh, (z - alpha[0] * xh) / sigma[0], schedule) for xh in x_hats
    ]
    torch.testing.assert_close(steps[1], steps[0]) and torch.testing.assert_close(steps[2], steps[0])


class TwoCallCounter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = MLPDenoiser(dim=2, hidden=16, depth=1, emb_dim=16, num_classes=5)
        self.calls = 0

    def forward(self, z, t, **cond):
        self.calls += 1
        return self.net(z, t, **cond)


def test_cfg_costs_two_network_evaluations_per_step_and_w_zero_is_the_conditional_model():
    net = TwoCallCounter()
    schedule = CosineSchedule()
    ts = torch.linspace(1, 0, 9, dtype=F64)
    y = torch.arange(8) % 5
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))

    def ddim(model):
        return samplers.sample(
            model,
            schedule,
            ts,
            samplers.DDIMStep(0.0),
            z=z,
            cond={"labels": y},
            prediction="v",
            progress=False,
        )

    run = ddim(guidance.ClassifierFreeGuidance(net, 2.0))
    assert run.nfe == 16 and net.calls == 16
    plain = ddim(net)
    at_zero = ddim(guidance.ClassifierFreeGuidance(net, 0.0))
    assert plain.nfe == 8 and torch.equal(at_zero.x, plain.x)


def test_guidance_conventions_convert_both_ways():
    assert guidance.convert_guidance_weight(7.5, source="guidance_scale", target="w") == 6.5
    assert guidance.convert_guidance_weight(0.0, source="w", target="guidance_scale") == 1.0
    assert guidance.convert_guidance_weight(2.0, source="classifier_scale", target="guidance_scale") == 2.0
    w = torch.tensor([0.0, 1.0])
    assert torch.equal(guidance.convert_guidance_weight(w, source="w", target="guidance_scale"), w + 1)
    with pytest.raises(ValueError, match="unknown guidance convention"):
        guidance.convert_guidance_weight(1.0, source="cfg", target="w")


def test_ancestral_mean_shift_at_scale_zero_is_ddpm_and_shifts_by_scale_times_variance():
    schedule = get_schedule("linear", T=1000)
    mix = grid_mixture(schedule, "eps")
    clf = GaussianMixtureClassifier(mix)
    z = points(32).float()
    y = torch.arange(32) % 5
    t, s = torch.tensor(0.5, dtype=F64), torch.tensor(0.45, dtype=F64)
    eps = mix(z, torch.full((32,), 0.5)).float()
    x_hat = (z - schedule.sigma(t).float() * eps) / schedule.alpha(t).float()
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    plain = samplers.DDPMStep("posterior")(z, t, s, x_hat, eps, schedule, g())
    zero = guidance.ClassifierGuidedAncestralStep(clf, y, 0.0)(z, t, s, x_hat, eps, schedule, g())
    torch.testing.assert_close(zero, plain, rtol=1e-5, atol=1e-6)
    shifted = guidance.ClassifierGuidedAncestralStep(clf, y, 2.0)(z, t, s, x_hat, eps, schedule, g())
    from minidiff.diffusion import posterior

    _, var = posterior(schedule, z, x_hat, t=t, s=s)
    grad = guidance.classifier_log_prob_grad(clf, z, t.float(), y)
    torch.testing.assert_close(shifted - zero, 2.0 * var.float() * grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="variance"):
        guidance.ClassifierGuidedAncestralStep(clf, y, 1.0, variance="large")


def test_classifier_guided_sampling_moves_samples_to_their_row():
    """With the exact classifier, guided DDIM puts nearly every sample in the asked-for row; s = 0 not."""
    schedule = CosineSchedule()
    mix = grid_mixture(schedule, "eps")
    clf = GaussianMixtureClassifier(mix)
    y = torch.arange(200) % 5
    z = torch.randn(200, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    ts = torch.linspace(1, 0, 41, dtype=F64)
    rows = data.twenty_five_gaussians_rows()
    centers = data.twenty_five_gaussians_centers().to(F64)

    def row_accuracy(scale):
        model = guidance.ClassifierGuidance(mix, clf, scale, schedule)
        x = samplers.sample(
            model, schedule, ts, samplers.DDIMStep(0.0), z=z, cond={"labels": y}, progress=False
        ).x
        return float((rows[torch.cdist(x, centers).argmin(1)] == y).double().mean())

    assert row_accuracy(1.0) > 0.97 and row_accuracy(0.0) < 0.4


def test_stage_one_loss_of_the_exact_guided_student_is_zero():
    schedule = CosineSchedule()
    mix = grid_mixture(schedule, "x")

    class ExactGuidedStudent(torch.nn.Module):
        def forward(self, z, t, w=None, labels=None):
            return guidance.ClassifierFreeGuidance(mix, w)(z, t, labels=labels)

    x, y = data.twenty_five_gaussians_with_rows(128, generator=torch.Generator().manual_seed(0))
    x = x.to(F64)
    loss = guidance.stage_one_loss(
        ExactGuidedStudent(),
        mix,
        schedule,
        x,
        {"labels": y},
        w_range=(0.0, 4.0),
        prediction="x",
        teacher_prediction="x",
        weighting="x",
        generator=torch.Generator().manual_seed(1),
    )
    assert float(loss) < 1e-20
    wrong = guidance.stage_one_loss(
        lambda z, t, w=None, labels=None: mix(z, t, labels=labels),
        mix,
        schedule,
        x,
        {"labels": y},
        w_range=(1.0, 4.0),
        prediction="x",
        teacher_prediction="x",
        weighting="x",
        generator=torch.Generator().manual_seed(1),
    )
    assert float(wrong) > 1e-4  # the unguided conditional model is not the guided target


def test_one_stage_two_student_step_is_two_guided_teacher_steps():
    """The stage-two target: a student whose x-hat is x-tilde of the w-conditioned teacher lands in one DDIM
    step where two of the teacher's steps land, at every w (Algorithm 2 of Meng et al.)."""
    schedule = CosineSchedule()
    mix = grid_mixture(schedule, "x")
    teacher = lambda z, t, w=None, labels=None: guidance.ClassifierFreeGuidance(mix, w)(z, t, labels=labels)  # noqa
    x, y = data.twenty_five_gaussians_with_rows(64, generator=torch.Generator().manual_seed(2))
    x = x.to(F64)
    N = 4
    t = torch.full((64,), 0.75, dtype=F64)
    w = torch.linspace(0, 4, 64, dtype=F64)
    cond = {"labels": y, "w": w}
    z_t, _ = q_sample(schedule, x, t, generator=torch.Generator().manual_seed(3))
    _, z_end = distillation.teacher_two_steps(teacher, schedule, z_t, t, N, "x", cond)
    t_mid, t_end = distillation.teacher_times(t, N)
    a_t, s_t = schedule.alpha_sigma(t)
    a_e, s_e = schedule.alpha_sigma(t_end)
    x_tilde = distillation.distillation_target(z_t, z_end, a_t, s_t, a_e, s_e)
    z_student, _ = distillation.ddim_step(
        lambda z, tt, **c: x_tilde, schedule, z_t, t=t, s=t_end, prediction="x"
    )
    torch.testing.assert_close(z_student, z_end, rtol=1e-9, atol=1e-10)
    split = guidance.guidance_batch_cond((0.0, 4.0))
    xb, cb = split((x, y), torch.Generator().manual_seed(0))
    assert torch.equal(xb, x) and set(cb) == {"labels", "w"} and bool(((cb["w"] >= 0) & (cb["w"] <= 4)).all())


def tiny_unet(**kw):
    from minidiff.nn import UNet

    return UNet(in_channels=1, base_channels=8, channel_mults=(1, 2), image_size=8, **kw)


def test_guided_distillation_runs_both_stages_and_samples_at_one_nfe_per_step():
    schedule = CosineSchedule()
    torch.manual_seed(0)
    teacher = tiny_unet(num_classes=10).eval()
    images = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    labels = torch.arange(32) % 10
    student = tiny_unet(num_classes=10, guidance_embedding=True)
    s1 = guidance.distill_guided_teacher(
        teacher,
        student,
        schedule,
        (images, labels),
        3,
        w_range=(0.0, 2.0),
        teacher_prediction="eps",
        batch_size=8,
        progress=False,
        seed=0,
    )
    assert len(s1.losses) == 3 and s1.teacher_calls == 6 and s1.w_range == (0.0, 2.0)
    rounds = guidance.distill_guided_student(
        s1, schedule, (images, labels), 2, 2, batch_size=8, progress=False
    )
    assert [r.N for r in rounds] == [2, 1]
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model = guidance.GuidanceWeighted(rounds[0].student, 1.5, s1.w_range)
    for step in (samplers.DDIMStep(0.0), guidance.StochasticDistilledStep()):
        run = samplers.sample(
            model,
            schedule,
            distillation.student_timesteps(2),
            step,
            z=z,
            prediction="v",
            cond={"labels": torch.arange(4)},
            generator=torch.Generator().manual_seed(2),
            progress=False,
        )
        assert run.nfe == 2 and run.x.shape == z.shape and bool(torch.isfinite(run.x).all())


def test_a_fresh_guided_student_starts_as_the_teachers_conditional_model():
    torch.manual_seed(0)
    teacher = tiny_unet(num_classes=10)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student = guidance.make_guided_student(teacher, tiny_unet(num_classes=10, guidance_embedding=True))
    z, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.arange(4)
    torch.testing.assert_close(student(z, t, labels=y, w=torch.full((4,), 3.0)), teacher(z, t, labels=y))
    with pytest.raises(ValueError, match="embed w"):
        guidance.make_guided_student(teacher, tiny_unet(num_classes=10))
    with pytest.raises(ValueError, match="architecture"):
        guidance.make_guided_student(teacher, UNetWide())


def UNetWide():
    return tiny_unet(num_classes=10, guidance_embedding=True, num_res_blocks=2)


def test_stochastic_step_is_a_double_deterministic_step_then_forward_noise():
    schedule = CosineSchedule()
    z, x_hat = torch.randn(16, 2, dtype=F64), torch.randn(16, 2, dtype=F64) * 0.3
    t, s = 0.75, 0.5
    alpha, sigma = schedule.alpha_sigma(torch.tensor(t, dtype=F64))
    eps = (z - alpha * x_hat) / sigma
    out = guidance.StochasticDistilledStep()(z, t, s, x_hat, eps, schedule, torch.Generator().manual_seed(0))
    back = samplers.DDIMStep(0.0)(z, t, torch.tensor(0.25, dtype=F64), x_hat, eps, schedule)
    from minidiff.diffusion import q_step

    expected = q_step(
        schedule,
        back,
        s=torch.tensor(0.25, dtype=F64),
        t=torch.tensor(0.5, dtype=F64),
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(out, expected)
    last = guidance.StochasticDistilledStep()(z, 0.25, 0.0, x_hat, eps, schedule, None)
    torch.testing.assert_close(last, samplers.DDIMStep(0.0)(z, 0.25, 0.0, x_hat, eps, schedule))


def test_noisy_classifier_trains_on_noise_and_is_marked():
    schedule = CosineSchedule()
    clf = guidance.NoisyClassifier(3, in_channels=1, base_channels=8, channel_mults=(1, 2), image_size=8)
    assert not bool(clf.trained_on_noise)
    assert not any(
        name.startswith("encoder.up") or name.startswith("encoder.conv_out")
        for name, _ in clf.named_parameters()
    )  # no decoder
    images = torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(24) % 3
    result = guidance.train_noisy_classifier(clf, schedule, images, labels, 4, batch_size=8, progress=False)
    assert bool(result.ema_model.trained_on_noise) and len(result.losses) == 4
    assert "trained_on_noise" in result.ema_model.state_dict()  # saved with the weights
    logits = result.ema_model(images[:5], torch.rand(5))
    assert logits.shape == (5, 3)
    grad = guidance.classifier_log_prob_grad(result.ema_model, images[:5], 0.5, labels[:5])
    assert grad.shape == (5, 1, 8, 8) and not grad.requires_grad


# ----------------------------------------------------------------------------- bad input


def test_bad_input_gets_clear_errors():
    schedule = CosineSchedule()
    mix = grid_mixture(schedule)
    clf = GaussianMixtureClassifier(mix)
    z, t = points(8), torch.full((8,), 0.5, dtype=F64)
    # an unknown class
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.4"):
        mix(z, t, labels=torch.full((8,), 7))
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.4"):
        guidance.classifier_log_prob_grad(clf, z, 0.5, torch.full((8,), 5))
    # a w out of the trained range
    with pytest.raises(ValueError, match="outside the guidance range"):
        guidance.GuidanceWeighted(lambda z, t, **c: z, 6.0, (0.0, 4.0))
    with pytest.raises(ValueError, match="w_range"):
        guidance.GuidanceWeighted(lambda z, t, **c: z, 1.0, (2.0, 1.0))
    # a model without the null token asked for CFG
    with pytest.raises(ValueError, match="null token"):
        guidance.ClassifierFreeGuidance(MLPDenoiser(dim=2, hidden=16, depth=1, emb_dim=16), 1.0)
    with pytest.raises(ValueError, match="pass labels"):
        guidance.ClassifierFreeGuidance(mix, 1.0)(z, t)
    with pytest.raises(ValueError, match="finite"):
        guidance.ClassifierFreeGuidance(mix, float("nan"))
    # a classifier that was not trained on noised inputs
    with pytest.raises(ValueError, match="noise-conditional"):
        guidance.ClassifierGuidance(mix, DigitClassifier(), 1.0, schedule)
    with pytest.raises(ValueError, match="noise-conditional"):
        guidance.ClassifierGuidance(
            mix, guidance.NoisyClassifier(10, in_channels=1, base_channels=8, image_size=8), 1.0, schedule
        )
    with pytest.raises(ValueError, match="pass labels"):
        guidance.ClassifierGuidance(mix, clf, 1.0, schedule)(z, t)
    with pytest.raises(ValueError, match="classes"):
        GaussianMixtureClassifier(
            GaussianMixtureDenoiser(data.twenty_five_gaussians_centers(), 0.05, schedule)
        )
    with pytest.raises(ValueError, match="one integer label"):
        GaussianMixtureDenoiser(data.twenty_five_gaussians_centers(), 0.05, schedule, classes=torch.zeros(3))
    with pytest.raises(ValueError, match="class-conditional"):
        guidance.stage_one_loss(mix, mix, schedule, z, {}, w_range=(0, 1), teacher_prediction="eps")
    with pytest.raises(ValueError, match="num_classes"):
        guidance.NoisyClassifier(1, in_channels=1, image_size=8)


def test_conditional_toy_metrics_see_fidelity_and_diversity():
    from minidiff.metrics import conditional_toy_metrics

    centers, rows = data.twenty_five_gaussians_centers(), data.twenty_five_gaussians_rows()
    x, y = data.twenty_five_gaussians_with_rows(2000, generator=torch.Generator().manual_seed(0))
    args = (centers, rows, data.TWENTY_FIVE_GAUSSIANS_STD)
    fresh = conditional_toy_metrics(x, y, *args)
    assert fresh["class_accuracy"] > 0.99 and fresh["modes_in_class"] == 5 and fresh["within_class_kl"] < 0.01
    wrong = conditional_toy_metrics(x, (y + 1) % 5, *args)  # right points, wrong labels
    assert wrong["class_accuracy"] < 0.01
    # collapse: every sample of row r on one mode of that row (centre r is in row r)
    collapsed = conditional_toy_metrics(centers[y], y, *args)
    assert collapsed["class_accuracy"] == 1.0 and collapsed["modes_in_class"] == 1
    assert abs(collapsed["within_class_kl"] - math.log(5)) < 1e-9
    with pytest.raises(ValueError, match="labels must be"):
        conditional_toy_metrics(x, y[:5], *args)
