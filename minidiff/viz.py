"""Figures: image grids, 2-D scatter plots, reverse trajectories, and one colour per method.

Every function draws on a given matplotlib ``ax`` (or makes a new figure) and returns the axes,
so chapters can combine panels. Colours come from ``METHOD_COLORS`` so that, say, DDIM is the
same colour in every chapter of the book.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "METHOD_COLORS",
    "method_color",
    "subplots",
    "label_axes",
    "make_grid",
    "image_grid",
    "scatter2d",
    "plot_trajectories",
]

METHOD_COLORS = {
    "data": "#9e9e9e",
    "ddpm": "#1f77b4",
    "ddim": "#ff7f0e",
    "ddgan": "#2ca02c",
    "distilled": "#d62728",
    "teacher": "#1f77b4",
    "student": "#d62728",
    "guided": "#9467bd",
    "cfg": "#9467bd",
    "guided_distilled": "#e377c2",
    "pdm": "#8c564b",
    "patchdm": "#17becf",
    "euler": "#bcbd22",
    "heun": "#7f7f7f",
    "dpm_solver": "#393b79",
    "reverse_sde": "#637939",
    "predictor_corrector": "#e7969c",
    "ancestral": "#1f77b4",
    "gan": "#ad494a",
    "ddpm_few_steps": "#9ecae1",
}
"""One colour per method, the same in every chapter (teacher = ddpm, student = distilled)."""


def method_color(name: str) -> str:
    """Colour of a method in ``METHOD_COLORS`` (case-insensitive, '-' and ' ' read as '_')."""
    key = name.lower().replace("-", "_").replace(" ", "_")
    if key not in METHOD_COLORS:
        raise ValueError(f"No colour for method {name!r}; use one of {sorted(METHOD_COLORS)} or add one.")
    return METHOD_COLORS[key]


def subplots(
    nrows: int = 1,
    ncols: int = 1,
    size: float = 3.0,
    xlabel=None,
    ylabel=None,
    titles=None,
    squeeze: bool = True,
    **kwargs,
):
    """``plt.subplots`` with panels of ``size`` inches, labelled axes and optional titles.

    Returns (fig, axes) like matplotlib (axes an array unless a single panel and ``squeeze``).
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False, constrained_layout=True, **kwargs
    )
    flat = axes.ravel()
    titles = [titles] * len(flat) if isinstance(titles, str) else titles
    for i, ax in enumerate(flat):
        label_axes(ax, xlabel, ylabel, None if titles is None or i >= len(titles) else titles[i])
    if squeeze:
        return fig, (flat[0] if len(flat) == 1 else (flat if nrows == 1 or ncols == 1 else axes))
    return fig, axes


def label_axes(ax, xlabel: str | None = None, ylabel: str | None = None, title: str | None = None):
    """Set whichever of the x label, y label and title are given; return ``ax``."""
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    return ax


def _new_ax(ax, size: float = 3.0):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=(size, size), constrained_layout=True)
    return ax


