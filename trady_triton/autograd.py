"""The torch.autograd.Functions of TraDy: what each layer saves, what backward computes.

What is saved for backward, per Function (parameters and buffers of the model
are already resident and cost nothing extra):

* ``SelectedConv2d`` / ``SelectedLinear``: the compact copy ``x[:, idx]`` of
  the selected input channels (or ``x`` itself when every channel is selected).
* ``FrozenConv2d`` / ``FrozenLinear``: nothing but the weight (dX needs only W).
* ``FrozenAffine`` (BatchNorm with frozen statistics): nothing but its buffers.
* ``MaskedClamp`` (ReLU / ReLU6): a 1-bit packed mask.
* ``FusedAffineClamp``: BN -> ReLU/ReLU6 in one pass; also emits the compact
  copy that the following conv/linear saves.
* ``AffineClamp`` (CPU): BN -> ReLU/ReLU6 in one pass when no compact copy is
  needed; a 1-bit mask.

Kernels are the ``torch.ops.trady`` ops of ``ops.py``: Triton on CUDA, ``cpu_kernels.py`` on
CPU (``reference.py`` with the ``reference`` backend).

Every backward is first-order only (``@first_order_only``, see ``first_order.py``):
run with ``create_graph=True`` it raises an error naming the layer.

Mixed precision: inside ``torch.autocast`` the conv / linear of a forward runs
in the autocast dtype (autocast stays on inside a Function's forward). The
saved activation is stored in the dtype the op actually computed in (the
output's dtype), and backward casts the (resident) weight to the incoming
gradient's dtype, as autocast's own ops do; autograd casts each returned
gradient back to its input's dtype (float32 weights get float32 gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from . import ops
from .compressed import compress_channels, restore_channels
from .dispatch import ops_for
from .first_order import first_order_only


def _all_channels(idx: Tensor, channels: int) -> bool:
    return idx.numel() == channels


def _as(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` in ``dtype`` (no copy when it already is): autocast's compute dtype."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _conv2d_input_grad(x_shape, weight: Tensor, grad_y: Tensor, conv: tuple) -> Tensor:
    """dX of a conv2d from W and dY alone.

    ``torch.nn.grad.conv2d_input`` passes an expanded (stride-0) stand-in for the input,
    which ``convolution_backward`` copies into a full-size contiguous tensor; an
    uninitialised one of the input's shape is neither read nor copied.
    """
    stride, padding, dilation, groups = conv
    stand_in = grad_y.new_empty(x_shape)
    return torch.ops.aten.convolution_backward(
        grad_y, stand_in, weight, None, stride, padding, dilation, False, [0, 0], groups,
        [True, False, False])[0]


class SelectedConv2d(Function):
    """Conv2d whose weight gradient is computed for input channels ``idx`` only."""

    @staticmethod
    def forward(ctx, x, weight, bias, idx, stride, padding, dilation, groups, x_compact,
                bits=None):
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.x_shape = x.shape
        ctx.full = _all_channels(idx, x.shape[1])
        if ctx.needs_input_grad[1]:
            if ctx.full:
                saved = x
            elif x_compact is not None:   # produced by a fused upstream kernel
                saved = x_compact
            else:
                saved = ops.compact_channels(x, idx, 1)
            saved = _as(saved, y.dtype)   # autocast: keep what the conv computed with
        else:
            saved = None
        ctx.save_for_backward(*_compact_kept(ctx, saved, bits, 1), weight, idx)
        return y

    @staticmethod
    @first_order_only("TraDyConv2d (a converted nn.Conv2d, trained channels)")
    def backward(ctx, grad_y):
        saved, scales, weight, idx = ctx.saved_tensors
        saved = _compact_restored(ctx, saved, scales, 1)
        stride, padding, dilation, groups = ctx.conv
        weight = _as(weight, grad_y.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _conv2d_input_grad(ctx.x_shape, weight, grad_y, ctx.conv)
        if ctx.needs_input_grad[1]:
            if ctx.full:
                grad_w = torch.nn.grad.conv2d_weight(saved, weight.shape, grad_y, stride,
                                                     padding, dilation, groups)
            else:
                grad_w = ops.conv2d_weight_grad_masked(
                    saved, grad_y, idx, tuple(weight.shape), stride, padding, dilation, groups)
        if ctx.needs_input_grad[2]:
            grad_b = grad_y.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


class FrozenConv2d(Function):
    """Conv2d with a frozen weight: saves no activation, returns only dX."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.conv = (stride, padding, dilation, groups)
        ctx.x_shape = x.shape
        ctx.save_for_backward(weight)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @first_order_only("TraDyConv2d (a converted nn.Conv2d, frozen)")
    def backward(ctx, grad_y):
        (weight,) = ctx.saved_tensors
        weight = _as(weight, grad_y.dtype)
        grad_x = _conv2d_input_grad(ctx.x_shape, weight, grad_y, ctx.conv)
        grad_b = grad_y.sum(dim=(0, 2, 3)) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b, None, None, None, None


