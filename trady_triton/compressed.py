"""Compressed backward, opt-in: what the backward path keeps, as k-bit codes.

With ``convert(..., backward_bits=k)`` (k in 8, 4, 2):

* SiLU, GELU and Hardswish (also inside a transformer MLP; not the tiny one inside a
  squeeze-excitation) keep, instead of their full-precision input, a k-bit code of
  their derivative: a piecewise-constant function of x with ``2**k`` levels fitted to
  this tensor's derivative values (Lloyd-Max, :func:`codes.derivative_codes`), each
  element the index of its nearest level. Deterministic: measured on EfficientNet-B0
  it gives far better per-layer gradient cosines than the first slice's stochastic
  rounding between evenly spaced levels (bench/RESULTS.md).
* LayerNorm's input and an attention core's packed ``qkv`` (ours, a converted
  nn.MultiheadAttention's) or q, k, v (a Hugging Face self-attention's) keep k-bit
  integers with a (minimum, step) per group (:func:`codes.quantize_groups`): per row for
  LayerNorm (its mean and 1/std stay exact), per (token, q/k/v, head) for attention.
* A squeeze-excitation's ``x`` (kept for the gate's gradient; per (sample, channel)
  scales) and the compact copies of the selected channels that trained conv / linear
  layers keep (Conv2d, Conv1d, Linear, a MultiheadAttention's input projection;
  per-channel scales) use ``2k`` bits, at most 8 (:func:`summed_input_bits`).
  The classifier's input stays exact.

Codes round to the nearest level: deterministic, not unbiased (measured: far closer to
exact than unbiased stochastic rounding). Masks and window codes are as in exact mode.
``None`` (the default) is exact mode.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function

from .codes import decode_levels, dequantize_groups, derivative_codes, quantize_groups
from .first_order import first_order_only

BACKWARD_BITS = (None, 8, 4, 2)


def check_backward_bits(bits) -> None:
    """Raise a ValueError naming ``backward_bits`` unless it is None, 8, 4 or 2."""
    if (bits is not None and (isinstance(bits, bool) or not isinstance(bits, int))) \
            or bits not in BACKWARD_BITS:
        raise ValueError(f"backward_bits={bits!r}: allowed values are None (exact), 8, 4, 2")


class DerivativeCodes(Function):
    """``forward(x)`` keeping a ``bits``-bit level code of ``derivative(ones, x)``."""

    @staticmethod
    def forward(ctx, x, forward, derivative, kind, bits):
        packed, levels = derivative_codes(derivative(torch.ones_like(x), x), bits)
        ctx.bits, ctx.shape = bits, x.shape
        ctx.save_for_backward(packed, levels)
        return forward(x)

    @staticmethod
    @first_order_only("TraDySiLU / TraDyGELU / TraDyHardswish (backward_bits set)")
    def backward(ctx, grad_y):
        packed, levels = ctx.saved_tensors
        slope = decode_levels(packed, levels.to(grad_y.dtype), ctx.bits, ctx.shape)
        return grad_y * slope, None, None, None, None


def summed_input_bits(bits: int) -> int:
    """Bits of a tensor entering a sum over positions (a squeeze-excitation's x, a compact
    copy) in mode ``bits``: twice as many, at most 8.

    The gate's and the weights' gradients sum ``grad * x`` over the positions, where the
    terms largely cancel: measured on EfficientNet-B0 (bench/RESULTS.md), SE x in 4 bits
    gave a worst layer cosine of 0.985 at ``backward_bits=4``, in 8 bits 0.9999.
    """
    return min(8, 2 * bits)


def compress_channels(x: Tensor, bits: int, dim: int) -> tuple[Tensor, Tensor]:
    """A compact copy as ``bits``-bit codes with a (minimum, step) per channel (``dim``)."""
    moved = x.movedim(dim, 0).contiguous()
    return quantize_groups(moved, bits, max(1, moved[0].numel()))


def restore_channels(packed: Tensor, scales: Tensor, bits: int, shape, dim: int) -> Tensor:
    """Inverse of :func:`compress_channels` (``shape``: the compact copy's), contiguous."""
    moved_shape = (shape[dim],) + tuple(s for i, s in enumerate(shape) if i != dim % len(shape))
    return dequantize_groups(packed, scales, bits, moved_shape).movedim(0, dim).contiguous()


def compress(x: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor]:
    """What a compressed Function saves for ``x``: (packed codes, per-group scales)."""
    return quantize_groups(x.contiguous(), bits, group)


def restore(packed: Tensor, scales: Tensor, bits: int, shape) -> Tensor:
    """``x`` rebuilt from :func:`compress`'s tensors (in the scales' dtype)."""
    return dequantize_groups(packed, scales, bits, shape)


def set_backward_bits(model, bits: int | None, classifier: str | None = None) -> None:
    """Put the converted modules of ``model`` that can compress in exact or compressed mode.

    A squeeze-excitation's own activation stays exact: it acts on ``[N, C', 1, 1]``, so
    codes would save next to nothing, while its noise reaches every gate of the block.
    The ``classifier`` (trained in full, on a small input) keeps its input exact.
    """
    from .activations import TraDySqueezeExcitation, _SavedInputModule
    from .conv1d import TraDyConv1d
    from .hf_modules import ExactSelfAttention
    from .layers import TraDyConv2d, TraDyLinear
    from .transformer import TraDyAttention, TraDyLayerNorm, TraDyMultiheadAttention

    check_backward_bits(bits)
    inside_se = {id(m.activation) for m in model.modules() if isinstance(m, TraDySqueezeExcitation)}
    compressible = (_SavedInputModule, TraDySqueezeExcitation, TraDyAttention, TraDyLayerNorm,
                    TraDyMultiheadAttention, ExactSelfAttention)
    with_compact_copy = (TraDyConv2d, TraDyConv1d, TraDyLinear, TraDyMultiheadAttention)
    for name, module in model.named_modules():
        if isinstance(module, compressible):
            module.backward_bits = None if id(module) in inside_se else bits
        if isinstance(module, with_compact_copy):   # an MHA is both: qkv and in_proj's copy
            module.compact_bits = None if bits is None or name == classifier \
                else summed_input_bits(bits)


def backward_bits_of(model) -> int | None:
    """The compressed-mode bits of ``model``'s converted activations (None: exact)."""
    return next((m.backward_bits for m in model.modules()
                 if getattr(m, "backward_bits", None) is not None), None)
