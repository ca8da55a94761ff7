"""convert() / revert(): swap supported modules of a model instance for TraDy modules.

The swap makes a new module object of the TraDy subclass that shares the
original's parameters and buffers (same Parameter objects, so optimizers built
before convert() still see them) and hook dictionaries (the user's hook handles
keep working), and puts it where the original was. No torch.nn class is
patched; other instances of the same class are untouched.

The swap is driven by the ``SWAPS`` table: a TraDy class needs only a
``_trady_setup()`` method (BatchNorm's takes ``freeze_stats``). Whatever the
setup or later calls add (attributes, buffers) is found and removed by
:func:`unswap_modules`, which compares with the names the original had.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from . import activations as A
from . import hf
from .conv1d import TraDyConv1d
from . import layers as L
from . import pooling as P
from . import transformer as X
from .models.blocks import SqueezeExcitation
from .models.transformer_blocks import MLP, Attention

# Exact types only: a user's subclass may change forward(), so it is left alone.
SWAPS = {
    nn.Conv2d: L.TraDyConv2d,
    nn.Conv1d: TraDyConv1d,
    nn.Linear: L.TraDyLinear,
    nn.BatchNorm2d: L.TraDyBatchNorm2d,
    nn.ReLU: L.TraDyReLU,
    nn.ReLU6: L.TraDyReLU6,
    nn.AdaptiveAvgPool2d: L.TraDyAdaptiveAvgPool2d,
    nn.SiLU: A.TraDySiLU,
    nn.Hardswish: A.TraDyHardswish,
    nn.GELU: A.TraDyGELU,
    nn.Sigmoid: A.TraDySigmoid,
    nn.Tanh: A.TraDyTanh,
    nn.Hardsigmoid: A.TraDyHardsigmoid,
    nn.Dropout: A.TraDyDropout,
    SqueezeExcitation: A.TraDySqueezeExcitation,
    nn.MaxPool2d: P.TraDyMaxPool2d,
    nn.AvgPool2d: P.TraDyAvgPool2d,
    nn.LayerNorm: X.TraDyLayerNorm,
    nn.MultiheadAttention: X.TraDyMultiheadAttention,
    # MultiheadAttention's out_proj: its converted path calls it like any Linear
    nn.modules.linear.NonDynamicallyQuantizableLinear: L.TraDyLinear,
    Attention: X.TraDyAttention,
    MLP: X.TraDyMLP,
}
TRADY_TYPES = tuple(SWAPS.values())


def _swaps() -> dict[type, type]:
    """SWAPS plus the Hugging Face classes when transformers is loaded (hf.py)."""
    return {**SWAPS, **hf.swaps()}


def _trady_types() -> tuple[type, ...]:
    return tuple(_swaps().values())


@dataclass(frozen=True)
class _Origin:
    """What a swapped module was: its class, the names it had (to remove what TraDy
    adds) and the values of the attributes the swap rewrote (conv ``padding``)."""

    cls: type
    attributes: frozenset
    buffers: frozenset
    non_persistent: frozenset
    rewritten: dict

    @classmethod
    def of(cls, module: nn.Module, rewritten: dict) -> "_Origin":
        return cls(type(module), frozenset(module.__dict__), frozenset(module._buffers),
                   frozenset(module._non_persistent_buffers_set), rewritten)


def _symmetric_padding(conv: nn.Conv2d):
    """Integer padding for ``padding='same'/'valid'``, or None if it is asymmetric."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    pads = []
    for k, d in zip(conv.kernel_size, conv.dilation):
        total = d * (k - 1)
        if total % 2:
            return None
        pads.append(total // 2)
    return tuple(pads)


def _convertible(module: nn.Module) -> bool:
    if type(module) not in _swaps():
        return False
    if type(module) in hf.swaps():
        return hf.convertible(module)
    if isinstance(module, nn.Conv2d):
        return module.padding_mode == "zeros" and _symmetric_padding(module) is not None
    if isinstance(module, nn.Conv1d):
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if isinstance(module, nn.BatchNorm2d):
        return module.track_running_stats
    if isinstance(module, nn.MaxPool2d):
        kernel = P.max_pool_geometry(module)[0]
        return not module.return_indices and P.code_bits(kernel[0] * kernel[1]) is not None
    return True


def _clone_as(module: nn.Module, cls: type) -> nn.Module:
    """A new ``cls`` instance with ``module``'s state.

    Parameters and hook dictionaries are shared; the other dicts and sets
    (parameters, buffers, non-persistent names) are copied, so what the TraDy
    setup registers never reaches the original module. (So a TraDy class must
    not register hooks on itself: they would be the user's too.)
    """
    new = cls.__new__(cls)
    new.__dict__.update({key: (value.copy() if isinstance(value, (dict, set))
                               and "hooks" not in key else value)
                         for key, value in module.__dict__.items()})
    return new


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _trady_copy(module: nn.Module, freeze_stats: bool) -> nn.Module:
    """The TraDy class of ``module``, sharing its parameters, set up for training."""
    new = _clone_as(module, _swaps()[type(module)])
    rewritten = {}
    if isinstance(new, nn.Conv2d):   # the autograd Functions take integer padding
        rewritten["padding"] = module.padding
        new.padding = _symmetric_padding(module)
    new._trady_origin = _Origin.of(module, rewritten)
    if isinstance(new, L.TraDyBatchNorm2d):
        new._trady_setup(freeze_stats)
    else:
        new._trady_setup()
    return new


def swap_modules(model: nn.Module, freeze_stats: bool = True,
                 only: tuple[type, ...] | None = None) -> dict[str, nn.Module]:
    """Replace every convertible module in place (``only``: of these exact types);
    returns name -> TraDy module."""
    if any(isinstance(m, _trady_types()) for m in model.modules()):
        raise ValueError("model is already converted: call revert() first")
    if type(model) in _swaps():
        raise ValueError("model: pass a container of layers, not a single layer")
    replaced: dict[int, nn.Module] = {}   # id(original) -> new, so shared modules stay shared
    swapped = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name or not _convertible(module) or (only and type(module) not in only):
            continue
        if id(module) not in replaced:
            replaced[id(module)] = _trady_copy(module, freeze_stats)
        _set_child(model, name, replaced[id(module)])
        swapped[name] = replaced[id(module)]
    return swapped


def swap_attention_layers(model: nn.Module) -> None:
    """Convert only the plain nn.MultiheadAttention modules (and their out_proj): their
    projections are layers of the profile once converted, as after convert()
    (rank_layers ranks them on a copy). A model with TraDy modules is left as it is."""
    if type(model) in _swaps() or any(isinstance(m, _trady_types()) for m in model.modules()):
        return
    if any(type(m) is nn.MultiheadAttention for m in model.modules()):
        swap_modules(model, only=(nn.MultiheadAttention,
                                  nn.modules.linear.NonDynamicallyQuantizableLinear))


def _plain_copy(module: nn.Module) -> nn.Module:
    """The original class again, with the current state minus what the TraDy setup added."""
    origin = module._trady_origin
    plain = _clone_as(module, origin.cls)
    for key in set(plain.__dict__) - origin.attributes:
        del plain.__dict__[key]
    for name in set(plain._buffers) - origin.buffers:
        del plain._buffers[name]
    plain._non_persistent_buffers_set.intersection_update(origin.non_persistent)
    plain.__dict__.update(origin.rewritten)
    return plain


def unswap_modules(model: nn.Module) -> nn.Module:
    """Give back plain torch.nn modules (the inverse of :func:`swap_modules`)."""
    restored: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name or not isinstance(module, _trady_types()):
            continue
        if id(module) not in restored:
            restored[id(module)] = _plain_copy(module)
        _set_child(model, name, restored[id(module)])
    return model
