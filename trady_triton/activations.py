"""Elementwise activations, Dropout and squeeze-excitation gating that keep the least for backward.

What each Function keeps, when it runs on the backward path (behind the earliest
trained layer; before it, the layers run as plain ops and keep nothing):

* ``SavedInput`` (SiLU, GELU erf/tanh, Hardswish): the input. Their derivative is a
  function of x that the output does not determine (SiLU and GELU are not monotone;
  Hardswish's slope in (-3, 3) is x / 3 + 1 / 2), so x is the least an exact backward
  can keep.
* ``SavedOutput`` (Sigmoid, Tanh): the output; the derivative is y (1 - y) and 1 - y^2.
* ``HardsigmoidMask``: a 1-bit mask: the slope is 1/6 inside (-3, 3) and 0 outside.
* ``DropoutMask``: the 1-bit keep mask (PyTorch keeps a full-size mask).
* ``GateMultiply`` (``x * gate``, gate of shape [N, C, 1, 1]): the gate, and for the
  gate's gradient x. When x is the output of a ``SavedInput`` activation that kept
  its input anyway, x is recomputed from that input in backward (the same op on the
  same tensor: the same bits) instead of being kept a second time.

Backward calls ATen's own derivative ops, so gradients equal PyTorch's bit for bit.
In-place variants (``inplace=True``) run out of place: the input they keep must not
be overwritten.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.utils.weak import WeakIdKeyDictionary

from .compressed import DerivativeCodes, compress, summed_input_bits, restore
from .models.blocks import SqueezeExcitation
from .reference import pack_mask, relu_backward_mask, unpack_mask
from .first_order import first_order_only

# kind -> (forward, ATen backward taking (grad, saved input))
_INPUT_KINDS = {
    "silu": (F.silu, torch.ops.aten.silu_backward),
    "gelu": (F.gelu, lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="none")),
    "gelu-tanh": (lambda x: F.gelu(x, approximate="tanh"),
                  lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="tanh")),
    "hardswish": (F.hardswish, torch.ops.aten.hardswish_backward),
}
# kind -> (forward, ATen backward taking (grad, saved output))
_OUTPUT_KINDS = {
    "sigmoid": (torch.sigmoid, torch.ops.aten.sigmoid_backward),
    "tanh": (torch.tanh, torch.ops.aten.tanh_backward),
}

# output of a SavedInput activation -> (its version, kind, weak reference to the input it
# kept): lets GateMultiply recompute the output instead of keeping it again. Weak on both
# sides: the entry holds no memory alive (the graph holds the input while it is needed).
_RECOMPUTABLE = WeakIdKeyDictionary()


class SavedInput(Function):
    """An activation whose exact derivative needs its input: keeps x."""

    @staticmethod
    def forward(ctx, x, kind):
        ctx.kind = kind
        ctx.save_for_backward(x)
        return _INPUT_KINDS[kind][0](x)

    @staticmethod
    @first_order_only("TraDySiLU / TraDyGELU / TraDyHardswish")
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        return _INPUT_KINDS[ctx.kind][1](grad_y, x), None


class SavedOutput(Function):
    """Sigmoid / Tanh: the derivative is a function of the output: keeps y."""

    @staticmethod
    def forward(ctx, x, kind):
        ctx.kind = kind
        y = _OUTPUT_KINDS[kind][0](x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @first_order_only("TraDySigmoid / TraDyTanh")
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        return _OUTPUT_KINDS[ctx.kind][1](grad_y, y), None


class HardsigmoidMask(Function):
    """Hardsigmoid keeping 1 bit per element: inside (-3, 3) or not."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(pack_mask((x > -3) & (x < 3)))
        return F.hardsigmoid(x)

    @staticmethod
    @first_order_only("TraDyHardsigmoid")
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        inside = unpack_mask(packed, grad_y.numel()).reshape(grad_y.shape)
        # ATen's own derivative on a stand-in input (0 inside, 4 outside): the slope
        # constant is then PyTorch's, bit for bit
        stand_in = torch.where(inside, 0.0, 4.0).to(grad_y.dtype)
        return torch.ops.aten.hardsigmoid_backward(grad_y, stand_in)


class DropoutMask(Function):
    """Training-mode dropout with 0 < p < 1 keeping its keep-mask in 1 bit per element."""

    @staticmethod
    def forward(ctx, x, p):
        keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p)
        ctx.scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(pack_mask(keep))
        return x * keep * ctx.scale

    @staticmethod
    @first_order_only("TraDyDropout")
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        return relu_backward_mask(grad_y.contiguous(), packed) * ctx.scale, None


