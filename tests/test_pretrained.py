"""minidiff.pretrained: train once, then load the identical weights from the safetensors cache."""

import pytest
import torch

from minidiff import configs, pretrained


def tiny_config():
    cfg = configs.get_config("ddpm_toy", "small")
    cfg["model"] = {"dim": 2, "hidden": 16, "depth": 1, "emb_dim": 8}
    cfg["train"] = {**cfg["train"], "steps": 5, "batch_size": 16}
    cfg["data"] = {**cfg["data"], "n": 64}
    return cfg


def test_train_then_load_gives_identical_weights(tmp_path):
    first = pretrained.ddpm_model(tiny_config(), cache=tmp_path, progress=False)
    assert first.path.exists() and first.path.suffix == ".safetensors"
    assert first.losses is not None and len(first.losses) == 5
    second = pretrained.ddpm_model(tiny_config(), cache=tmp_path, progress=False)
    assert second.losses is None and second.train_seconds == 0.0
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_changed_config_trains_a_new_model(tmp_path):
    pretrained.ddpm_model(tiny_config(), cache=tmp_path, progress=False)
    cfg = tiny_config()
    cfg["train"]["steps"] = 6
    other = pretrained.ddpm_model(cfg, cache=tmp_path, progress=False)
    assert other.losses is not None and len(other.losses) == 6
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_no_cache_and_bad_architecture(tmp_path):
    out = pretrained.ddpm_model(tiny_config(), cache=False, progress=False)
    assert out.path is None
    cfg = tiny_config()
    cfg["architecture"] = "transformer"
    with pytest.raises(ValueError, match="architecture"):
        pretrained.build_model(cfg)
    with pytest.raises(ValueError):
        pretrained.ddpm_model("no_such_config")


def test_initialisation_is_seeded_and_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = pretrained.ddpm_model(tiny_config(), cache=False, progress=False)
    assert torch.equal(torch.rand(3), expected)
    b = pretrained.ddpm_model(tiny_config(), cache=False, progress=False)
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y)


