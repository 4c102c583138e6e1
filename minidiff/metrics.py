"""Metrics: mode coverage on toys, Wasserstein distances in 2-D, and a feature-based FID.

The feature distance follows Heusel et al. 2017 (FID, eq. (6)): the Frechet distance between
Gaussians fitted to network features of real and generated images. Instead of Inception-v3 on
natural images we use a tiny CNN trained here on the digits (or shapes), so the numbers are
only comparable with each other, never with published FIDs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

__all__ = [
    "mode_stats",
    "toy_quality",
    "wasserstein_2d",
    "sliced_wasserstein",
    "DigitClassifier",
    "cache_dir",
    "train_classifier",
    "digit_classifier",
    "features",
    "classifier_accuracy",
    "frechet_distance",
    "feature_distance",
    "feature_distance_floor",
]


def _points(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if x.ndim != 2 or x.shape[1] != 2 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty (N, 2) array of points, got shape {tuple(x.shape)}.")
    return x


# ----------------------------------------------------------------------------------------------
# Toy metrics
# ----------------------------------------------------------------------------------------------


def mode_stats(samples, centers, std: float, num_std: float = 3.0, min_count: int | None = None) -> dict:
    """Mode coverage and high-quality rate on a mixture toy (DDGAN 25-Gaussians table).

    Xiao et al. 2022 (DDGAN, Appendix) report "modes" and "high quality samples %" on the
    25-Gaussians, following the GAN mode-collapse literature (Srivastava et al. 2017, VEEGAN):
    a sample is *high quality* if it lies within ``num_std`` (3) standard deviations of its
    nearest centre. Rule used here for a mode to count as *covered*: it is the nearest centre of
    at least ``min_count`` high-quality samples; by default ``min_count = max(1, ceil(0.1 * n / K))``
    (10% of the count a perfect sampler would put there; 10 of 2500 samples for K = 25), so a few
    stray samples do not count as covering a mode.

    Returns dict(modes_covered: int, high_quality_rate: float in [0, 1], counts: list[int] of
    high-quality samples per mode, min_count: int).
    """
    x = _points(samples, "samples")
    c = _points(centers, "centers")
    if not std > 0:
        raise ValueError(f"std must be > 0 (the standard deviation of each mode), got {std!r}.")
    n, k = len(x), len(c)
    if min_count is None:
        min_count = max(1, math.ceil(0.1 * n / k))
    dist, nearest = torch.cdist(x, c).min(dim=1)
    hq = dist <= num_std * std
    counts = torch.bincount(nearest[hq], minlength=k)
    return {
        "modes_covered": int((counts >= min_count).sum()),
        "high_quality_rate": float(hq.double().mean()),
        "counts": counts.tolist(),
        "min_count": int(min_count),
    }


def toy_quality(samples, reference, name: str = "25gaussians", generator: torch.Generator | None = None
                ) -> dict:
    """The toy-data row of the book's tables: modes covered and high-quality rate (:func:`mode_stats`
    with the data set's own centres and std) and W2 to a `reference` set of fresh data points.
    Returns dict(modes_covered, high_quality_rate, w2)."""
    from minidiff.data import toy_modes

    centers, std = toy_modes(name)
    stats = mode_stats(samples, centers, std)
    return {"modes_covered": stats["modes_covered"], "high_quality_rate": stats["high_quality_rate"],
            "w2": wasserstein_2d(samples, reference, generator=generator)}


def _subsample(x: torch.Tensor, m: int, generator) -> torch.Tensor:
    if len(x) == m:
        return x
    return x[torch.randperm(len(x), generator=generator)[:m]]


def wasserstein_2d(
    a, b, p: int = 2, max_points: int = 2000, generator: torch.Generator | None = None
) -> float:
    """Exact p-Wasserstein distance between two empirical 2-D point sets (p = 1 or 2).

    Both sets are randomly subsampled to m = min(len(a), len(b), max_points) points (with
    ``generator``); then W_p = (min over permutations sigma of mean_i |a_i - b_sigma(i)|^p)^(1/p),
    solved exactly by ``scipy.optimize.linear_sum_assignment`` (O(m^3): 2000 points take ~1 s).
    """
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}.")
    a, b = _points(a, "a"), _points(b, "b")
    m = min(len(a), len(b), max_points)
    a, b = _subsample(a, m, generator), _subsample(b, m, generator)
    cost = torch.cdist(a, b).numpy() ** p
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean() ** (1.0 / p))


def sliced_wasserstein(
    a, b, num_projections: int = 256, generator: torch.Generator | None = None, max_points: int = 10000
) -> float:
    """Sliced 2-Wasserstein distance: sqrt of the mean over random directions theta of W2^2 of the
    1-D projections (sorted samples matched in order). Sets are subsampled to equal size first.

    For a set and its copy shifted by d in 2-D, the exact value is |d| / sqrt(2).
    """
    a, b = _points(a, "a"), _points(b, "b")
    m = min(len(a), len(b), max_points)
    a, b = _subsample(a, m, generator), _subsample(b, m, generator)
    theta = torch.randn(2, num_projections, generator=generator).double()
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa, _ = (a @ theta).sort(dim=0)
    pb, _ = (b @ theta).sort(dim=0)
    return float(((pa - pb) ** 2).mean().sqrt())


# ----------------------------------------------------------------------------------------------
# A tiny classifier whose penultimate features replace Inception-v3
# ----------------------------------------------------------------------------------------------


class DigitClassifier(nn.Module):
    """Small CNN for 1-channel N x N images in [-1, 1] (digits 8 x 8 / 16 x 16, shapes, MNIST).

    conv(w) - conv(2w) - maxpool 2 - conv(2w) - adaptive average pool to 4 x 4 - linear(feature_dim)
    - ReLU (= ``features``, the penultimate layer) - linear(num_classes); ReLU after every conv.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16, feature_dim: int = 64):
        super().__init__()
        self.config = dict(
            num_classes=num_classes, in_channels=in_channels, width=width, feature_dim=feature_dim
        )
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * w * 16, feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(feature_dim, num_classes)

    def _check(self, x: torch.Tensor) -> None:
        c = self.config["in_channels"]
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] < 2 or x.shape[3] < 2:
            raise ValueError(
                f"DigitClassifier expects images (B, {c}, H, W) with H, W >= 2, got {tuple(x.shape)}."
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (B, feature_dim)."""
        self._check(x)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.features(x))


def cache_dir() -> Path:
    """Cache folder for trained classifiers: $MINIDIFF_CACHE, else ~/.cache/minidiff."""
    return Path(os.environ.get("MINIDIFF_CACHE") or Path.home() / ".cache" / "minidiff")


def _cache_key(images: torch.Tensor, labels: torch.Tensor, config: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True).encode())
    h.update(str(tuple(images.shape)).encode())
    h.update(images.detach().cpu().float().contiguous().numpy().tobytes())
    h.update(labels.detach().cpu().long().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 500,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    num_classes: int | None = None,
    width: int = 16,
    feature_dim: int = 64,
    cache: bool | str | Path = True,
    progress: bool = True,
    num_threads: int | None = 1,
) -> DigitClassifier:
    """Train a ``DigitClassifier`` with Adam (cosine learning-rate decay) and return it in eval mode.

    Deterministic on CPU for a given ``seed``. The weights are cached as safetensors (never
    pickle) in ``cache_dir()`` (or the folder given as ``cache``; ``cache=False`` disables it),
    under a key that hashes the images, labels and every setting, so a second call loads them.
    ``classifier.train_seconds`` holds the training time (0.0 when loaded from the cache);
    ``progress`` shows a tqdm bar while training.
    Training runs on the CPU with ``num_threads`` torch threads (restored afterwards): this tiny
    network trains fastest single-threaded; None keeps the current setting.
    """
    from safetensors.torch import load_file, save_file

    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}.")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"labels must be (N,) with N = {len(images)}, got shape {tuple(labels.shape)}.")
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps and batch_size must be positive, got {steps=}, {batch_size=}.")
    labels = labels.long()
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    arch = dict(num_classes=num_classes, in_channels=images.shape[1], width=width, feature_dim=feature_dim)
    config = dict(arch, steps=steps, seed=seed, batch_size=batch_size, lr=lr, version=1)

    path = None
    if cache is not False:
        folder = cache_dir() if cache is True else Path(cache)
        path = folder / f"classifier-{_cache_key(images, labels, config)}.safetensors"
        if path.exists():
            model = DigitClassifier(**arch)
            model.load_state_dict(load_file(str(path)))
            model.train_seconds = 0.0
            return model.eval()

    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        model = _fit(images, labels, arch, steps, seed, batch_size, lr, progress)
    finally:
        torch.set_num_threads(threads)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp), metadata={"config": json.dumps(config)})
        tmp.replace(path)
    return model


def _fit(images, labels, arch, steps, seed, batch_size, lr, progress) -> DigitClassifier:
    """Adam with cosine decay on cross-entropy; batches drawn with replacement from ``seed``."""
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(**arch)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    x_all, y_all = images.detach().cpu().float(), labels.cpu()
    model.train()
    bar = tqdm(range(steps), desc="classifier", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(len(x_all), (batch_size,), generator=gen)
        x = x_all[idx]
        # light augmentation: shift the batch by up to 1 pixel, filling with the background value -1
        shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
        x = torch.roll(F.pad(x, (1, 1, 1, 1), value=-1.0), shifts=shift, dims=(2, 3))[:, :, 1:-1, 1:-1]
        loss = F.cross_entropy(model(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    model.train_seconds = time.perf_counter() - start
    return model


def digit_classifier(size: int = 8, cache: bool | str | Path = True, **kwargs) -> DigitClassifier:
    """The book's feature network: ``train_classifier`` on ``data.digits(size, "train")`` (cached)."""
    from minidiff.data import digits

    x, y = digits(size, "train")
    return train_classifier(x, y, num_classes=10, cache=cache, **kwargs)


@torch.no_grad()
def features(classifier: DigitClassifier, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Penultimate-layer features (N, feature_dim) of ``images`` (N, C, H, W) in [-1, 1]."""
    was_training = classifier.training
    classifier.eval()
    dev = next(classifier.parameters()).device
    out = torch.cat([classifier.features(images[i : i + batch_size].to(dev).float()).cpu()
                     for i in range(0, len(images), batch_size)])  # fmt: skip
    classifier.train(was_training)
    return out


@torch.no_grad()
def classifier_accuracy(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` whose arg-max class equals ``labels``."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels.")
    was_training = classifier.training
    classifier.eval()
    dev = next(classifier.parameters()).device
    pred = torch.cat([classifier(images[i : i + 1000].to(dev).float()).argmax(1).cpu()
                      for i in range(0, len(images), 1000)])  # fmt: skip
    classifier.train(was_training)
    return float((pred == labels.cpu()).double().mean())


def frechet_distance(feat_a, feat_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, eq. (6)).

    d^2 = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)). The trace of the matrix
    square root is computed stably as the sum of sqrt of the eigenvalues of the symmetric PSD
    matrix S_a^(1/2) S_b S_a^(1/2) (same eigenvalues as S_a S_b), so no complex parts appear.
    """
    a = torch.as_tensor(feat_a).detach().cpu().double().numpy()
    b = torch.as_tensor(feat_b).detach().cpu().double().numpy()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) arrays with the same D, got {a.shape} and {b.shape}.")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 samples per set for a covariance, got {len(a)} and {len(b)}.")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = scipy.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_a @ s_b @ root_a
    eig = scipy.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    d2 = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean)
    return max(d2, 0.0)