class GateMultiply(Function):
    """``x * gate`` (gate broadcast over the spatial dims) keeping what each gradient needs.

    ``source`` is the input that the activation producing ``x`` kept (or None): x is
    then recomputed from it as ``_INPUT_KINDS[kind][0](source)``. With ``bits``
    (compressed mode, no ``source``) x is kept as ``summed_input_bits(bits)``-bit integers
    with a scale per (sample, channel).
    """

    @staticmethod
    def forward(ctx, x, gate, source, kind, bits=None):
        need_x, need_gate = ctx.needs_input_grad[1], ctx.needs_input_grad[0]
        ctx.kind = kind if source is not None else None
        ctx.gate_shape, ctx.x_shape = gate.shape, x.shape
        ctx.bits = summed_input_bits(bits) if bits is not None and need_x and source is None \
            else None
        kept_x = (source if source is not None else x) if need_x else None
        kept_scales = None
        if ctx.bits is not None:
            kept_x, kept_scales = compress(x, ctx.bits, math.prod(x.shape[2:]))
        ctx.save_for_backward(kept_x, kept_scales, gate if need_gate else None)
        return x * gate

    @staticmethod
    @first_order_only("TraDySqueezeExcitation")
    def backward(ctx, grad_y):
        kept_x, kept_scales, gate = ctx.saved_tensors
        grad_x = grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y * gate
        if ctx.needs_input_grad[1]:
            if ctx.bits is not None:
                x = restore(kept_x, kept_scales.to(grad_y.dtype), ctx.bits, ctx.x_shape)
            else:
                x = kept_x if ctx.kind is None else _INPUT_KINDS[ctx.kind][0](kept_x)
            grad_gate = (grad_y * x).sum_to_size(ctx.gate_shape)   # as autograd reduces a broadcast
        return grad_x, grad_gate, None, None, None


def _grad_needed(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def saved_input_activation(x: Tensor, kind: str, bits: int | None = None) -> Tensor:
    """Apply activation ``kind`` (a key of ``_INPUT_KINDS``), keeping x only on the backward path.

    With ``bits`` (compressed mode) it keeps a ``bits``-bit derivative code instead.
    """
    if not _grad_needed(x):
        return _INPUT_KINDS[kind][0](x)
    if bits is not None:
        return DerivativeCodes.apply(x, *_INPUT_KINDS[kind], kind, bits)
    y = SavedInput.apply(x, kind)
    _RECOMPUTABLE[y] = (y._version, kind, weakref.ref(x))
    return y


def gate_multiply(x: Tensor, gate: Tensor, bits: int | None = None) -> Tensor:
    """``x * gate`` for a squeeze-excitation gate ``[N, C, 1, 1]``; ``bits``: compressed mode."""
    if not _grad_needed(x, gate):
        return x * gate
    entry = _RECOMPUTABLE.get(x)
    source = entry[2]() if entry is not None and entry[0] == x._version else None
    if source is not None:   # x unchanged since its activation made it from ``source``
        return GateMultiply.apply(x, gate, source, entry[1])
    return GateMultiply.apply(x, gate, None, None, bits)


# ------------------------------------------------------------------ modules
class _Swapped:
    """Mixin of the swapped modules: nothing to set up beyond the parent's state."""

    def _trady_setup(self) -> None:
        pass


class _SavedInputModule(_Swapped):
    """SiLU / GELU / Hardswish; ``backward_bits`` (set by convert()) selects compressed mode."""

    backward_bits: int | None = None

    def activation_kind(self) -> str:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return saved_input_activation(x, self.activation_kind(), self.backward_bits)


class TraDySiLU(_SavedInputModule, nn.SiLU):
    def activation_kind(self) -> str:
        return "silu"


class TraDyHardswish(_SavedInputModule, nn.Hardswish):
    def activation_kind(self) -> str:
        return "hardswish"


class TraDyGELU(_SavedInputModule, nn.GELU):
    def activation_kind(self) -> str:
        return "gelu" if self.approximate == "none" else "gelu-tanh"


class _SavedOutputModule(_Swapped):
    kind = ""

    def forward(self, x: Tensor) -> Tensor:
        if not _grad_needed(x):
            return _OUTPUT_KINDS[self.kind][0](x)
        return SavedOutput.apply(x, self.kind)


class TraDySigmoid(_SavedOutputModule, nn.Sigmoid):
    kind = "sigmoid"


class TraDyTanh(_SavedOutputModule, nn.Tanh):
    kind = "tanh"


class TraDyHardsigmoid(_Swapped, nn.Hardsigmoid):
    def forward(self, x: Tensor) -> Tensor:
        if not _grad_needed(x):
            return F.hardsigmoid(x)
        return HardsigmoidMask.apply(x)


class TraDyDropout(_Swapped, nn.Dropout):
    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0 or not _grad_needed(x):
            return F.dropout(x, self.p, True)   # p = 1: zeros, nothing to keep
        return DropoutMask.apply(x, self.p)


class TraDySqueezeExcitation(_Swapped, SqueezeExcitation):
    """Squeeze-excitation whose ``x * gate`` keeps x at most once (see :class:`GateMultiply`)."""

    backward_bits: int | None = None   # set by convert(): compressed mode

    def forward(self, x: Tensor) -> Tensor:
        return gate_multiply(x, self.gate(x), self.backward_bits)
