"""Data sets for the book: 2-D toys, digits, generated shapes, photo crops, and Colab loaders.

Everything returns float tensors in [-1, 1] (images NCHW, toy data N x 2) and works offline:
the toys and shapes are generated, digits come from scikit-learn and the photos from
scikit-image (both bundled with the packages). ``mnist`` and ``cifar10`` only read files that
you downloaded yourself (for example in Colab); nothing here downloads anything.
"""

from __future__ import annotations

import functools
import gzip
import math
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "TWENTY_FIVE_GAUSSIANS_STD",
    "EIGHT_GAUSSIANS_STD",
    "TOY_DATASETS",
    "SHAPE_CLASSES",
    "PHOTOS",
    "twenty_five_gaussians",
    "twenty_five_gaussians_centers",
    "twenty_five_gaussians_rows",
    "twenty_five_gaussians_with_rows",
    "eight_gaussians",
    "eight_gaussians_centers",
    "swiss_roll",
    "two_moons",
    "toy_dataset",
    "toy_modes",
    "digits",
    "shapes",
    "photo",
    "photo_crops",
    "mnist",
    "cifar10",
]


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise ValueError(f"n must be a positive integer (the number of samples to draw), got {n!r}.")
    return int(n)


# ----------------------------------------------------------------------------------------------
# 2-D toy data
# ----------------------------------------------------------------------------------------------

TWENTY_FIVE_GAUSSIANS_STD = 0.05
"""Standard deviation of each of the 25 Gaussians, in the scaled coordinates."""

EIGHT_GAUSSIANS_STD = 0.05
"""Standard deviation of each of the 8 Gaussians on the ring."""


def twenty_five_gaussians_centers() -> torch.Tensor:
    """The 25 mode centres, shape (25, 2): the grid {-2,-1,0,1,2}^2 divided by 2.828.

    Row-major order: centre ``5 * (i + 2) + (j + 2)`` is ``(i, j) / 2.828``. The 25-Gaussians toy
    of Xiao et al. 2022 (DDGAN, Appendix, mode-coverage table); DDGAN released no code for it.
    Note: the widely copied GAN code (Azadi et al. 2019, DRS) uses the grid 2 * {-2..2}, adds the
    std 0.05 noise and then divides by 2.828 (centres up to 1.41, std 0.018); here the grid is
    {-2..2} / 2.828 and std 0.05 is applied after scaling (spacing / std = 7.1).
    """
    g = torch.arange(-2, 3, dtype=torch.float32)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1) / 2.828


def _mixture(centers: torch.Tensor, n: int, std: float, generator) -> torch.Tensor:
    n = _check_n(n)
    if not std >= 0:
        raise ValueError(f"std must be >= 0, got {std!r}.")
    idx = torch.randint(len(centers), (n,), generator=generator)
    return centers[idx] + std * torch.randn(n, 2, generator=generator)


def twenty_five_gaussians(
    n: int, generator: torch.Generator | None = None, std: float = TWENTY_FIVE_GAUSSIANS_STD
) -> torch.Tensor:
    """n points (n, 2) from the 25-Gaussians mixture (Xiao et al. 2022, DDGAN, Appendix).

    Equal-weight mixture of N(c_k, std^2 I) over ``twenty_five_gaussians_centers()``; std is
    applied after the division by 2.828. Points lie in about [-0.9, 0.9].
    """
    return _mixture(twenty_five_gaussians_centers(), n, std, generator)


def twenty_five_gaussians_rows() -> torch.Tensor:
    """The class of each of the 25 centres when the classes are the grid's 5 rows (Chapter 6): centre
    ``5 * (i + 2) + (j + 2)`` at height j / 2.828 is in row j + 2, so the labels are ``arange(25) % 5``
    (row 0 at the bottom, y = -0.71; row 4 at the top)."""
    return torch.arange(25) % 5


