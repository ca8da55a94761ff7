"""EfficientNet-B0 (Tan & Le 2019) as plain nn modules, random init.

MBConv blocks with SiLU and squeeze-excitation (SiLU, Sigmoid gate; squeeze width a
quarter of the block's input channels). Stochastic depth is left out (it is the identity
at evaluation and orthogonal to what is saved). ``width_mult`` / ``depth_mult`` scale
channels and repeats for small test nets.
"""

from __future__ import annotations

import math

import torch.nn as nn
from torch import Tensor

from .blocks import InvertedResidualSE, conv_bn_act
from .common import init_mobile_weights, make_divisible
# (expansion, kernel, first stride, out channels, repeats): the paper's Table 1, which
# EfficientNet-Lite0 keeps
from .efficientnet_lite import LITE0_BLOCKS as B0_SETTING



class EfficientNetB0(nn.Module):
    """features (stem, MBConv blocks, 1x1 head) -> pool -> flatten -> dropout -> classifier."""

    arch_name = "efficientnet-b0"

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0,
                 depth_mult: float = 1.0, dropout: float = 0.2):
        super().__init__()
        width = lambda c: make_divisible(c * width_mult, 8)   # noqa: E731
        in_c = width(32)
        layers: list[nn.Module] = [conv_bn_act(3, in_c, 3, 2, activation=nn.SiLU)]
        for expansion, kernel, stride, out, repeats in B0_SETTING:
            for i in range(max(1, math.ceil(repeats * depth_mult))):
                se = (max(1, in_c // 4), nn.SiLU, nn.Sigmoid)
                layers.append(InvertedResidualSE(in_c, in_c * expansion, width(out), kernel,
                                                 stride if i == 0 else 1, nn.SiLU, se))
                in_c = width(out)
        head = width(1280)
        layers.append(conv_bn_act(in_c, head, 1, activation=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head, num_classes)
        init_mobile_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.flatten(self.pool(self.features(x)))))