def feature_distance(classifier: DigitClassifier, real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between classifier features of ``real`` and ``fake`` images ("digit FID").

    The value is biased upwards for small sets: compare numbers computed with the same number of
    fake images, and report it next to ``feature_distance_floor`` for that number.
    """
    return frechet_distance(features(classifier, real), features(classifier, fake))


def feature_distance_floor(
    classifier: DigitClassifier,
    n: int | None = None,
    size: int = 8,
    real: torch.Tensor | None = None,
    held_out: torch.Tensor | None = None,
) -> float:
    """The floor to report: feature distance of held-out real images vs the training images.

    A perfect generator samples like fresh real data, so it scores about this value, not 0 (the
    Frechet distance of two finite samples is biased upwards). Defaults: ``real`` = digits train
    split, ``held_out`` = digits test split (297 images), both at ``size``. ``n`` keeps the first
    n held-out images: use the same n as the number of generated images you compare.
    """
    from minidiff.data import digits

    if real is None:
        real = digits(size, "train")[0]
    if held_out is None:
        held_out = digits(size, "test")[0]
    if n is not None:
        if n < 2 or n > len(held_out):
            raise ValueError(f"n must be between 2 and {len(held_out)} (held-out images available), got {n}.")
        held_out = held_out[:n]
    return feature_distance(classifier, real, held_out)
