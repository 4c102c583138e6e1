"""Every ``full`` config, at full model size on the CPU: built, two training steps, a two-step sampler.

The full sizes are for a GPU and never run in CI; this keeps their path from breaking silently. Each
config trains its network through the one training loop with a batch of 2 (its "precision" / "compile"
"auto" settings resolve to fp32 without compiling on the CPU) and samples 2 images with 2 steps (DDGAN:
its T = 4 steps). Chapter 5's configs also run one distillation round, chapter 6's the noisy classifier
and stage one of guided distillation, chapter 7's the split networks.
"""

import math

import pytest
import torch

from minidiff import configs, ddgan, distillation, guidance, patchdm, pretrained, samplers
from minidiff.train import resolve_compile, resolve_precision

pytestmark = pytest.mark.slow

TWO_STEPS = torch.tensor([1.0, 0.5, 0.0])          # t = i/T on every schedule of the book
TINY = {"steps": 2, "batch_size": 2, "progress": False}


def _changed(before: dict, model: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if v.is_floating_point())


def _shape(cfg: dict, n: int = 2) -> tuple:
    if cfg["architecture"] == "mlp":
        return (n, cfg["model"]["dim"])
    side = cfg["sample"].get("size", cfg["data"].get("size", cfg["data"].get("resolution")))
    return (n, cfg["model"]["in_channels"], side, side)


def _sample(cfg: dict, model, schedule) -> torch.Tensor:
    cond = {}
    if cfg["model"].get("num_classes"):
        cond["labels"] = torch.arange(2) % cfg["model"]["num_classes"]
    if cfg["architecture"] == "patch_dm":   # chapter 8: patch by patch, two images' codes
        cond["latent"] = model.code(torch.arange(2))
        model = patchdm.FeatureCollage(model, cfg["model"]["patch"])
    out = samplers.sample(model, schedule, TWO_STEPS, samplers.DDIMStep(), shape=_shape(cfg), cond=cond,
                          prediction=cfg["diffusion"]["prediction"], progress=False,
                          generator=torch.Generator().manual_seed(0))
    assert out.nfe == 2
    return out.x


@pytest.mark.parametrize("name", configs.config_names())
def test_full_config_trains_two_steps_and_samples(name, one_thread):
    cfg = configs.get_config(name, "full")
    cpu = torch.device("cpu")
    settings = cfg["train"]
    assert resolve_precision(settings.get("precision", "fp32"), cpu) == "fp32"
    assert resolve_compile(settings.get("compile", False), cpu) is False
    if "discriminator" in cfg:                      # chapter 4: DDGAN's two-player step
        before = {k: v.clone() for k, v in ddgan.build(cfg)[0].state_dict().items()}
        result = ddgan.train_config(cfg, **TINY)
        assert result.steps == 2 and all(map(math.isfinite, result.d_losses + result.g_losses))
        assert _changed(before, result.generator)
        x = ddgan.sample(result.ema_generator, result.schedule, _shape(cfg),
                         generator=torch.Generator().manual_seed(0)).x
        assert x.shape == _shape(cfg) and torch.isfinite(x).all()
        return
    diff = cfg["diffusion"]
    schedule = pretrained.config_schedule(cfg)
    before = pretrained.seeded_model(cfg).state_dict()
    result = pretrained.train_config(cfg, **TINY)
    assert result.steps == 2 and all(map(math.isfinite, result.losses)) and _changed(before, result.model)
    x = _sample(cfg, result.ema_model, schedule)
    assert x.shape == _shape(cfg) and torch.isfinite(x).all()
    data = pretrained.training_data(cfg)
    if "distill" in cfg:                            # chapter 5: one round of Algorithm 1
        d = cfg["distill"]
        kwargs = {**d["train"], "steps": 2, "batch_size": 2, "progress": False}
        r = distillation.distill_round(result.ema_model, schedule, data, d["start_steps"],
                                       prediction=d["prediction"], weighting=d["weighting"],
                                       teacher_prediction=diff["prediction"], **kwargs)
        assert r.steps == 2 and all(map(math.isfinite, r.losses))
    if "guide" in cfg:                              # chapter 6: the noisy classifier and stage one
        g = cfg["guide"]
        images, labels = data
        classifier = guidance.NoisyClassifier(10, **g["classifier"]["model"])
        noisy = guidance.train_noisy_classifier(classifier, schedule, images, labels,
                                                **{**g["classifier"]["train"], **TINY})
        assert all(map(math.isfinite, noisy.losses))
        student = pretrained.build_model(dict(cfg, model=dict(cfg["model"], guidance_embedding=True)))
        one = guidance.distill_guided_teacher(result.ema_model, student, schedule, data, w_range=g["w_range"],
                                              teacher_prediction=diff["prediction"],
                                              **{**g["stage_one"], **TINY})
        assert one is not None
    if "pdm" in cfg:                                # chapter 7: the two networks of a split model
        snr = cfg["pdm"]["split_snr"]
        from minidiff.patching import split_time
        t_split = split_time(schedule, snr)
        for t_range in ((0.0, t_split), (t_split, 1.0)):
            part = dict(cfg, diffusion=dict(diff, t_range=t_range))
            assert all(map(math.isfinite, pretrained.train_config(part, **TINY).losses))
