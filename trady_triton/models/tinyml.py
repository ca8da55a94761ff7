"""The paper's ImageNet backbones (Lin et al. 2022, mit-han-lab/tiny-training) as float nn modules.

The weight files (``mcunet-5fps.pkl``, ``mbv2-w0.35.pkl``, ``proxyless-w0.3.pkl``) are
``torch.save`` zip archives whose pickle holds plain dicts, lists, numbers and int8/int32
numpy arrays. They are read with :class:`RestrictedUnpickler`, which accepts exactly the
four globals such a file needs; ``torch.load(weights_only=False)`` is never used.

Float reconstruction (BatchNorm already folded into the convs)::

    W = weight * w_scales[:, None, None, None]
    b = bias * x_scale * w_scales
    y = conv(x, W, b, stride, padding=k // 2, groups);  y = ReLU6(y) where y_zero == -128

Module layout (what a converter walking containers sees)::

    TinyMLNet
      features: Sequential(Conv2d, ReLU6, InvertedResidual, ..., [Conv2d, ReLU6 feature mix])
        InvertedResidual.conv: Sequential([Conv2d 1x1, ReLU6,] Conv2d dw, ReLU6, Conv2d 1x1)
        InvertedResidual.use_residual: x + conv(x) when True
      pool: AdaptiveAvgPool2d(1), flatten: Flatten(1), classifier: Linear(C, 1000)
"""

from __future__ import annotations

import codecs
import io
import pickle
import zipfile
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .common import TINYML_PREPROCESS

__all__ = [
    "TINYML_FILES",
    "RestrictedUnpickler",
    "read_tinyml_archive",
    "load_tinyml",
    "InvertedResidual",
    "TinyMLNet",
]

# file name -> the paper's name, as recorded in ``model.arch_name``
TINYML_FILES = {
    "mcunet-5fps.pkl": "mcunet-in1",
    "mbv2-w0.35.pkl": "mbv2-w0.35",
    "proxyless-w0.3.pkl": "proxyless-w0.3",
}


def _numpy_reconstruct():
    # numpy 2 moved numpy.core to numpy._core (numpy.core still works but warns).
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: codecs.encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a tiny-training weight file contains.

    Allowed: ``numpy.core.multiarray._reconstruct`` (and ``numpy._core.multiarray.
    _reconstruct``), ``numpy.ndarray``, ``numpy.dtype``, ``_codecs.encode``. Any other global
    raises :class:`pickle.UnpicklingError` naming it; persistent ids (torch storages) are
    refused too.
    """

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(
                f"forbidden global {module}.{name} in weight file (allowed: "
                + ", ".join(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS)
                + ")"
            )
        return factory()

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(
            f"persistent id {pid!r} in weight file: tensors/storages are not allowed"
        )


def read_tinyml_archive(path: str | PathLike) -> dict:
    """Read a tiny-training weight file (``torch.save`` zip archive) safely into plain dicts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tinyml weight file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a torch.save zip archive")
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(names) != 1:
            raise ValueError(f"{path}: expected exactly one data.pkl in the archive, found {names}")
        data = zf.read(names[0])
    obj = RestrictedUnpickler(io.BytesIO(data)).load()
    if not isinstance(obj, dict) or not {"first_conv", "blocks", "classifier"} <= set(obj):
        raise ValueError(f"{path}: not a tiny-training model description (keys: {list(obj)})")
    return obj


def _float_params(conv: dict) -> tuple[torch.Tensor, torch.Tensor]:
    p = conv["params"]
    w_scales = np.asarray(p["w_scales"], dtype=np.float64)
    weight = np.asarray(p["weight"], dtype=np.float64) * w_scales[:, None, None, None]
    bias = np.asarray(p["bias"], dtype=np.float64) * float(p["x_scale"]) * w_scales
    return (torch.from_numpy(weight).float(), torch.from_numpy(bias).float())


