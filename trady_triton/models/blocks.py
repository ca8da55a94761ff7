"""Building blocks shared by the architectures of this package."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor


class SqueezeExcitation(nn.Module):
    """Squeeze-excitation: ``x * gate(x)`` with a per-channel gate from global pooling.

    The attribute names are torchvision's (``avgpool``, ``fc1``, ``activation``,
    ``fc2``, ``scale_activation``), so its state dicts load here.
    """

    def __init__(self, channels: int, squeeze_channels: int,
                 activation: type[nn.Module] = nn.ReLU,
                 scale_activation: type[nn.Module] = nn.Hardsigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.activation = activation()
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.scale_activation = scale_activation()

    def gate(self, x: Tensor) -> Tensor:
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)
