"""Configs (minidiff.configs): sizes, the environment override, copies, and that they build."""

import inspect

import pytest
import torch

from minidiff import configs
from minidiff.nn import MLPDenoiser, UNet
from minidiff.schedules import get_schedule
from minidiff.train import train

NAMES = ["ddpm_toy", "ddpm_digits"]


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("MINIDIFF_SIZE", raising=False)


def test_resolve_size(monkeypatch):
    assert configs.resolve_size("small") == "small"
    assert configs.resolve_size("full") == "full"
    assert configs.resolve_size() == ("full" if torch.cuda.is_available() else "small")
    monkeypatch.setenv("MINIDIFF_SIZE", "small")
    assert configs.resolve_size("full") == "small"  # the environment wins (CI)
    monkeypatch.setenv("MINIDIFF_SIZE", "FULL")
    assert configs.resolve_size("auto") == "full"
    monkeypatch.setenv("MINIDIFF_SIZE", "huge")
    with pytest.raises(ValueError, match="MINIDIFF_SIZE"):
        configs.resolve_size()


def test_resolve_size_bad_argument():
    with pytest.raises(ValueError, match="'auto', 'small', 'medium' or 'full'"):
        configs.resolve_size("large")
    assert configs.resolve_size("medium") == "medium"


def test_names_and_unknown():
    assert set(NAMES) <= set(configs.config_names())
    with pytest.raises(ValueError, match="ddpm_digits"):
        configs.get_config("ddpm_cifar")


def test_get_config_returns_deep_copies():
    a = configs.get_config("ddpm_digits", "small")
    a["model"]["base_channels"] = 999
    a["train"].clear()
    b = configs.get_config("ddpm_digits", "small")
    assert b["model"]["base_channels"] == 16 and b["train"]["steps"] > 0


def test_env_override_in_get_config(monkeypatch):
    monkeypatch.setenv("MINIDIFF_SIZE", "small")
    assert configs.get_config("ddpm_toy", "full")["size"] == "small"


@pytest.mark.parametrize("size", ["small", "full"])
@pytest.mark.parametrize("name", NAMES)
def test_configs_build(name, size):
    cfg = configs.get_config(name, size)
    assert cfg["name"] == name and cfg["size"] == size
    assert {"data", "model", "train", "diffusion", "sample"} <= set(cfg)
    inspect.signature(train).bind_partial(**cfg["train"])  # only train() keyword arguments
    d = cfg["diffusion"]
    get_schedule(d["schedule"], T=d["T"])
    assert d["prediction"] in ("eps", "x", "v") and cfg["sample"]["n"] > 0 and cfg["sample"]["steps"] > 0
    if cfg["architecture"] == "mlp":
        model = MLPDenoiser(**cfg["model"])
        z = torch.randn(4, 2)
    else:
        model = UNet(**cfg["model"])
        s = cfg["data"]["size"]
        assert cfg["model"]["image_size"] == s
        z = torch.randn(2, 1, s, s)
    with torch.no_grad():
        assert model(z, torch.rand(len(z))).shape == z.shape


def test_small_is_smaller_than_full():
    for name in NAMES:
        small, full = configs.get_config(name, "small"), configs.get_config(name, "full")
        assert small["train"]["steps"] < full["train"]["steps"]


def test_register_config_validates():
    with pytest.raises(ValueError, match="lacks the keys"):
        configs.register_config("broken", small={"data": {}}, full={})
    assert "broken" not in configs.config_names()
