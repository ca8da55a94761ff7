"""Hugging Face ``transformers`` modules that convert() swaps or lists (optional extra ``hf``).

Looked up only when ``transformers`` is already imported (a user who built an HF model
has imported it), so trady_triton never imports it itself.

* ``GELUActivation`` whose function is ``F.gelu`` (erf GELU, HF's default for BERT and
  ViT) is swapped for the exact GELU that keeps only its input.
* HF self-attention modules call ``F.scaled_dot_product_attention`` (or eager attention)
  in their own forward: they keep tensors no child module shows, so the profile hooks
  them and report() lists them as not converted.
"""

from __future__ import annotations

import functools
import sys

import torch.nn as nn
import torch.nn.functional as F

from .activations import _SavedInputModule

# module path -> class names whose own forward keeps tensors (attention on q, k, v)
_SELF_ATTENTION = {
    "transformers.models.bert.modeling_bert": ("BertSelfAttention", "BertCrossAttention"),
    "transformers.models.vit.modeling_vit": ("ViTAttention",),
}


def _loaded() -> bool:
    return "transformers" in sys.modules


@functools.cache
def _gelu_swap() -> dict[type, type]:
    from transformers.activations import GELUActivation

    def activation_kind(self) -> str:
        return "gelu"

    trady = type("TraDyGELUActivation", (_SavedInputModule, GELUActivation),
                 {"activation_kind": activation_kind, "__module__": __name__})
    return {GELUActivation: trady}


def swaps() -> dict[type, type]:
    """HF class -> TraDy class, empty when transformers is not imported."""
    return _gelu_swap() if _loaded() else {}


def convertible(module: nn.Module) -> bool:
    """A GELUActivation is swapped only when it runs the erf GELU (not the Python one)."""
    return getattr(module, "act", None) is F.gelu


def self_attention_classes() -> tuple[type, ...]:
    """The loaded HF self-attention classes (their forward keeps tensors itself)."""
    found = []
    for path, names in _SELF_ATTENTION.items():
        module = sys.modules.get(path)
        found += [getattr(module, n) for n in names if module is not None and hasattr(module, n)]
    return tuple(found)
