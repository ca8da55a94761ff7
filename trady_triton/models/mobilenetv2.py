"""The paper's MobileNetV2-w0.35 architecture (random init), as in Lin et al. 2022.

torchvision-style MobileNetV2 with width multiplier 0.35 and channel divisor 8, except
that the last 1x1 conv has ``make_divisible(1280 * 0.35, 8) = 448`` channels (torchvision
keeps 1280 for widths below 1). 52 convs (first conv, 17 inverted-residual blocks of which
the first has no expansion conv, the final 1x1 448 conv); the classifier is a Linear.

Every conv is ``nn.Sequential(Conv2d(bias=False), BatchNorm2d, [ReLU6])`` so that
Conv -> BN -> ReLU6 -> Conv is visible to a converter walking the containers.
At 128x128, sum over convs of weight elements + per-sample input-activation elements is
1,252,320 (docs/METHOD.md section 4).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .common import TINYML_PREPROCESS, make_divisible, init_mobile_weights

__all__ = ["ConvBNReLU", "InvertedResidual", "MobileNetV2", "mobilenetv2_w035"]

# (expansion t, output channels c, repeats n, first stride s): the MobileNetV2 paper's table.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class ConvBNReLU(nn.Sequential):
    """``Conv2d(bias=False) -> BatchNorm2d -> ReLU6`` (ReLU6 omitted when ``act=False``)."""

    def __init__(self, in_c: int, out_c: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, act: bool = True):
        layers: list[nn.Module] = [
            nn.Conv2d(in_c, out_c, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        ]
        if act:
            layers.append(nn.ReLU6(inplace=False))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """``[1x1 expand,] 3x3 depthwise, 1x1 project (linear)`` with a skip when shapes allow."""

    def __init__(self, in_c: int, out_c: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(in_c * expand_ratio))
        self.use_residual = stride == 1 and in_c == out_c
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(in_c, hidden, 1))
        layers += [
            ConvBNReLU(hidden, hidden, 3, stride, groups=hidden),
            ConvBNReLU(hidden, out_c, 1, act=False),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.use_residual else y

    def extra_repr(self) -> str:
        return f"use_residual={self.use_residual}"


class MobileNetV2(nn.Module):
    """MobileNetV2 with ``last_channel = make_divisible(1280 * width_mult, 8)``.

    features -> AdaptiveAvgPool2d(1) -> Flatten -> Dropout(p) -> classifier (Linear).
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 0.35, round_nearest: int = 8,
                 dropout: float = 0.0, input_size: int = 128, arch_name: str | None = None):
        super().__init__()
        in_c = make_divisible(32 * width_mult, round_nearest)
        last_c = make_divisible(1280 * width_mult, round_nearest)
        features: list[nn.Module] = [ConvBNReLU(3, in_c, 3, stride=2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out_c = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(in_c, out_c, s if i == 0 else 1, t))
                in_c = out_c
        features.append(ConvBNReLU(in_c, last_c, 1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(last_c, num_classes)
        self.last_channel = last_c
        self.arch_name = arch_name or f"mbv2-w{width_mult:g}-arch"
        self.input_size = input_size
        self.preprocess = TINYML_PREPROCESS
        init_mobile_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.flatten(self.pool(self.features(x)))))


def mobilenetv2_w035(num_classes: int = 1000, dropout: float = 0.0) -> MobileNetV2:
    """The paper's MobileNetV2-w0.35 architecture (``arch_name = "mbv2-w0.35-arch"``), random init."""
    return MobileNetV2(num_classes=num_classes, width_mult=0.35, dropout=dropout,
                       arch_name="mbv2-w0.35-arch")