def twenty_five_gaussians_with_rows(
    n: int, generator: torch.Generator | None = None, std: float = TWENTY_FIVE_GAUSSIANS_STD
) -> tuple[torch.Tensor, torch.Tensor]:
    """(points (n, 2), row labels (n,)): the points of :func:`twenty_five_gaussians` with the same
    generator, bit for bit, and the row (0..4) of the component each point was drawn from."""
    n = _check_n(n)
    centers = twenty_five_gaussians_centers()
    idx = torch.randint(len(centers), (n,), generator=generator)
    points = centers[idx] + std * torch.randn(n, 2, generator=generator)
    return points, twenty_five_gaussians_rows()[idx]


def eight_gaussians_centers(radius: float = 0.8) -> torch.Tensor:
    """The 8 centres (8, 2) equally spaced on a circle of the given radius, starting at angle 0."""
    angles = torch.arange(8, dtype=torch.float32) * (2 * math.pi / 8)
    return radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)


def eight_gaussians(
    n: int, generator: torch.Generator | None = None, std: float = EIGHT_GAUSSIANS_STD
) -> torch.Tensor:
    """n points (n, 2) from 8 Gaussians on a ring of radius 0.8 (the classic GAN mode-collapse toy)."""
    return _mixture(eight_gaussians_centers(), n, std, generator)


def swiss_roll(n: int, generator: torch.Generator | None = None, noise: float = 0.02) -> torch.Tensor:
    """n points (n, 2) on a 2-D Swiss roll, scaled into [-1, 1] (Sohl-Dickstein et al. 2015 toy).

    The curve is (t cos t, t sin t) for t ~ U[1.5 pi, 4.5 pi], divided by 4.5 pi; then Gaussian
    noise of standard deviation ``noise`` (in the scaled units) is added.
    """
    n = _check_n(n)
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / (4.5 * math.pi)
    return x + noise * torch.randn(n, 2, generator=generator)


def two_moons(n: int, generator: torch.Generator | None = None, noise: float = 0.05) -> torch.Tensor:
    """n points (n, 2) on two interleaved half circles, centred and scaled into about [-1, 1]."""
    n = _check_n(n)
    upper = torch.rand(n, generator=generator) < 0.5
    theta = math.pi * torch.rand(n, generator=generator)
    x = torch.where(upper, torch.cos(theta), 1 - torch.cos(theta))
    y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
    pts = torch.stack([(x - 0.5) / 1.5, (y - 0.25) / 1.5], dim=1)
    return pts + noise * torch.randn(n, 2, generator=generator)


TOY_DATASETS = {
    "25gaussians": twenty_five_gaussians,
    "8gaussians": eight_gaussians,
    "swiss_roll": swiss_roll,
    "two_moons": two_moons,
}
"""Name -> sampler ``f(n, generator=None)`` for ``toy_dataset``."""

_TOY_ALIASES = {
    "twenty_five_gaussians": "25gaussians",
    "25_gaussians": "25gaussians",
    "eight_gaussians": "8gaussians",
    "8_gaussians": "8gaussians",
    "swissroll": "swiss_roll",
    "moons": "two_moons",
}


def _toy_name(name: str) -> str:
    key = _TOY_ALIASES.get(name, name)
    if key not in TOY_DATASETS:
        raise ValueError(
            f"Unknown toy data set {name!r}. Use one of {sorted(TOY_DATASETS)} "
            f"(aliases: {sorted(_TOY_ALIASES)})."
        )
    return key


