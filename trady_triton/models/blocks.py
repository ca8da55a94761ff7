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


def conv_bn_act(in_c: int, out_c: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                activation: type[nn.Module] | None = None) -> nn.Sequential:
    """``Conv2d(bias=False) -> BatchNorm2d [-> activation]``, 'same' padding."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_c, out_c, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                  bias=False),
        nn.BatchNorm2d(out_c)]
    if activation is not None:
        layers.append(activation())
    return nn.Sequential(*layers)


class InvertedResidualSE(nn.Module):
    """MobileNetV3 / EfficientNet block: [1x1 expand,] depthwise, [SE,] 1x1 project, skip.

    ``se`` is None or ``(squeeze_channels, activation, scale_activation)``.
    """

    def __init__(self, in_c: int, expanded: int, out_c: int, kernel_size: int, stride: int,
                 activation: type[nn.Module], se: tuple | None = None):
        super().__init__()
        self.use_residual = stride == 1 and in_c == out_c
        layers: list[nn.Module] = []
        if expanded != in_c:
            layers.append(conv_bn_act(in_c, expanded, 1, activation=activation))
        layers.append(conv_bn_act(expanded, expanded, kernel_size, stride, expanded, activation))
        if se is not None:
            layers.append(SqueezeExcitation(expanded, *se))
        layers.append(conv_bn_act(expanded, out_c, 1))
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y