class SelectedLinear(Function):
    """Linear whose weight gradient is computed for input features ``idx`` only."""

    @staticmethod
    def forward(ctx, x, weight, bias, idx, x_compact, bits=None):
        y = F.linear(x, weight, bias)
        ctx.full = _all_channels(idx, x.shape[-1])
        if ctx.needs_input_grad[1]:
            if ctx.full:
                saved = x
            elif x_compact is not None:
                saved = x_compact
            else:
                saved = ops.compact_channels(x, idx, x.dim() - 1)
            saved = _as(saved, y.dtype)
        else:
            saved = None
        ctx.save_for_backward(*_compact_kept(ctx, saved, bits, -1), weight, idx)
        return y

    @staticmethod
    @first_order_only("TraDyLinear (a converted nn.Linear, trained features)")
    def backward(ctx, grad_y):
        saved, scales, weight, idx = ctx.saved_tensors
        saved = _compact_restored(ctx, saved, scales, -1)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ _as(weight, grad_y.dtype)
        if ctx.needs_input_grad[1]:
            if ctx.full:
                grad_w = grad_y.reshape(-1, grad_y.shape[-1]).t() @ saved.reshape(-1, saved.shape[-1])
            else:
                grad_w = ops.linear_weight_grad_masked(saved, grad_y, idx,
                                                                   weight.shape[1])
        if ctx.needs_input_grad[2]:
            grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(dim=0)
        return grad_x, grad_w, grad_b, None, None, None


def _compact_kept(ctx, saved: Tensor | None, bits: int | None, dim: int) -> tuple:
    """(kept, scales) for the compact copy: itself, or its compressed-mode codes."""
    ctx.compact_bits = bits if saved is not None else None
    if ctx.compact_bits is None:
        return saved, None
    ctx.compact_shape = saved.shape
    return compress_channels(saved, bits, dim)


def _compact_restored(ctx, kept: Tensor | None, scales: Tensor | None, dim: int):
    if ctx.compact_bits is None:
        return kept
    return restore_channels(kept, scales, ctx.compact_bits, ctx.compact_shape, dim)