def _is_relu6(conv: dict) -> bool:
    return int(conv["params"]["y_zero"]) == -128


def _kernel(conv: dict) -> int:
    k = conv["kernel_size"]
    if isinstance(k, (tuple, list)):
        if len(set(k)) != 1:
            raise ValueError(f"non-square kernel {k} not supported")
        k = k[0]
    return int(k)


def _build_conv(conv: dict) -> list[nn.Module]:
    """Conv2d with the reconstructed float weight and bias, plus ReLU6 where y_zero == -128."""
    weight, bias = _float_params(conv)
    k = _kernel(conv)
    groups = int(conv.get("groups", 1))
    out_c, in_per_group = weight.shape[:2]
    m = nn.Conv2d(
        in_per_group * groups, out_c, k, stride=int(conv.get("stride", 1)),
        padding=k // 2, groups=groups, bias=True,
    )
    if m.weight.shape != weight.shape:
        raise ValueError(f"conv weight shape {tuple(weight.shape)} != module {tuple(m.weight.shape)}")
    with torch.no_grad():
        m.weight.copy_(weight)
        m.bias.copy_(bias)
    return [m, nn.ReLU6(inplace=False)] if _is_relu6(conv) else [m]


class InvertedResidual(nn.Module):
    """``[1x1 expand, ReLU6,] depthwise, ReLU6, 1x1 project`` with an optional skip add."""

    def __init__(self, conv: nn.Sequential, use_residual: bool):
        super().__init__()
        self.conv = conv
        self.use_residual = bool(use_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.use_residual else y

    def extra_repr(self) -> str:
        return f"use_residual={self.use_residual}"


class TinyMLNet(nn.Module):
    """features -> AdaptiveAvgPool2d(1) -> Flatten -> classifier (Linear)."""

    def __init__(self, features: nn.Sequential, classifier: nn.Linear, arch_name: str,
                 input_size: int = 128):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = classifier
        self.arch_name = arch_name
        self.input_size = input_size
        self.preprocess = TINYML_PREPROCESS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


def _arch_name_for(path: Path, arch_name: str | None) -> str:
    if arch_name is not None:
        return arch_name
    return TINYML_FILES.get(path.name, path.stem)


def load_tinyml(path: str | PathLike, arch_name: str | None = None) -> TinyMLNet:
    """Build the float model described by a tiny-training weight file.

    ``arch_name`` defaults to the paper's name for the three known file names
    (``mcunet-in1``, ``mbv2-w0.35``, ``proxyless-w0.3``), else the file stem.
    The model is returned in eval mode.
    """
    path = Path(path)
    desc = read_tinyml_archive(path)
    layers: list[nn.Module] = []
    layers += _build_conv(desc["first_conv"])
    for i, block in enumerate(desc["blocks"]):
        if block.get("se") is not None:
            raise ValueError(f"{path}: block {i} has a squeeze-excite module (not supported)")
        inner: list[nn.Module] = []
        for key in ("pointwise1", "depthwise", "pointwise2"):
            if block.get(key) is not None:
                inner += _build_conv(block[key])
        layers.append(InvertedResidual(nn.Sequential(*inner), block.get("residual") is not None))
    if desc.get("feature_mix") is not None:
        layers += _build_conv(desc["feature_mix"])

    cls = desc["classifier"]
    weight, bias = _float_params(cls)
    if weight.shape[2:] != (1, 1):
        raise ValueError(f"{path}: classifier kernel {tuple(weight.shape[2:])} is not 1x1")
    classifier = nn.Linear(weight.shape[1], weight.shape[0], bias=True)
    with torch.no_grad():
        classifier.weight.copy_(weight[:, :, 0, 0])
        classifier.bias.copy_(bias)

    in_size = int(desc["first_conv"].get("in_shape", 128))
    model = TinyMLNet(nn.Sequential(*layers), classifier, _arch_name_for(path, arch_name), in_size)
    return model.eval()