def toy_dataset(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n points (n, 2) from the named 2-D toy data set (see ``TOY_DATASETS``)."""
    return TOY_DATASETS[_toy_name(name)](n, generator=generator)


def toy_modes(name: str) -> tuple[torch.Tensor, float]:
    """(centers, std) of a mixture toy, for ``minidiff.metrics.mode_stats``.

    Only the Gaussian mixtures ("25gaussians", "8gaussians") have modes; others -> ValueError.
    """
    key = _toy_name(name)
    if key == "25gaussians":
        return twenty_five_gaussians_centers(), TWENTY_FIVE_GAUSSIANS_STD
    if key == "8gaussians":
        return eight_gaussians_centers(), EIGHT_GAUSSIANS_STD
    raise ValueError(f"Toy data set {name!r} has no discrete modes; use '25gaussians' or '8gaussians'.")


# ----------------------------------------------------------------------------------------------
# Digits (scikit-learn, 1797 images of 8 x 8)
# ----------------------------------------------------------------------------------------------

DIGITS_TRAIN_SIZE = 1500
"""Images in the train split of ``digits``; the remaining 297 form the test split."""


@functools.lru_cache(maxsize=1)
def _load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def digits(size: int = 8, split: str = "train", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits as (images (N, 1, size, size) in [-1, 1], labels (N,) long).

    The 8 x 8 grey values 0..16 are mapped linearly to [-1, 1]; ``size=16`` upsamples them
    bilinearly. A fixed permutation (``torch.randperm`` seeded with ``seed``) splits the 1797
    images into 1500 "train" and 297 "test"; "all" returns every image in the original order.
    """
    if size not in (8, 16):
        raise ValueError(f"digits size must be 8 (native) or 16 (bilinear upsampling), got {size!r}.")
    if split not in ("train", "test", "all"):
        raise ValueError(f"digits split must be 'train', 'test' or 'all', got {split!r}.")
    images, labels = _load_digits_arrays()
    x = torch.from_numpy(images).unsqueeze(1) / 8.0 - 1.0
    y = torch.from_numpy(labels).clone()
    if split != "all":
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        idx = perm[:DIGITS_TRAIN_SIZE] if split == "train" else perm[DIGITS_TRAIN_SIZE:]
        x, y = x[idx], y[idx]
    if size == 16:
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
    return x.contiguous(), y


# ----------------------------------------------------------------------------------------------
# Generated shapes
# ----------------------------------------------------------------------------------------------

SHAPE_CLASSES = ("circle", "square", "triangle", "cross")
"""Label k of ``shapes`` is the shape ``SHAPE_CLASSES[k]``."""


def _shape_masks(u: torch.Tensor, v: torch.Tensor, r: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Inside-masks of each shape in its own rotated frame (u, v); r is the outer radius."""
    circle = u**2 + v**2 <= r**2
    half = 0.7 * r
    square = (u.abs() <= half) & (v.abs() <= half)
    # Equilateral triangle with circumradius r (inradius r / 2): inside all three half-planes.
    tri = torch.ones_like(circle)
    for k in range(3):
        a = math.pi / 2 + k * 2 * math.pi / 3
        tri &= -(u * math.cos(a) + v * math.sin(a)) <= r / 2
    w = 0.3 * r
    cross = ((u.abs() <= r) & (v.abs() <= w)) | ((u.abs() <= w) & (v.abs() <= r))
    masks = torch.stack([circle, square, tri, cross], dim=0)  # (4, n, H, W)
    return masks.gather(0, labels.view(1, -1, 1, 1).expand(1, *circle.shape)).squeeze(0)


def shapes(
    n: int,
    resolution: int = 16,
    generator: torch.Generator | None = None,
    supersample: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """n labelled shapes: (images (n, 1, R, R) in [-1, 1], labels (n,) long).

    White shapes (``SHAPE_CLASSES``: circle, square, triangle, cross) on black, with random
    class, position, size and rotation; anti-aliased by averaging ``supersample``^2 sub-pixels.
    """
    n = _check_n(n)
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an integer >= 8, got {resolution!r}.")
    labels = torch.randint(len(SHAPE_CLASSES), (n,), generator=generator)
    r = 0.3 + 0.35 * torch.rand(n, generator=generator)
    center = (2 * torch.rand(n, 2, generator=generator) - 1) * (0.95 - r).unsqueeze(1)
    angle = 2 * math.pi * torch.rand(n, generator=generator)

    s = resolution * supersample
    grid = (torch.arange(s, dtype=torch.float32) + 0.5) / s * 2 - 1  # sub-pixel centres in [-1, 1]
    out = torch.empty(n, 1, resolution, resolution)
    chunk = max(1, 2**22 // (s * s))
    for i in range(0, n, chunk):
        sl = slice(i, i + chunk)
        cx, cy = center[sl, 0].view(-1, 1, 1), center[sl, 1].view(-1, 1, 1)
        cos, sin = torch.cos(angle[sl]).view(-1, 1, 1), torch.sin(angle[sl]).view(-1, 1, 1)
        px = grid.view(1, 1, s) - cx  # x along columns
        py = -grid.view(1, s, 1) - cy  # image rows go down, y goes up
        u, v = cos * px + sin * py, -sin * px + cos * py
        mask = _shape_masks(u, v, r[sl].view(-1, 1, 1), labels[sl]).float().unsqueeze(1)
        out[sl] = F.avg_pool2d(mask, supersample) * 2 - 1
    return out, labels


# ----------------------------------------------------------------------------------------------
# Photos and textures bundled with scikit-image
# ----------------------------------------------------------------------------------------------

PHOTOS = {
    "astronaut": "astronaut",
    "coffee": "coffee",
    "chelsea": "chelsea",
    "rocket": "rocket",
    "hubble_deep_field": "hubble_deep_field",
    "retina": "retina",
    "colorwheel": "colorwheel",
    "immunohistochemistry": "immunohistochemistry",
    "camera": "camera",
    "brick": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "moon": "moon",
}
"""Names accepted by ``photo`` / ``photo_crops`` (all bundled with scikit-image, no download)."""


@functools.lru_cache(maxsize=16)
def _load_photo(name: str) -> torch.Tensor:
    import skimage.data

    arr = np.asarray(getattr(skimage.data, PHOTOS[name])())
    if arr.ndim == 2:
        arr = arr[:, :, None]
    arr = arr[:, :, :3].astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _photo_tensor(name: str, grayscale: bool) -> torch.Tensor:
    if name not in PHOTOS:
        raise ValueError(f"Unknown photo {name!r}. Use one of {sorted(PHOTOS)} (bundled with scikit-image).")
    img = _load_photo(name)
    if grayscale:
        if img.shape[0] == 3:  # ITU-R BT.601 luma
            w = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
            img = (img * w).sum(0, keepdim=True)
        return img
    return img.expand(3, -1, -1) if img.shape[0] == 1 else img


def photo(name: str, size: int | None = None, grayscale: bool = False) -> torch.Tensor:
    """One bundled photo as a (C, H, W) tensor in [-1, 1]; C = 1 if grayscale else 3.

    With ``size``, the largest centred square is cropped and resized (antialiased) to size x size.
    """
    img = _photo_tensor(name, grayscale)
    if size is None:
        return img.clone()
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive integer or None, got {size!r}.")
    _, h, w = img.shape
    m = min(h, w)
    top, left = (h - m) // 2, (w - m) // 2
    sq = img[:, top : top + m, left : left + m].unsqueeze(0)
    out = F.interpolate(sq, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.squeeze(0).clamp(-1.0, 1.0)


def photo_crops(
    n: int,
    size: int = 32,
    images: tuple[str, ...] | list[str] = ("astronaut", "coffee", "chelsea"),
    grayscale: bool = False,
    generator: torch.Generator | None = None,
    downscale: int = 1,
) -> torch.Tensor:
    """n random size x size crops (n, C, size, size) in [-1, 1] of bundled scikit-image photos.

    Each crop picks one of ``images`` uniformly, then a uniform position. ``downscale`` > 1 first
    shrinks every photo by that integer factor (average pooling), so a crop shows more content.
    Grey textures (camera, brick, grass, gravel) are repeated to 3 channels unless ``grayscale``.
    """
    n = _check_n(n)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive integer, got {size!r}.")
    if isinstance(images, str):
        images = (images,)
    if len(images) == 0:
        raise ValueError(f"images must name at least one photo from {sorted(PHOTOS)}.")
    if not isinstance(downscale, int) or downscale < 1:
        raise ValueError(f"downscale must be an integer >= 1, got {downscale!r}.")
    pics = []
    for name in images:
        img = _photo_tensor(name, grayscale)
        if downscale > 1:
            img = F.avg_pool2d(img.unsqueeze(0), downscale).squeeze(0)
        if min(img.shape[1:]) < size:
            raise ValueError(
                f"Photo {name!r} is {tuple(img.shape[1:])} after downscale={downscale}, smaller than the "
                f"crop size {size}; use a smaller size or downscale."
            )
        pics.append(img)
    which = torch.randint(len(pics), (n,), generator=generator)
    pos = torch.rand(n, 2, generator=generator)
    out = torch.empty(n, pics[0].shape[0], size, size)
    for i in range(n):
        img = pics[int(which[i])]
        top = int(pos[i, 0] * (img.shape[1] - size + 1))
        left = int(pos[i, 1] * (img.shape[2] - size + 1))
        out[i] = img[:, top : top + size, left : left + size]
    return out


# ----------------------------------------------------------------------------------------------
# Colab loaders for files you downloaded yourself (no pickle, no download here)
# ----------------------------------------------------------------------------------------------

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(root: Path, name: str) -> Path:
    for cand in (
        root / (name + ".gz"),
        root / name,
        root / "MNIST" / "raw" / (name + ".gz"),
        root / "MNIST" / "raw" / name,
    ):
        if cand.exists():
            return cand
    raise FileNotFoundError(
        f"Could not find {name}(.gz) under {root}. Download the four MNIST idx files (e.g. from "
        "https://ossci-datasets.s3.amazonaws.com/mnist/) into that folder and call mnist(root) again."
    )


def _read_idx(path: Path, expected_magic: int, ndim: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path} is too short to be an idx file; download it again.")
    magic = struct.unpack(">I", data[:4])[0]
    if magic != expected_magic:
        raise ValueError(f"{path} has idx magic number {magic}, expected {expected_magic}: wrong file?")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} bytes; the file is truncated.")
    return body.reshape(dims)


def mnist(root: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST from the standard idx files in ``root``: (images (N, 1, 28, 28) in [-1, 1], labels (N,)).

    Reads ``train-images-idx3-ubyte.gz`` etc. (gzipped or not; also ``root/MNIST/raw``). For Colab.
    """
    if split not in _MNIST_FILES:
        raise ValueError(f"mnist split must be 'train' or 'test', got {split!r}.")
    root = Path(root)
    img_name, lab_name = _MNIST_FILES[split]
    images = _read_idx(_find(root, img_name), 2051, 3)
    labels = _read_idx(_find(root, lab_name), 2049, 1)
    if len(images) != len(labels):
        raise ValueError(f"MNIST {split}: {len(images)} images but {len(labels)} labels; download again.")
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1) / 127.5 - 1.0
    return x, torch.from_numpy(labels.astype(np.int64))


_CIFAR_RECORD = 1 + 3 * 32 * 32


def cifar10(root: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 from the *binary* version: (images (N, 3, 32, 32) in [-1, 1], labels (N,) long).

    Reads ``data_batch_1.bin`` .. ``data_batch_5.bin`` (train) or ``test_batch.bin`` from
    ``root/cifar-10-batches-bin`` or ``root``. Each record is 1 label byte then 3072 bytes
    (R, G, B planes, 32 x 32, row-major). The binary format needs no pickle.
    """
    if split not in ("train", "test"):
        raise ValueError(f"cifar10 split must be 'train' or 'test', got {split!r}.")
    root = Path(root)
    folder = root / "cifar-10-batches-bin" if (root / "cifar-10-batches-bin").is_dir() else root
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    missing = [nm for nm in names if not (folder / nm).exists()]
    if missing:
        raise FileNotFoundError(
            f"Missing {missing} in {folder}. Download the binary version "
            "(https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz), extract it with "
            "`tar xzf` into root and call cifar10(root) again."
        )
    xs, ys = [], []
    for nm in names:
        raw = np.fromfile(folder / nm, dtype=np.uint8)
        if raw.size == 0 or raw.size % _CIFAR_RECORD:
            raise ValueError(f"{folder / nm} is not a CIFAR-10 binary batch (size {raw.size} bytes).")
        rec = raw.reshape(-1, _CIFAR_RECORD)
        ys.append(rec[:, 0].astype(np.int64))
        xs.append(rec[:, 1:].reshape(-1, 3, 32, 32))
    x = torch.from_numpy(np.concatenate(xs).astype(np.float32)) / 127.5 - 1.0
    y = torch.from_numpy(np.concatenate(ys))
    if int(y.max()) > 9:
        raise ValueError(f"CIFAR-10 labels must be 0..9, found {int(y.max())}; is this the CIFAR-100 file?")
    return x, y