class FrozenLinear(Function):
    """Linear with a frozen weight: saves no activation."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)

    @staticmethod
    @first_order_only("TraDyLinear (a converted nn.Linear, frozen)")
    def backward(ctx, grad_y):
        (weight,) = ctx.saved_tensors
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(dim=0) if ctx.needs_input_grad[2] else None
        return grad_y @ _as(weight, grad_y.dtype), None, grad_b


def frozen_bn_scale_shift(weight, bias, running_mean, running_var, eps, dtype):
    """Per-channel (scale, shift) of a BatchNorm with frozen statistics, in ``dtype``."""
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return scale.to(dtype), shift.to(dtype)


def _per_channel(v: Tensor, ndim: int) -> Tensor:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


class FrozenAffine(Function):
    """BatchNorm with frozen statistics and parameters: y = x * scale + shift.

    ``scale`` and ``shift`` are per-channel tensors in x's dtype, owned by the BN
    module (cached there while its parameters and statistics are unchanged).
    Backward needs only ``scale``: it is kept as a reference on ``ctx``, not saved
    for backward, since the module holds it anyway (like a parameter); nothing of
    the size of x is kept.
    """

    @staticmethod
    def forward(ctx, x, scale, shift):
        ctx.scale = scale
        # one kernel: shift + x * scale
        return torch.addcmul(_per_channel(shift, x.dim()), x, _per_channel(scale, x.dim()))

    @staticmethod
    @first_order_only("TraDyBatchNorm2d (a converted nn.BatchNorm2d)")
    def backward(ctx, grad_y):
        return grad_y * _per_channel(ctx.scale.to(grad_y.dtype), grad_y.dim()), None, None


class MaskedClamp(Function):
    """ReLU (``upper=None``) or ReLU6 that keeps a 1-bit mask for backward."""

    @staticmethod
    def forward(ctx, x, upper, inplace):
        y, packed = ops.relu_forward_mask(x, upper)
        ctx.shape = x.shape
        ctx.save_for_backward(packed)
        if inplace:
            x.copy_(y)
            ctx.mark_dirty(x)
            return x
        return y

    @staticmethod
    @first_order_only("TraDyReLU / TraDyReLU6 (a converted nn.ReLU / nn.ReLU6)")
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        return ops.relu_backward_mask(grad_y, packed), None, None


class FusedAffineClamp(Function):
    """Frozen BN -> ReLU/ReLU6, also emitting the compact copy of channels ``idx``.

    Outputs (y, y[:, idx]); the compact copy is not differentiable: it is only
    what the next conv saves for its weight gradient. Saves the 1-bit mask; the
    BN's ``scale`` (module-owned, see :class:`FrozenAffine`) is kept on ``ctx``.
    """

    @staticmethod
    def forward(ctx, x, scale, shift, upper, idx):
        y, packed, compact = ops.affine_relu_compact(x, scale, shift, upper, idx)
        ctx.mark_non_differentiable(compact)
        ctx.scale = scale
        ctx.save_for_backward(packed)
        return y, compact

    @staticmethod
    @first_order_only("TraDyBatchNorm2d fused with the following TraDyReLU / TraDyReLU6")
    def backward(ctx, grad_y, _grad_compact):
        (packed,) = ctx.saved_tensors
        return _mask_scale_backward(grad_y, packed, ctx.scale), None, None, None, None


def has_affine_clamp(x: Tensor) -> bool:
    """Whether ``x``'s kernels fuse frozen BN -> ReLU/ReLU6 without a compact copy."""
    return hasattr(ops_for(x), "affine_clamp_mask")


class AffineClamp(Function):
    """Frozen BN -> ReLU/ReLU6 in one pass (no compact copy): saves the 1-bit mask.

    Only for kernels with ``affine_clamp_mask`` (see :func:`has_affine_clamp`).
    """

    @staticmethod
    def forward(ctx, x, scale, shift, upper):
        y, packed = ops.affine_clamp_mask(x, scale, shift, upper)
        ctx.scale = scale
        ctx.save_for_backward(packed)
        return y

    @staticmethod
    @first_order_only("TraDyBatchNorm2d fused with the ReLU/ReLU6 after it")
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        return _mask_scale_backward(grad_y, packed, ctx.scale), None, None, None


def _mask_scale_backward(grad_y: Tensor, packed: Tensor, scale: Tensor) -> Tensor:
    """The mask, then the frozen BN's scale: one pass where the kernels fuse them."""
    return ops.mask_scale_backward(grad_y, packed, scale)