def make_grid(images, nrow: int | None = None, padding: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Tile images (N, C, H, W) in [-1, 1] (C = 1 or 3) into one array (H', W', C) in [0, 1].

    ``nrow`` images per row (default: about sqrt(N)); ``pad_value`` in [0, 1] fills the gaps.
    """
    x = torch.as_tensor(images).detach().cpu().float()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or len(x) == 0:
        raise ValueError(f"images must be (N, C, H, W) with C = 1 or 3 and N >= 1, got {tuple(x.shape)}.")
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}.")
    rows = math.ceil(n / nrow)
    x = ((x.clamp(-1, 1) + 1) / 2).numpy().transpose(0, 2, 3, 1)
    shape = (rows * (h + padding) + padding, nrow * (w + padding) + padding, c)
    grid = np.full(shape, pad_value, np.float32)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = x[i]
    return grid


def image_grid(
    images,
    nrow: int | None = None,
    ax=None,
    title: str | None = None,
    padding: int = 1,
    pad_value: float = 1.0,
    size: float = 4.0,
):
    """Show images (N, C, H, W) in [-1, 1] (C = 1 or 3) as one grid on ``ax``; return ``ax``."""
    grid = make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)
    ax = _new_ax(ax, size)
    if grid.shape[2] == 1:
        ax.imshow(grid[:, :, 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    if title is not None:
        ax.set_title(title)
    return ax


def _np2d(points, name: str) -> np.ndarray:
    p = torch.as_tensor(points).detach().cpu().float().numpy()
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"{name} must be (N, 2) points, got shape {p.shape}.")
    return p


def scatter2d(
    points,
    ax=None,
    reference=None,
    color: str | None = None,
    label: str | None = None,
    title: str | None = None,
    s: float = 2.0,
    alpha: float = 0.6,
    lim: float | None = 1.2,
    method: str | None = None,
):
    """Scatter (N, 2) points on ``ax``, optionally over ``reference`` data drawn in grey.

    ``method`` picks the colour from ``METHOD_COLORS`` (and the default label); ``lim`` sets both
    axes to [-lim, lim] (None: automatic). Axes are labelled x1, x2 with equal aspect; returns ``ax``.
    """
    p = _np2d(points, "points")
    ax = _new_ax(ax)
    if reference is not None:
        r = _np2d(reference, "reference")
        ax.scatter(r[:, 0], r[:, 1], s=s, c=METHOD_COLORS["data"], alpha=0.3, label="data", linewidths=0)
    if color is None:
        color = method_color(method) if method is not None else METHOD_COLORS["ddpm"]
    if label is None and method is not None:
        label = method
    ax.scatter(p[:, 0], p[:, 1], s=s, c=color, alpha=alpha, label=label, linewidths=0)
    if lim is not None:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    label_axes(ax, "$x_1$", "$x_2$", title)
    if label is not None or reference is not None:
        ax.legend(loc="upper right", markerscale=4, fontsize="small")
    return ax


def plot_trajectories(
    traj,
    ax=None,
    max_paths: int = 50,
    color: str | None = None,
    method: str | None = None,
    reference=None,
    title: str | None = None,
    lim: float | None = None,
):
    """Draw 2-D reverse trajectories; ``traj`` is (K, N, 2) (K steps, first = noise) or a list of (N, 2).

    Draws the paths of the first ``max_paths`` points, their start (hollow circles, noise) and end
    (dots, samples), over optional ``reference`` data in grey. Returns ``ax``.
    """
    if isinstance(traj, (list, tuple)):
        traj = torch.stack([torch.as_tensor(t).detach().cpu() for t in traj])
    t = torch.as_tensor(traj).detach().cpu().float().numpy()
    if t.ndim != 3 or t.shape[2] != 2 or t.shape[0] < 2:
        raise ValueError(f"traj must be (K, N, 2) with K >= 2 steps, got shape {t.shape}.")
    t = t[:, :max_paths]
    ax = _new_ax(ax)
    if reference is not None:
        r = _np2d(reference, "reference")
        ax.scatter(r[:, 0], r[:, 1], s=2, c=METHOD_COLORS["data"], alpha=0.3, linewidths=0)
    if color is None:
        color = method_color(method) if method is not None else METHOD_COLORS["ddpm"]
    ax.plot(t[:, :, 0], t[:, :, 1], color=color, alpha=0.5, linewidth=0.8)
    ax.scatter(
        t[0, :, 0], t[0, :, 1], s=12, facecolors="none", edgecolors=color, linewidths=0.8, label="start $z_1$"
    )
    ax.scatter(t[-1, :, 0], t[-1, :, 1], s=12, c=color, label="end $x$")
    if lim is not None:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    label_axes(ax, "$x_1$", "$x_2$", title)
    ax.legend(loc="upper right", fontsize="small")
    return ax
