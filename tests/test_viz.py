"""Figures (minidiff.viz) run headless with the Agg backend and return axes."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from minidiff import viz  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_make_grid_layout_and_range():
    x = torch.linspace(-1, 1, 5 * 3 * 4 * 4).reshape(5, 3, 4, 4)
    g = viz.make_grid(x, nrow=3, padding=1)
    assert g.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    assert g.min() >= 0 and g.max() <= 1
    assert np.allclose(g[1:5, 1:5], (x[0].permute(1, 2, 0).numpy() + 1) / 2)
    assert viz.make_grid(torch.zeros(4, 8, 8)).shape == (19, 19, 1)  # (N, H, W) -> one channel


@pytest.mark.parametrize("channels", [1, 3])
def test_image_grid(channels):
    ax = viz.image_grid(torch.rand(10, channels, 8, 8) * 2 - 1, title="samples")
    assert isinstance(ax, Axes) and ax.get_title() == "samples"
    fig, axes = viz.subplots(1, 2)
    assert viz.image_grid(torch.zeros(4, channels, 8, 8), ax=axes[1]) is axes[1]
    fig.canvas.draw()


def test_image_grid_errors():
    with pytest.raises(ValueError, match="C = 1 or 3"):
        viz.image_grid(torch.zeros(4, 2, 8, 8))


def test_scatter2d():
    pts, ref = torch.randn(200, 2) * 0.3, torch.randn(500, 2) * 0.3
    ax = viz.scatter2d(pts, reference=ref, method="ddim", title="DDIM")
    assert isinstance(ax, Axes)
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title() == "DDIM"
    assert len(ax.collections) == 2
    assert matplotlib.colors.to_hex(ax.collections[1].get_facecolor()[0]) == viz.METHOD_COLORS["ddim"]
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        viz.scatter2d(torch.zeros(5, 3))


def test_plot_trajectories():
    traj = torch.cumsum(torch.randn(20, 30, 2) * 0.05, dim=0)
    ax = viz.plot_trajectories(traj, max_paths=10, reference=torch.randn(100, 2))
    assert isinstance(ax, Axes) and len(ax.lines) == 10
    ax2 = viz.plot_trajectories(list(traj), method="ddpm")
    assert len(ax2.lines) == 30
    with pytest.raises(ValueError, match="K >= 2"):
        viz.plot_trajectories(torch.zeros(1, 5, 2))


def test_method_colors_and_subplots():
    for m in [
        "data",
        "ddpm",
        "ddim",
        "ddgan",
        "distilled",
        "guided",
        "pdm",
        "patchdm",
        "euler",
        "heun",
        "dpm_solver",
    ]:
        assert matplotlib.colors.is_color_like(viz.METHOD_COLORS[m])
    assert viz.method_color("DPM-Solver") == viz.METHOD_COLORS["dpm_solver"]
    with pytest.raises(ValueError, match="No colour"):
        viz.method_color("vae")
    fig, axes = viz.subplots(2, 2, xlabel="t", ylabel="loss", titles=["a", "b", "c", "d"])
    assert axes.shape == (2, 2) and axes[1, 1].get_title() == "d" and axes[0, 0].get_xlabel() == "t"
    fig, ax = viz.subplots(titles="one")
    assert isinstance(ax, Axes) and ax.get_title() == "one"