def test_store_then_load_gives_the_stored_model(tmp_path):
    trained = pretrained.ddpm_model(tiny_config(), cache=False, progress=False)
    path = pretrained.store(trained.model, tiny_config(), cache=tmp_path)
    assert path == pretrained.cache_path(tiny_config(), tmp_path) and path.exists()
    loaded = pretrained.ddpm_model(tiny_config(), cache=tmp_path, progress=False)
    assert loaded.losses is None  # loaded, not trained
    for a, b in zip(trained.model.state_dict().values(), loaded.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other = tiny_config()
    other["model"] = {**other["model"], "hidden": 32}
    with pytest.raises(ValueError, match="architecture"):
        pretrained.store(trained.model, other, cache=tmp_path)
    with pytest.raises(ValueError, match="config"):
        pretrained.store(trained.model, {"name": "x"}, cache=tmp_path)


def test_a_truncated_cache_file_is_trained_again_with_a_warning(tmp_path):
    first = pretrained.ddpm_model(tiny_config(), cache=tmp_path, progress=False)
    data = first.path.read_bytes()
    first.path.write_bytes(data[: len(data) // 2])                  # a run killed while writing (old code)
    with pytest.warns(RuntimeWarning, match="does not load"):
        again = pretrained.ddpm_model(tiny_config(), cache=tmp_path, progress=False)
    assert again.losses is not None                                  # trained, not loaded
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert first.path.read_bytes() == data                          # and the entry is whole again
    third = pretrained.ddpm_model(tiny_config(), cache=tmp_path, progress=False)
    assert third.losses is None


def _train_in_a_process(cache, queue, barrier):
    torch.set_num_threads(1)
    cfg = tiny_config()
    cfg["train"]["steps"] = 200
    barrier.wait()                                                    # both ask at the same moment
    queue.put(pretrained.ddpm_model(cfg, cache=cache, progress=False).losses is not None)


def test_two_processes_asking_for_one_model_train_it_once(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_train_in_a_process, args=(str(tmp_path), queue, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    trained = sorted(queue.get(timeout=5) for _ in procs)
    assert trained == [False, True]                     # one trained, the other waited for it and loaded


def test_training_data_of_a_conditional_config_has_labels():
    from minidiff import configs, data, pretrained

    toy = configs.get_config("cfg_toy", "small")
    x, y = pretrained.training_data(toy)
    same = data.toy_dataset("25gaussians", toy["data"]["n"], generator=torch.Generator().manual_seed(6))
    assert torch.equal(x, same)  # the unlabelled chapters' points, now with their rows
    assert y.dtype == torch.long and set(y.unique().tolist()) == set(range(5))
    nearest = torch.cdist(x, data.twenty_five_gaussians_centers()).argmin(1)
    assert (data.twenty_five_gaussians_rows()[nearest] == y).double().mean() > 0.99
    images, digits = pretrained.training_data(configs.get_config("cfg_digits", "small"))
    assert images.shape[1:] == (1, 8, 8) and len(digits) == len(images)
    bad = dict(toy, data=dict(toy["data"], labels="columns"))
    with pytest.raises(ValueError, match="rows"):
        pretrained.training_data(bad)


def test_a_conditional_model_trains_with_label_dropout(tmp_path):
    from minidiff import configs, guidance, pretrained

    cfg = configs.shrink(configs.get_config("cfg_toy", "small"), **{"train.steps": 3, "data.n": 64})
    m = pretrained.ddpm_model(cfg, cache=tmp_path, progress=False)
    assert len(m.losses) == 3 and guidance.has_null_token(m.model)
    again = pretrained.ddpm_model(cfg, cache=tmp_path, progress=False)  # from the cache
    assert again.losses is None and again.recorded_losses == m.losses == m.recorded_losses


def test_a_patched_config_builds_the_unet_of_its_patch_grid():
    from minidiff import configs, patching, pretrained

    cfg = configs.get_config("pdm_shapes", "small")
    for P in (1, 2, 4, 8):
        net = pretrained.build_model(dict(cfg, model=dict(cfg["model"], patch_size=P)))
        assert isinstance(net, patching.Patched) and net.P == P
        assert net.net.conv_in.in_channels == P * P  # C P^2 channels in
        z = torch.randn(2, 1, 32, 32)
        assert net(z, torch.full((2,), 0.5)).shape == z.shape
    with pytest.raises(ValueError, match="not divisible"):
        pretrained.build_model(dict(cfg, model=dict(cfg["model"], patch_size=3)))


def test_shapes_training_data_is_seeded_and_takes_labels():
    from minidiff import configs, data, pretrained

    cfg = configs.shrink(configs.get_config("pdm_shapes", "small"), **{"data.n": 16})
    x = pretrained.training_data(cfg)
    same, kind = data.shapes(16, 32, generator=torch.Generator().manual_seed(6))
    assert torch.equal(x, same)
    xl, yl = pretrained.training_data(dict(cfg, data=dict(cfg["data"], labels="shapes")))
    assert torch.equal(xl, same) and torch.equal(yl, kind)
    with pytest.raises(ValueError, match="shapes"):
        pretrained.training_data(dict(cfg, data=dict(cfg["data"], labels="digits")))


def test_a_split_network_trains_on_its_own_range_of_t(tmp_path, monkeypatch):
    from minidiff import configs, diffusion, pretrained

    seen = []
    real = diffusion.training_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("t_range"))
        return real(*args, **kwargs)

    monkeypatch.setattr(diffusion, "training_loss", spy)
    cfg = configs.shrink(configs.get_config("pdm_shapes", "small"), **{"train.steps": 2, "data.n": 8})
    cfg["diffusion"]["t_range"] = (0.4, 1.0)
    first = pretrained.ddpm_model(cfg, cache=tmp_path, progress=False)
    assert seen == [(0.4, 1.0)] * 2 and first.losses is not None
    other = dict(cfg, diffusion=dict(cfg["diffusion"], t_range=(0.0, 0.4)))
    assert pretrained.cache_path(other, tmp_path) != first.path  # its own cache entry


def test_a_patch_dm_config_trains_with_its_block_loss_and_codes(tmp_path, monkeypatch):
    from minidiff import configs, patchdm, pretrained

    calls = []
    real = patchdm.patch_dm_loss

    def spy(net, schedule, x, patch, **kwargs):
        calls.append((x.shape, patch, kwargs["cond"]["latent"].shape, kwargs["p_uncond"]))
        return real(net, schedule, x, patch, **kwargs)

    monkeypatch.setattr(patchdm, "patch_dm_loss", spy)
    cfg = configs.shrink(configs.get_config("patchdm_textures", "small"),
                         **{"train.steps": 2, "train.batch_size": 4, "data.n": 8, "model.num_images": 8})
    m = pretrained.ddpm_model(cfg, cache=tmp_path, progress=False)
    assert isinstance(m.model, patchdm.PatchDenoiser) and len(m.losses) == 2
    assert calls[0] == ((4, 1, 32, 32), 16, (4, cfg["model"]["code_dim"]), 0.1)
    crops, index = pretrained.training_data(cfg)
    assert crops.shape == (8, 1, 32, 32) and torch.equal(index, torch.arange(8))
