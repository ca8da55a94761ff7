"""Compressed backward, opt-in: an activation keeps a k-bit code of its derivative.

With ``convert(..., backward_bits=k)`` (k in 8, 4, 2) SiLU, GELU and Hardswish (also
inside a transformer MLP; not the tiny one inside a squeeze-excitation) keep, instead of
their full-precision input, their exact derivative ``f'(x)`` rounded to one of ``2**k`` evenly spaced levels spanning its range,
stochastically (up or down with the probabilities that make the expected level equal to
``f'(x)``): the gradient they pass back is unbiased, with a variance that shrinks 4x per
extra bit. Everything else stays exact. ``None`` (the default) is exact mode.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function

from .pooling import pack_codes, unpack_codes
from .first_order import first_order_only

BACKWARD_BITS = (None, 8, 4, 2)

# kind -> (min, max) of the derivative over the real line
DERIVATIVE_RANGES = {
    "silu": (-0.0999, 1.0999),
    "gelu": (-0.1700, 1.1289),
    "gelu-tanh": (-0.1700, 1.1290),
    "hardswish": (-0.5, 1.5),
}


def check_backward_bits(bits) -> None:
    """Raise a ValueError naming ``backward_bits`` unless it is None, 8, 4 or 2."""
    if (bits is not None and (isinstance(bits, bool) or not isinstance(bits, int))) \
            or bits not in BACKWARD_BITS:
        raise ValueError(f"backward_bits={bits!r}: allowed values are None (exact), 8, 4, 2")


def derivative_grid(kind: str, bits: int) -> tuple[float, float]:
    """(lowest level, step) of ``2**bits`` evenly spaced levels spanning ``kind``'s range.

    (Levels placed so that 0 and 1 are exact, where the activation saturates, measured
    worse: the larger step costs more than the saturated elements gain.)
    """
    low, high = DERIVATIVE_RANGES[kind]
    return low, (high - low) / (2 ** bits - 1)


def quantize_stochastic(values: Tensor, grid: tuple[float, float], bits: int) -> Tensor:
    """Level index in [0, 2**bits - 1] of each value, rounded stochastically (unbiased)."""
    low, step = grid
    position = ((values - low) / step).clamp_(0, 2 ** bits - 1)
    return (position + torch.rand_like(position)).floor_().clamp_(max=2 ** bits - 1)


def dequantize(codes: Tensor, grid: tuple[float, float], dtype) -> Tensor:
    low, step = grid
    return codes.to(dtype) * step + low


class DerivativeCodes(Function):
    """``forward(x)`` keeping a ``bits``-bit stochastic code of ``derivative(ones, x)``."""

    @staticmethod
    def forward(ctx, x, forward, derivative, kind, bits):
        exact = derivative(torch.ones_like(x), x)
        codes = quantize_stochastic(exact, derivative_grid(kind, bits), bits)
        ctx.kind, ctx.bits, ctx.shape = kind, bits, x.shape
        ctx.save_for_backward(pack_codes(codes, bits))
        return forward(x)

    @staticmethod
    @first_order_only("TraDySiLU / TraDyGELU / TraDyHardswish (backward_bits set)")
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        codes = unpack_codes(packed, ctx.bits, grad_y.numel()).reshape(ctx.shape)
        slope = dequantize(codes, derivative_grid(ctx.kind, ctx.bits), grad_y.dtype)
        return grad_y * slope, None, None, None, None


def set_backward_bits(model, bits: int | None) -> None:
    """Put the converted SiLU / GELU / Hardswish of ``model`` in exact or compressed mode.

    A squeeze-excitation's own activation stays exact: it acts on ``[N, C', 1, 1]``, so
    codes would save next to nothing, while its noise reaches every gate of the block.
    """
    from .activations import TraDySqueezeExcitation, _SavedInputModule

    check_backward_bits(bits)
    inside_se = {id(m.activation) for m in model.modules() if isinstance(m, TraDySqueezeExcitation)}
    for module in model.modules():
        if isinstance(module, _SavedInputModule):
            module.backward_bits = None if id(module) in inside_se else bits


def backward_bits_of(model) -> int | None:
    """The compressed-mode bits of ``model``'s converted activations (None: exact)."""
    from .activations import _SavedInputModule

    return next((m.backward_bits for m in model.modules()
                 if isinstance(m, _SavedInputModule) and m.backward_bits is not None), None)
