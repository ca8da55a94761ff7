"""MobileNetV3-Small (Howard et al. 2019) as plain nn modules, torchvision's layout, random init.

Hardswish and ReLU blocks, squeeze-excitation with ReLU and a Hardsigmoid gate.
``width_mult`` scales every channel count (rounded to multiples of 8) for small test nets.
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .blocks import InvertedResidualSE, conv_bn_act
from .common import init_mobile_weights, make_divisible

# (kernel, expanded, out, SE, activation, stride): torchvision's mobilenet_v3_small table
SMALL_SETTING = (
    (3, 16, 16, True, nn.ReLU, 2),
    (3, 72, 24, False, nn.ReLU, 2),
    (3, 88, 24, False, nn.ReLU, 1),
    (5, 96, 40, True, nn.Hardswish, 2),
    (5, 240, 40, True, nn.Hardswish, 1),
    (5, 240, 40, True, nn.Hardswish, 1),
    (5, 120, 48, True, nn.Hardswish, 1),
    (5, 144, 48, True, nn.Hardswish, 1),
    (5, 288, 96, True, nn.Hardswish, 2),
    (5, 576, 96, True, nn.Hardswish, 1),
    (5, 576, 96, True, nn.Hardswish, 1),
)


class MobileNetV3Small(nn.Module):
    """features -> pool -> flatten -> Linear(576, 1024) -> Hardswish -> Dropout -> classifier."""

    arch_name = "mobilenetv3-small"

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2):
        super().__init__()
        width = lambda c: make_divisible(c * width_mult, 8)   # noqa: E731
        layers: list[nn.Module] = [conv_bn_act(3, width(16), 3, 2, activation=nn.Hardswish)]
        in_c = width(16)
        for kernel, expanded, out, use_se, activation, stride in SMALL_SETTING:
            se = (make_divisible(width(expanded) // 4, 8), nn.ReLU, nn.Hardsigmoid) if use_se else None
            layers.append(InvertedResidualSE(in_c, width(expanded), width(out), kernel, stride,
                                             activation, se))
            in_c = width(out)
        last = 6 * in_c
        layers.append(conv_bn_act(in_c, last, 1, activation=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Sequential(nn.Linear(last, 1024), nn.Hardswish(), nn.Dropout(dropout))
        self.classifier = nn.Linear(1024, num_classes)
        init_mobile_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.head(self.flatten(self.pool(self.features(x)))))
