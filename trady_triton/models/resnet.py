"""ResNet-18 (He et al. 2016) as plain nn modules, torchvision's layout and names, random init.

``width`` (64 in the paper) scales every stage for small test nets.
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .blocks import conv_bn_act


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN with a ReLU between, a skip (1x1 conv-BN when the shape changes), ReLU."""

    def __init__(self, in_c: int, out_c: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn_act(in_c, out_c, 3, stride, activation=nn.ReLU),
                                  conv_bn_act(out_c, out_c, 3))
        self.downsample = (conv_bn_act(in_c, out_c, 1, stride)
                           if stride != 1 or in_c != out_c else nn.Identity())
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.downsample(x))


class ResNet18(nn.Module):
    """stem (7x7/2 conv-BN-ReLU, 3x3/2 max pool) -> 4 stages of 2 blocks -> pool -> classifier."""

    arch_name = "resnet18"

    def __init__(self, num_classes: int = 1000, width: int = 64):
        super().__init__()
        layers: list[nn.Module] = [conv_bn_act(3, width, 7, 2, activation=nn.ReLU),
                                   nn.MaxPool2d(3, 2, 1)]
        in_c = width
        for stage in range(4):
            out_c = width * 2 ** stage
            layers += [BasicBlock(in_c, out_c, 1 if stage == 0 else 2), BasicBlock(out_c, out_c, 1)]
            in_c = out_c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(in_c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))
