"""Data sets (minidiff.data): shapes, ranges, determinism, errors, and the Colab file loaders."""

import gzip
import struct

import numpy as np
import pytest
import torch

from minidiff import data


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ toys


def test_twenty_five_gaussians_centers_and_std():
    c = data.twenty_five_gaussians_centers()
    assert c.shape == (25, 2)
    grid = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]) / 2.828
    assert torch.allclose(c[:, 0].unique(), grid) and torch.allclose(c[:, 1].unique(), grid)
    assert torch.allclose(c[5 * 0 + 4], torch.tensor([-2.0, 2.0]) / 2.828)
    x = data.twenty_five_gaussians(25000, generator=gen())
    assert x.shape == (25000, 2) and x.dtype == torch.float32
    dist, idx = torch.cdist(x, c).min(1)
    resid = x - c[idx]
    assert abs(resid.std().item() - data.TWENTY_FIVE_GAUSSIANS_STD) < 0.002
    counts = torch.bincount(idx, minlength=25)
    assert counts.min() > 800 and counts.max() < 1200  # equal weights (expected 1000)


@pytest.mark.parametrize("name", sorted(data.TOY_DATASETS) + ["twenty_five_gaussians", "moons"])
def test_toy_dataset_deterministic_and_in_range(name):
    a = data.toy_dataset(name, 3000, generator=gen(1))
    b = data.toy_dataset(name, 3000, generator=gen(1))
    c = data.toy_dataset(name, 3000, generator=gen(2))
    assert a.shape == (3000, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() < 1.3 and a.abs().max() > 0.5


def test_toy_modes():
    c, std = data.toy_modes("25gaussians")
    assert c.shape == (25, 2) and std == 0.05
    c, std = data.toy_modes("8gaussians")
    assert c.shape == (8, 2) and torch.allclose(c.norm(dim=1), torch.full((8,), 0.8))
    with pytest.raises(ValueError, match="no discrete modes"):
        data.toy_modes("swiss_roll")


def test_toy_errors():
    with pytest.raises(ValueError, match="25gaussians"):
        data.toy_dataset("circles", 10)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            data.twenty_five_gaussians(bad)
    with pytest.raises(ValueError, match="positive integer"):
        data.swiss_roll(0)


# ------------------------------------------------------------------------------------------ digits


def test_digits_split_and_range():
    xtr, ytr = data.digits(8, "train")
    xte, yte = data.digits(8, "test")
    xall, yall = data.digits(8, "all")
    assert xtr.shape == (1500, 1, 8, 8) and xte.shape == (297, 1, 8, 8) and xall.shape == (1797, 1, 8, 8)
    assert ytr.dtype == torch.long and set(ytr.tolist()) == set(range(10))
    assert xall.min() == -1.0 and xall.max() == 1.0
    # train and test partition the whole set
    key = lambda x: sorted(map(bytes, x.flatten(1).numpy()))  # noqa: E731
    assert key(torch.cat([xtr, xte])) == key(xall)
    x2, y2 = data.digits(8, "train")
    assert torch.equal(xtr, x2) and torch.equal(ytr, y2)
    x3, _ = data.digits(8, "train", seed=1)
    assert not torch.equal(xtr, x3)


def test_digits_16():
    x8, y8 = data.digits(8, "test")
    x16, y16 = data.digits(16, "test")
    assert x16.shape == (297, 1, 16, 16) and torch.equal(y8, y16)
    assert x16.min() >= -1 and x16.max() <= 1
    # bilinear 2x upsampling keeps the mean of each image (up to border effects)
    assert torch.allclose(x16.mean((1, 2, 3)), x8.mean((1, 2, 3)), atol=0.05)


def test_digits_errors():
    with pytest.raises(ValueError, match="8 .* or 16"):
        data.digits(32)
    with pytest.raises(ValueError, match="split"):
        data.digits(8, "val")


# ------------------------------------------------------------------------------------------ shapes


def test_shapes():
    x, y = data.shapes(400, 16, generator=gen())
    assert x.shape == (400, 1, 16, 16) and y.shape == (400,) and y.dtype == torch.long
    assert x.min() == -1.0 and x.max() == 1.0
    assert set(y.tolist()) == set(range(len(data.SHAPE_CLASSES)))
    frac = ((x > -1) & (x < 1)).float().mean()
    assert frac > 0.01  # anti-aliased edges have intermediate values
    ink = (x + 1).mean((1, 2, 3)) / 2
    assert ink.min() > 0.03  # every image shows a shape
    x2, y2 = data.shapes(400, 16, generator=gen())
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x32, _ = data.shapes(3, 32, generator=gen())
    assert x32.shape == (3, 1, 32, 32)


def test_shapes_errors():
    with pytest.raises(ValueError, match="resolution"):
        data.shapes(4, 4)
    with pytest.raises(ValueError, match="positive integer"):
        data.shapes(0)


# ------------------------------------------------------------------------------------------ photos


def test_photo_crops():
    x = data.photo_crops(6, 32, generator=gen())
    assert x.shape == (6, 3, 32, 32) and x.min() >= -1 and x.max() <= 1 and x.std() > 0.05
    assert torch.equal(x, data.photo_crops(6, 32, generator=gen()))
    g = data.photo_crops(4, 16, images=("camera", "brick", "astronaut"), grayscale=True, generator=gen())
    assert g.shape == (4, 1, 16, 16)
    rgb = data.photo_crops(2, 16, images=("grass",), generator=gen())
    assert rgb.shape == (2, 3, 16, 16) and torch.equal(rgb[:, 0], rgb[:, 1])
    small = data.photo_crops(2, 64, images="coffee", downscale=4, generator=gen())
    assert small.shape == (2, 3, 64, 64)


def test_photo():
    p = data.photo("chelsea")
    assert p.shape == (3, 300, 451)
    q = data.photo("chelsea", size=64)
    assert q.shape == (3, 64, 64) and q.min() >= -1 and q.max() <= 1
    assert data.photo("camera", size=32, grayscale=True).shape == (1, 32, 32)


def test_photo_errors():
    with pytest.raises(ValueError, match="Unknown photo"):
        data.photo_crops(2, images=("lena",))
    with pytest.raises(ValueError, match="smaller than the crop size"):
        data.photo_crops(2, 400, images=("chelsea",))
    with pytest.raises(ValueError, match="positive integer"):
        data.photo_crops(0)


# ------------------------------------------------------------------------------------------ Colab loaders


def _write_idx(path, magic, arr):
    header = struct.pack(">I", magic) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_mnist_reads_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(3, 28, 28))
    imgs[0, 0, 0], imgs[0, 0, 1] = 0, 255
    labels = np.array([7, 0, 9])
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", 2051, imgs)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", 2049, labels)
    x, y = data.mnist(tmp_path)
    assert x.shape == (3, 1, 28, 28) and y.tolist() == [7, 0, 9]
    assert x[0, 0, 0, 0] == -1.0 and x[0, 0, 0, 1] == 1.0
    assert torch.allclose(x[:, 0], torch.tensor(imgs, dtype=torch.float32) / 127.5 - 1)
    with pytest.raises(FileNotFoundError, match="MNIST"):
        data.mnist(tmp_path, "test")
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2049, imgs)  # wrong magic
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, labels)
    with pytest.raises(ValueError, match="magic"):
        data.mnist(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        data.mnist(tmp_path, "val")


def test_cifar10_reads_binary_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    records = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        lab = rng.integers(0, 10, size=2)
        img = rng.integers(0, 256, size=(2, 3, 32, 32))
        rec = np.concatenate([lab[:, None], img.reshape(2, -1)], axis=1).astype(np.uint8)
        rec.tofile(folder / name)
        records[name] = (lab, img)
    x, y = data.cifar10(tmp_path)
    assert x.shape == (10, 3, 32, 32) and y.shape == (10,)
    lab, img = records["data_batch_1.bin"]
    assert y[:2].tolist() == lab.tolist()
    assert torch.allclose(x[:2], torch.tensor(img, dtype=torch.float32) / 127.5 - 1)  # R, G, B planes
    xt, yt = data.cifar10(folder, "test")
    assert xt.shape == (2, 3, 32, 32) and yt.tolist() == records["test_batch.bin"][0].tolist()
    (folder / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a CIFAR-10 binary batch"):
        data.cifar10(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="binary version"):
        data.cifar10(tmp_path / "nowhere")
