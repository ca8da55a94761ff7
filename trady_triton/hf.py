"""Hugging Face ``transformers`` modules that convert() swaps or lists (optional extra ``hf``).

Looked up only when ``transformers`` is already imported (a user who built an HF model
has imported it), so trady_triton never imports it itself.

* ``GELUActivation`` whose function is ``F.gelu`` (erf GELU, HF's default for BERT and
  ViT) is swapped for the exact GELU that keeps only its input.
* ``BertSelfAttention`` and ``ViTAttention`` are swapped for adapters running the exact
  attention that keeps q, k, v (:mod:`trady_triton.hf_modules`); ``BertIntermediate`` and
  ``ViTMLP`` for adapters whose GELU keeps the first dense layer's input.
* Other HF modules whose own forward keeps tensors (``BertCrossAttention``) are hooked by
  the profile and listed by report() as not converted.
"""

from __future__ import annotations

import functools
import math
import sys

import torch.nn as nn
import torch.nn.functional as F

from . import hf_modules as H
from .activations import _SavedInputModule
from .cost import KeptCost, RecomputeCost, element_bytes

_BERT = "transformers.models.bert.modeling_bert"
_VIT = "transformers.models.vit.modeling_vit"
# module path -> class names whose own forward keeps tensors (attention on q, k, v)
_SELF_ATTENTION = {_BERT: ("BertSelfAttention", "BertCrossAttention"), _VIT: ("ViTAttention",)}


def _loaded() -> bool:
    return "transformers" in sys.modules


def _bert_dropout(self) -> float:
    return self.dropout.p


def _vit_dropout(self) -> float:
    return self.attention_dropout


# (module path, class, converted forward, dropout getter, attribute names)
_ATTENTION_SPECS = (
    (_BERT, "BertSelfAttention", H.bert_self_attention_forward, _bert_dropout,
     ("query", "key", "value", None, "attention_head_size")),
    (_VIT, "ViTAttention", H.vit_attention_forward, _vit_dropout,
     ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")),
)
_FEED_FORWARD_SPECS = (
    (_BERT, "BertIntermediate", ("dense", "intermediate_act_fn", None)),
    (_VIT, "ViTMLP", ("fc1", "activation_fn", "fc2")),
)


@functools.cache
def _gelu_swap() -> dict[type, type]:
    from transformers.activations import GELUActivation

    def activation_kind(self) -> str:
        return "gelu"

    trady = type("TraDyGELUActivation", (_SavedInputModule, GELUActivation),
                 {"activation_kind": activation_kind, "__module__": __name__})
    return {GELUActivation: trady}


def _hf_class(path: str, name: str) -> type:
    import importlib
    return getattr(importlib.import_module(path), name)


@functools.cache
def _module_swaps() -> dict[type, type]:
    swaps = {}
    for path, name, forward, dropout, names in _ATTENTION_SPECS:
        cls = _hf_class(path, name)
        swaps[cls] = type(f"TraDy{name}", (H.ExactSelfAttention, cls),
                          {"forward": forward, "_dropout_p": dropout, "_names": names,
                           "__module__": __name__})
    for path, name, names in _FEED_FORWARD_SPECS:
        cls = _hf_class(path, name)
        swaps[cls] = type(f"TraDy{name}", (H.RecomputingFeedForward, cls),
                          {"forward": H.RecomputingFeedForward.forward, "_names": names,
                           "__module__": __name__})
    return swaps


def swaps() -> dict[type, type]:
    """HF class -> TraDy class, empty when transformers is not imported."""
    return {**_gelu_swap(), **_module_swaps()} if _loaded() else {}


def convertible(module: nn.Module) -> bool:
    """A GELUActivation is swapped only when it runs the erf GELU (not the Python one)."""
    if type(module) in _gelu_swap():
        return getattr(module, "act", None) is F.gelu
    return True


def self_attention_classes() -> tuple[type, ...]:
    """The loaded HF self-attention classes (their forward keeps tensors itself)."""
    found = []
    for path, names in _SELF_ATTENTION.items():
        module = sys.modules.get(path)
        found += [getattr(module, n) for n in names if module is not None and hasattr(module, n)]
    return tuple(found)


def costed_containers() -> tuple[type, ...]:
    """The converted HF containers the profile hooks and costs (empty without transformers)."""
    return tuple(_module_swaps().values()) if _loaded() else ()


def recomputed_activations(model: nn.Module) -> set[str]:
    """Names of the activations run inside a RecomputedActivation (not costed themselves)."""
    return {f"{n}.{m.activation_name()}" for n, m in model.named_modules()
            if isinstance(m, H.RecomputingFeedForward) and m.activation_kind()}


def kept_costs(order, name, module, x, records) -> list | None:
    """Cost entries of a converted HF container; None when ``module`` is not one, or when
    it ran HF's own path (then it is listed as not converted)."""
    if isinstance(module, H.RecomputingFeedForward):
        if module.activation_kind() is None:
            return []
        first = _record(records, f"{name}.{module.first_dense_name()}")
        return [RecomputeCost(name, math.prod(x.shape[1:]), element_bytes(x.dtype), first[1],
                              first[0], first[2].in_features)]
    if isinstance(module, H.ExactSelfAttention) and module.took_converted_path:
        return _attention_costs(name, module, x, records)
    return None


def _attention_costs(name, module, x, records) -> list:
    """q, k, v (kept when any of them needs a gradient: the core runs after the three
    projections; compressed: codes + a (minimum, step) per token and head, one entry per
    tensor as each is packed on its own) and, with attention dropout, its keep mask in 1 bit."""
    projections = [_record(records, f"{name}.{n}") for n in module._names[:3]]
    order = max(r[0] for r in projections) + 0.5
    size = element_bytes(x.dtype)
    head_size = getattr(module, module._names[4])
    if module.backward_bits is None:
        costs = [KeptCost(name, sum(math.prod(r[4].shape[1:]) for r in projections), 8 * size,
                          order)]
    else:
        costs = [KeptCost(name, math.prod(r[4].shape[1:]), module.backward_bits, order,
                          extra_bytes_per_sample=2 * math.prod(r[4].shape[1:]) // head_size * size)
                 for r in projections]
    p = module._dropout_p()
    if 0.0 < p:   # costed as in training (in eval the core keeps no mask), as Dropout
        tokens = x.shape[-2]
        heads = projections[0][4].shape[-1] // head_size
        costs.append(KeptCost(name, heads * tokens * tokens, 1, order))
    return costs


def _record(records, name):
    return next(r for r in records if r[1] == name)
