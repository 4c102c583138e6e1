"""Metrics: the toy and image yardsticks of the book's tables, and a feature-based FID.

Toys (:func:`toy_metrics`, chapter 1 §7 and chapter 4 §6): modes covered and high-quality rate
(DDGAN's), a precision-like score (the exact log-density of the known mixture), a balance score
(KL from uniform of the mode histogram) and an unbiased MMD that, unlike W2 on 1000 points, does
not reward blur. Images (:func:`image_metrics`): feature distance with its bootstrap noise,
k-NN precision and recall (Kynkaanniemi et al. 2019) and class coverage, each beside its floor.

The feature distance follows Heusel et al. 2017 (FID, eq. (6)): the Frechet distance between
Gaussians fitted to network features of real and generated images. Instead of Inception-v3 on
natural images we use a tiny CNN trained here on the digits (or shapes), so the numbers are
only comparable with each other, never with published FIDs.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .cache import cache_dir, load_or_build
from .train import LossStep, atomic_save_file
from .train import train as train_loop

__all__ = [
    "TOY_METRICS",
    "mode_stats",
    "toy_quality",
    "toy_metrics",
    "CONDITIONAL_TOY_METRICS",
    "conditional_toy_metrics",
    "mixture_log_density",
    "mmd2",
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
    "knn_precision_recall",
    "predicted_classes",
    "class_kl",
    "frechet_distance_sd",
    "image_metrics",
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


CONDITIONAL_TOY_METRICS = {"class_accuracy": "higher", "high_quality_rate": "higher",
                           "modes_in_class": "higher", "within_class_kl": "lower"}


def conditional_toy_metrics(samples, labels, centers, classes, std: float, num_std: float = 3.0) -> dict:
    """Fidelity and diversity of class-conditional samples on a labelled mixture toy (Chapter 6 §3), with
    a sample counted at its nearest centre as in :func:`mode_stats`:

    - ``class_accuracy``: the share of samples whose nearest centre belongs to the asked-for class
      (fidelity; the exact conditional model scores about 1);
    - ``high_quality_rate``: the share within ``num_std`` std of their nearest centre;
    - ``modes_in_class``: the mean over classes of how many of the class's modes get at least 10% of
      the class's fair share of its high-quality, right-class samples (diversity);
    - ``within_class_kl``: the mean over classes of KL(histogram over the class's modes || uniform)
      (0 = the class's modes evenly filled, log(modes per class) = one mode only).

    labels: (N,) the class each sample was asked for; classes: (K,) the class of each centre.
    """
    x = _points(samples, "samples")
    c = _points(centers, "centers")
    labels = torch.as_tensor(labels).long().reshape(-1).cpu()
    classes = torch.as_tensor(classes).long().reshape(-1).cpu()
    if labels.shape != (len(x),) or classes.shape != (len(c),):
        raise ValueError(f"labels must be (N,) = ({len(x)},) and classes (K,) = ({len(c)},); got "
                         f"{tuple(labels.shape)} and {tuple(classes.shape)}.")
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std!r}.")
    dist, nearest = torch.cdist(x, c).min(dim=1)
    right = classes[nearest] == labels
    hq = dist <= num_std * std
    covered, kls = [], []
    for y in torch.unique(labels).tolist():
        modes = torch.nonzero(classes == y).flatten()
        if len(modes) == 0:
            raise ValueError(f"label {y} is the class of no centre.")
        mine = (labels == y) & right & hq
        counts = torch.stack([(mine & (nearest == m)).sum() for m in modes]).double()
        fair = (labels == y).sum().double() / len(modes)
        covered.append(float((counts >= torch.clamp(0.1 * fair, min=1)).sum()))
        p = counts / counts.sum().clamp(min=1)
        kls.append(float((p * (p * len(modes)).clamp(min=1e-300).log()).sum()) if counts.sum() > 0
                   else math.log(len(modes)))
    return {"class_accuracy": float(right.double().mean()), "high_quality_rate": float(hq.double().mean()),
            "modes_in_class": sum(covered) / len(covered), "within_class_kl": sum(kls) / len(kls)}


def toy_quality(samples, reference, name: str = "25gaussians", generator: torch.Generator | None = None
                ) -> dict:
    """The toy-data row of the book's tables: modes covered and high-quality rate (:func:`mode_stats`
    with the data set's own centres and std) and W2 to a `reference` set of fresh data points.
    Returns dict(modes_covered, high_quality_rate, w2).

    Kept for the stored tables of chapters 1-5. W2 on 1000 points rewards blur and cannot tell a
    uniform smear from data: new tables use :func:`toy_metrics`."""
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
# The toy yardstick of every table (chapter 1 §7, chapter 4 §6): quality and diversity
# ----------------------------------------------------------------------------------------------

TOY_METRICS = {
    "modes_covered": "higher",
    "high_quality_rate": "higher",
    "log_density_gap": "lower",
    "mode_kl": "lower",
    "mmd2": "lower",
}
"""The metrics a toy table reports (keys of :func:`toy_metrics`) and which direction is better."""


def mixture_log_density(samples, centers, std: float) -> torch.Tensor:
    """log p(x) of each sample under the equal-weight mixture (1/K) sum_k N(c_k, std^2 I), (N,) float64.

    The exact density of the toy data (``data.toy_modes``), computed by
    ``analytic.mixture_log_prob`` (a log-sum-exp over the K components).
    """
    from minidiff.analytic import mixture_log_prob

    x, c = _points(samples, "samples"), _points(centers, "centers")
    if not std > 0:
        raise ValueError(f"std must be > 0 (the standard deviation of each mode), got {std!r}.")
    k = len(c)
    weights = torch.full((1, k), 1.0 / k, dtype=torch.float64)
    var = torch.tensor([float(std) ** 2], dtype=torch.float64)
    return mixture_log_prob(x[:, None, :], weights, c[None], var)[:, 0]


def mmd2(a, b, bandwidth: float, block: int = 2048) -> float:
    """Unbiased squared maximum mean discrepancy MMD^2_u with a normalised Gaussian kernel.

    Gretton et al. 2012 (JMLR, "A Kernel Two-Sample Test", Lemma 6):
    MMD^2_u = sum_{i != j} k(a_i, a_j) / (m (m-1)) + sum_{i != j} k(b_i, b_j) / (n (n-1))
    - 2 sum_{i,j} k(a_i, b_j) / (m n), with k(x, y) = N(x - y; 0, h^2 I) (h = ``bandwidth``).
    With this kernel MMD^2 = ||p * N(0, h^2/2 I) - q * N(0, h^2/2 I)||^2 in L2: the squared distance
    between the two densities smoothed at scale h / sqrt(2). The estimate is unbiased, so two sets
    from the same distribution score 0 on average (it can come out slightly negative), and added
    blur always costs (unlike W2 on 1000 points). Exact for any sizes (blocks of ``block`` rows).
    """
    a, b = _points(a, "a"), _points(b, "b")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"mmd2 needs at least 2 points per set, got {len(a)} and {len(b)}.")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0 (the kernel's length scale, e.g. the mode std), "
                         f"got {bandwidth!r}.")
    h2 = float(bandwidth) ** 2
    norm = (2 * math.pi * h2) ** (a.shape[1] / 2)

    def kernel_sum(x, y):
        return sum(float(torch.exp(-torch.cdist(x[i : i + block], y) ** 2 / (2 * h2)).sum())
                   for i in range(0, len(x), block)) / norm  # fmt: skip

    m, n = len(a), len(b)
    diag = 1.0 / norm  # k(x, x)
    kaa = (kernel_sum(a, a) - m * diag) / (m * (m - 1))
    kbb = (kernel_sum(b, b) - n * diag) / (n * (n - 1))
    return kaa + kbb - 2 * kernel_sum(a, b) / (m * n)


def _data_log_density(k: int, std: float, clip: float | None) -> float:
    """E_data[max(log p(x), floor)] for K well-separated equal modes N(c_k, std^2 I) in 2-D.

    Near its own mode log p = -log K - log(2 pi std^2) - u with u = |x - c|^2 / (2 std^2) ~ Exp(1), so
    E[log p] = -log K - log(2 pi std^2) - 1, and with the floor at u = a = clip^2 / 2 the last term is
    E[min(u, a)] = 1 - exp(-a). The neighbours' tails change it by < 1e-4 for the book's toys.
    """
    tail = 1.0 if clip is None else 1.0 - math.exp(-(clip**2) / 2)
    return -math.log(k) - math.log(2 * math.pi * std**2) - tail


def toy_metrics(samples, reference=None, name: str = "25gaussians", *, bandwidth: float | None = None,
                clip_std: float | None = 6.0, generator: torch.Generator | None = None) -> dict:
    """Every metric of a toy table (chapter 1 §7, chapter 4 §6): quality and diversity, blur-aware.

    On a mixture toy (``data.toy_modes(name)``: K centres, mode std s), for N samples:

    - ``modes_covered``, ``high_quality_rate``: the DDGAN table's (Xiao et al. 2022), see
      :func:`mode_stats` (a sample is high quality within 3 s of its nearest centre).
    - ``log_density``: the precision-like score, the mean over samples of the exact log-density of
      the mixture, max(log p(x), floor), with the floor at ``clip_std`` (6) standard deviations
      from a lone mode so that a few stray samples cannot dominate (None: no floor).
      ``log_density_gap`` = E_data[...] - log_density: 0 for samples like fresh data (seed sd about
      0.05 at N = 1000), about b^2 / s^2 for data blurred by N(0, b^2) (0.64 at b = 0.04). E_data is
      computed in closed form for well-separated modes. It cannot see collapse: samples from one
      mode have the data's density.
    - ``mode_kl``: the balance (recall) score, KL(h || uniform) = log K - H(h) in nats of the
      histogram h of high-quality samples over their nearest modes (``mode_stats``' counts);
      0 for a perfectly even spread, log(25/20) = 0.22 with 5 of 25 modes missing, log K for
      collapse (or no high-quality sample). Its bias for fresh data is about (K-1)/(2 N_hq) (0.012).
    - ``mmd2``: :func:`mmd2` to ``reference`` (fresh data; drawn with ``generator``, as many points as
      samples, when None) with ``bandwidth`` = s by default. It replaces W2, which at N = 1000 rates
      data blurred by N(0, 0.08^2) better than fresh data and a uniform smear as good as data.

    :data:`TOY_METRICS` lists the keys a table reports and their better direction. Compare rows that
    use the same ``reference`` and the same seeds (``evaluation.over_seeds``).
    """
    from minidiff.data import toy_dataset, toy_modes

    centers, std = toy_modes(name)
    x = _points(samples, "samples")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("samples contain NaN or inf; a diverged sampler cannot be scored (check its steps).")
    if len(x) < 2:
        raise ValueError(f"toy_metrics needs at least 2 samples, got {len(x)}.")
    if clip_std is not None and not clip_std > 0:
        raise ValueError(f"clip_std must be > 0 (in mode standard deviations) or None, got {clip_std!r}.")
    if reference is None:
        reference = toy_dataset(name, len(x), generator=generator)
    stats = mode_stats(x, centers, std)
    k = len(centers)

    logp = mixture_log_density(x, centers, std)
    if clip_std is not None:
        floor = -math.log(k) - math.log(2 * math.pi * std**2) - clip_std**2 / 2
        logp = logp.clamp(min=floor)
    log_density = float(logp.mean())

    counts = torch.tensor(stats["counts"], dtype=torch.float64)
    if counts.sum() > 0:
        h = counts / counts.sum()
        h = h[h > 0]
        mode_kl = float(math.log(k) + (h * h.log()).sum())
    else:
        mode_kl = math.log(k)

    return {
        "modes_covered": stats["modes_covered"],
        "high_quality_rate": stats["high_quality_rate"],
        "log_density": log_density,
        "log_density_gap": _data_log_density(k, std, clip_std) - log_density,
        "mode_kl": mode_kl,
        "mmd2": mmd2(x, reference, std if bandwidth is None else bandwidth),
    }


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
    from safetensors.torch import load_file

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

    def load(path: Path) -> DigitClassifier:
        model = DigitClassifier(**arch)
        model.load_state_dict(load_file(str(path)))
        model.train_seconds = 0.0
        return model.eval()

    def build(path: Path | None) -> DigitClassifier:
        threads = torch.get_num_threads()
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        try:
            model = _fit(images, labels, arch, steps, seed, batch_size, lr, progress)
        finally:
            torch.set_num_threads(threads)
        if path is not None:
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            atomic_save_file(state, path, metadata={"config": json.dumps(config)})
        return model

    if cache is False:
        return build(None)
    folder = cache_dir() if cache is True else Path(cache)
    return load_or_build(folder / f"classifier-{_cache_key(images, labels, config)}.safetensors", load, build)


def _shifted_batches(images: torch.Tensor, labels: torch.Tensor):
    """batch(batch_size, generator) for the training loop: images drawn with replacement, the whole batch
    shifted by up to 1 pixel (light augmentation), the border filled with the background value -1."""

    def batch(batch_size: int, generator: torch.Generator):
        idx = torch.randint(len(images), (batch_size,), generator=generator)
        shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
        padded = F.pad(images[idx], (1, 1, 1, 1), value=-1.0)
        return torch.roll(padded, shifts=shift, dims=(2, 3))[:, :, 1:-1, 1:-1], labels[idx]

    return batch


def _fit(images, labels, arch, steps, seed, batch_size, lr, progress) -> DigitClassifier:
    """Cross-entropy with Adam and a cosine learning-rate decay, through the one training loop
    (``train.train`` with ``optimizer=Adam``, no warm-up, no clipping, no EMA)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(**arch)

    def cross_entropy(net, batch, generator):
        x, y = batch
        return F.cross_entropy(net(x), y)

    step = LossStep(model, cross_entropy, lr=lr, warmup=0, grad_clip=None, optimizer=torch.optim.Adam,
                    lr_factor=lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    step.description = "classifier"
    data = _shifted_batches(images.detach().cpu().float(), labels.cpu())
    result = train_loop(model, None, data, steps, batch_size=batch_size, ema_decay=0.0, seed=seed,
                        progress=progress, step=step)
    model = result.model.eval()
    model.train_seconds = result.seconds
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


# ----------------------------------------------------------------------------------------------
# The image yardstick (chapter 1 §7): precision / recall in feature space, class coverage, noise
# ----------------------------------------------------------------------------------------------


def _features_2d(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array of features, got shape {tuple(x.shape)}.")
    return x


def _in_manifold(query: torch.Tensor, ref: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """f(phi, Phi) of Kynkaanniemi et al. 2019 for each query row: inside some ball of ``ref``."""
    # radius of each reference point: distance to its k-th nearest neighbour in ref (itself is the 0th)
    radii = torch.cat([torch.cdist(ref[i : i + block], ref).kthvalue(k + 1, dim=1).values
                       for i in range(0, len(ref), block)])  # fmt: skip
    return torch.cat([(torch.cdist(query[i : i + block], ref) <= radii).any(dim=1)
                      for i in range(0, len(query), block)])  # fmt: skip


def knn_precision_recall(real_features, fake_features, k: int = 3, block: int = 1024) -> dict:
    """Improved precision and recall with k-nearest-neighbour manifolds (Kynkaanniemi et al. 2019, Sec. 2).

    Each set's manifold is the union of balls around its points, of radius the distance to the
    point's k-th nearest neighbour within its own set (eq. (1): f(phi, Phi) = 1 when phi falls in
    one of them). precision = mean over fake points of f(fake, real) (how many samples look real);
    recall = mean over real points of f(real, fake) (how much of the real data the samples cover)
    (eq. (2)). Both lie in [0, 1]. They depend on both set sizes (larger sets, smaller balls):
    compare only at the same sizes, next to the floor of real data against real data
    (:func:`image_metrics`). Returns dict(precision, recall).
    """
    real, fake = _features_2d(real_features, "real_features"), _features_2d(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features must have the same D, "
                         f"got {real.shape[1]} and {fake.shape[1]}.")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer (the paper uses 3), got {k!r}.")
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"each set needs more than k = {k} points for its k-NN radii, "
                         f"got {len(real)} real and {len(fake)} fake.")
    return {
        "precision": float(_in_manifold(fake, real, k, block).double().mean()),
        "recall": float(_in_manifold(real, fake, k, block).double().mean()),
    }


@torch.no_grad()
def predicted_classes(classifier: DigitClassifier, images: torch.Tensor,
                      batch_size: int = 1000) -> torch.Tensor:
    """Arg-max class (N,) long of the classifier for ``images`` (N, C, H, W)."""
    was_training = classifier.training
    classifier.eval()
    dev = next(classifier.parameters()).device
    pred = torch.cat([classifier(images[i : i + batch_size].to(dev).float()).argmax(1).cpu()
                      for i in range(0, len(images), batch_size)])  # fmt: skip
    classifier.train(was_training)
    return pred


def class_kl(predicted, num_classes: int) -> float:
    """KL(h || uniform) = log C - H(h), in nats, of the histogram h of predicted classes.

    The image analogue of the toys' ``mode_kl`` (chapter 1 §7): 0 when the samples spread evenly
    over the C classes, log C when they all fall in one class. Finite sets are biased upwards by
    about (C - 1) / (2 N), and the data's own classes are not exactly even: compare with the floor
    of real images at the same N (:func:`image_metrics`).
    """
    pred = torch.as_tensor(predicted).detach().cpu().long()
    if pred.ndim != 1 or len(pred) == 0:
        raise ValueError(f"predicted must be a non-empty (N,) tensor of class indices, "
                         f"got shape {tuple(pred.shape)}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    if int(pred.min()) < 0 or int(pred.max()) >= num_classes:
        raise ValueError(f"class indices must lie in 0..{num_classes - 1}, "
                         f"got {int(pred.min())}..{int(pred.max())}.")
    h = torch.bincount(pred, minlength=num_classes).double() / len(pred)
    h = h[h > 0]
    return float(math.log(num_classes) + (h * h.log()).sum())


def frechet_distance_sd(feat_real, feat_fake, num_bootstrap: int = 20,
                        generator: torch.Generator | None = None) -> float:
    """Sampling noise of :func:`frechet_distance`: its sd over bootstrap resamples of the fake set.

    The fake features are resampled with replacement ``num_bootstrap`` times (with ``generator``),
    the real (reference) set is kept, as it is shared by every row of a table. Report it beside a
    feature distance computed on fewer than 1000 samples: a difference between two rows smaller
    than about twice this is noise.
    """
    real, fake = _features_2d(feat_real, "feat_real"), _features_2d(feat_fake, "feat_fake")
    if isinstance(num_bootstrap, bool) or not isinstance(num_bootstrap, int) or num_bootstrap < 2:
        raise ValueError(f"num_bootstrap must be an integer >= 2, got {num_bootstrap!r}.")
    values = [frechet_distance(real, fake[torch.randint(len(fake), (len(fake),), generator=generator)])
              for _ in range(num_bootstrap)]  # fmt: skip
    return float(np.std(values, ddof=1))


def image_metrics(classifier: DigitClassifier, samples: torch.Tensor, real_train: torch.Tensor | None = None,
                  held_out: torch.Tensor | None = None, *, labels: torch.Tensor | None = None, k: int = 3,
                  num_bootstrap: int = 20, generator: torch.Generator | None = None) -> dict:
    """Every metric of an image table (chapter 1 §7), each beside its floor, in ``classifier``'s features.

    All are measured against ``held_out`` real images (default: the digits test split, 297 images),
    which the generator never saw. The floor of each is what a perfect sampler would score with
    the same number n of samples: the first n_floor = min(n, len(real_train)) ``real_train``
    images (default: the digits train split, 1500) scored in place of the samples. With digits,
    n above 1500 has no floor at the same n (``floor_n`` says which n was used).

    - ``fd``: :func:`frechet_distance` (Heusel et al. 2017, eq. (6)) of held-out vs sample
      features, ``fd_sd`` its bootstrap sd (:func:`frechet_distance_sd`), ``fd_floor``.
      This is not :func:`feature_distance` (against the train split): the floor now exists at n.
    - ``precision``, ``recall``: :func:`knn_precision_recall` with k-NN manifolds (k = 3), and floors.
    - ``class_kl``: :func:`class_kl` of the classifier's predicted classes (class coverage), and floor.
    - ``accuracy`` (when ``labels`` are given, for a conditional model): :func:`classifier_accuracy`.
    - ``n``, ``floor_n``: the sample count and the count used for the floors.

    With only 297 held-out images the k-NN balls of the real manifold are wide, so precision reads
    high and recall depends strongly on n: compare rows at the same n, against the floors.
    """
    from minidiff.data import digits

    if samples.ndim != 4:
        raise ValueError(f"samples must be images (N, C, H, W), got shape {tuple(samples.shape)}.")
    if not bool(torch.isfinite(samples).all()):
        raise ValueError("samples contain NaN or inf; a diverged sampler cannot be scored.")
    size = samples.shape[-1]
    if real_train is None or held_out is None:
        if size not in (8, 16) or samples.shape[1] != 1:
            raise ValueError(f"defaults are the digits splits (1 x 8 x 8 or 1 x 16 x 16); for samples "
                             f"of shape {tuple(samples.shape[1:])} pass real_train and held_out.")
        real_train = digits(size, "train")[0] if real_train is None else real_train
        held_out = digits(size, "test")[0] if held_out is None else held_out
    for what, imgs in (("real_train", real_train), ("held_out", held_out)):
        if imgs.shape[1:] != samples.shape[1:]:
            raise ValueError(f"{what} images {tuple(imgs.shape[1:])} must match the samples "
                             f"{tuple(samples.shape[1:])}.")
    n = len(samples)
    n_floor = min(n, len(real_train))
    num_classes = classifier.config["num_classes"]
    f_held, f_fake, f_perfect = (features(classifier, x) for x in (held_out, samples, real_train[:n_floor]))
    pr, pr_floor = knn_precision_recall(f_held, f_fake, k), knn_precision_recall(f_held, f_perfect, k)
    out = {
        "fd": frechet_distance(f_held, f_fake),
        "fd_sd": frechet_distance_sd(f_held, f_fake, num_bootstrap, generator=generator),
        "fd_floor": frechet_distance(f_held, f_perfect),
        "precision": pr["precision"],
        "precision_floor": pr_floor["precision"],
        "recall": pr["recall"],
        "recall_floor": pr_floor["recall"],
        "class_kl": class_kl(predicted_classes(classifier, samples), num_classes),
        "class_kl_floor": class_kl(predicted_classes(classifier, real_train[:n_floor]), num_classes),
        "n": n,
        "floor_n": n_floor,
    }
    if labels is not None:
        out["accuracy"] = classifier_accuracy(classifier, samples, labels)
    return out
