"""The kernels as PyTorch operators in the ``trady`` namespace (``torch.ops.trady.*``).

One dispatch mechanism, PyTorch's: each op is a ``torch.library.custom_op`` with a CPU
kernel and a CUDA kernel, plus a fake (meta) implementation giving output shapes,
dtypes and strides without running anything. ``torch.compile`` therefore traces a
converted model without graph breaks (an op is one opaque node; the data-dependent
index checks run inside it, never in the traced Python), and CUDA-graph capture sees
one launch sequence per op.

Which implementation a device's kernel calls is :func:`trady_triton.dispatch.ops_for`:
the Triton launchers of ``trady_triton.kernels`` on CUDA, ``dispatch.CPU_IMPL`` (plain
PyTorch) on CPU, and ``TRADY_BACKEND`` / ``set_backend`` still force either (tests run
the Triton kernels on CPU under ``TRITON_INTERPRET=1``). The Python functions below have
the signatures of ``reference.py`` and call the ops. On CUDA the conv (``groups == 1``)
and Linear weight gradients go through :mod:`trady_triton.fastest`, which picks per shape,
by timing once, between the Triton kernel and cuDNN / cuBLAS on the compact copy.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.library import custom_op

from . import fastest
from .dispatch import ops_for as impl_for, uses_triton



def _op(name: str):
    """``custom_op("trady::name")`` whose CPU and CUDA kernels are the decorated function.

    The devices are registered one at a time: with a list of ``device_types``, torch
    2.13's custom_op binds its loop variable late and sends every device to the last
    one's kernel.
    """
    def define(fn):
        op = custom_op(f"trady::{name}", fn, mutates_args=(), device_types="cpu")
        op.register_kernel("cuda", fn)
        return op
    return define


def _dense(x: Tensor) -> Tensor:
    """``x`` itself if contiguous or channels_last, else a contiguous copy.

    Both implementations keep these two layouts in their outputs; fixing the input
    to one of them makes the output strides the fake implementation predicts exact.
    """
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


def _mask_bytes(numel: int) -> int:
    return -(-numel // 8)


# ------------------------------------------------------------------ compaction
@_op("compact_channels")
def _compact_channels(x: Tensor, idx: Tensor, channel_dim: int) -> Tensor:
    return impl_for(x).compact_channels(x, idx, channel_dim)


@_compact_channels.register_fake
def _(x, idx, channel_dim):
    shape = list(x.shape)
    shape[channel_dim % x.dim()] = idx.shape[0]
    return x.new_empty(shape)


def compact_channels(x: Tensor, idx: Tensor, channel_dim: int) -> Tensor:
    """``x`` restricted to the channels ``idx`` along ``channel_dim``, contiguous."""
    return _compact_channels(x, idx, channel_dim)


# ------------------------------------------------------------ weight gradients
@_op("conv2d_weight_grad_masked")
def _conv2d_weight_grad_masked(x_compact: Tensor, grad_output: Tensor, idx: Tensor,
                               weight_shape: Sequence[int], stride: Sequence[int],
                               padding: Sequence[int], dilation: Sequence[int],
                               groups: int) -> Tensor:
    return impl_for(grad_output).conv2d_weight_grad_masked(
        x_compact, grad_output, idx, tuple(weight_shape), tuple(stride), tuple(padding),
        tuple(dilation), groups)


@_conv2d_weight_grad_masked.register_kernel("cuda")
def _(x_compact, grad_output, idx, weight_shape, stride, padding, dilation, groups):
    impl = impl_for(grad_output)
    args = (x_compact, grad_output, idx, tuple(weight_shape), tuple(stride), tuple(padding),
            tuple(dilation), groups)
    if not uses_triton(grad_output):      # backend("reference") forced on the GPU
        return impl.conv2d_weight_grad_masked(*args)
    return fastest.conv2d_weight_grad_masked(*args, kernels=impl)


@_conv2d_weight_grad_masked.register_fake
def _(x_compact, grad_output, idx, weight_shape, stride, padding, dilation, groups):
    return grad_output.new_empty(tuple(weight_shape))


def conv2d_weight_grad_masked(x_compact: Tensor, grad_output: Tensor, idx: Tensor,
                              weight_shape, stride, padding, dilation, groups: int) -> Tensor:
    """Dense conv weight gradient with only the input channels ``idx`` filled."""
    return _conv2d_weight_grad_masked(x_compact, grad_output, idx, list(weight_shape),
                                      list(stride), list(padding), list(dilation), groups)


@_op("linear_weight_grad_masked")
def _linear_weight_grad_masked(x_compact: Tensor, grad_output: Tensor, idx: Tensor,
                               in_features: int) -> Tensor:
    return impl_for(grad_output).linear_weight_grad_masked(x_compact, grad_output, idx,
                                                           in_features)


@_linear_weight_grad_masked.register_kernel("cuda")
def _(x_compact, grad_output, idx, in_features):
    impl = impl_for(grad_output)
    if not uses_triton(grad_output):
        return impl.linear_weight_grad_masked(x_compact, grad_output, idx, in_features)
    return fastest.linear_weight_grad_masked(x_compact, grad_output, idx, in_features,
                                             kernels=impl)


@_linear_weight_grad_masked.register_fake
def _(x_compact, grad_output, idx, in_features):
    return grad_output.new_empty((grad_output.shape[-1], in_features))


def linear_weight_grad_masked(x_compact: Tensor, grad_output: Tensor, idx: Tensor,
                              in_features: int) -> Tensor:
    """Dense Linear weight gradient ``[out, in]`` with only columns ``idx`` filled."""
    return _linear_weight_grad_masked(x_compact, grad_output, idx, in_features)


# ---------------------------------------------------------------- 1-bit masks
@_op("pack_mask")
def _pack_mask(passes: Tensor) -> Tensor:
    return impl_for(passes).pack_mask(passes)


@_pack_mask.register_fake
def _(passes):
    return passes.new_empty((_mask_bytes(passes.numel()),), dtype=torch.uint8)


def pack_mask(passes: Tensor) -> Tensor:
    """Pack a boolean tensor into ``ceil(numel / 8)`` bytes (little bit order)."""
    return _pack_mask(passes)


@_op("unpack_mask")
def _unpack_mask(packed: Tensor, numel: int) -> Tensor:
    return impl_for(packed).unpack_mask(packed, numel)


@_unpack_mask.register_fake
def _(packed, numel):
    return packed.new_empty((numel,), dtype=torch.bool)


def unpack_mask(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_mask`: a flat bool tensor of ``numel`` elements."""
    return _unpack_mask(packed, numel)


@_op("relu_forward_mask")
def _relu_forward_mask(x: Tensor, upper: Optional[float]) -> tuple[Tensor, Tensor]:
    return impl_for(x).relu_forward_mask(x, upper)


@_relu_forward_mask.register_fake
def _(x, upper):
    return torch.empty_like(x), x.new_empty((_mask_bytes(x.numel()),), dtype=torch.uint8)


def relu_forward_mask(x: Tensor, upper: float | None) -> tuple[Tensor, Tensor]:
    """ReLU (``upper=None``) or ReLU6-style clamp; returns (output, packed mask)."""
    return _relu_forward_mask(_dense(x), upper)


@_op("relu_backward_mask")
def _relu_backward_mask(grad_output: Tensor, packed: Tensor) -> Tensor:
    return impl_for(grad_output).relu_backward_mask(grad_output, packed)


@_relu_backward_mask.register_fake
def _(grad_output, packed):
    return torch.empty_like(grad_output)


def relu_backward_mask(grad_output: Tensor, packed: Tensor) -> Tensor:
    """``grad_output`` where the mask passes, 0 elsewhere (contiguous in and out)."""
    return _relu_backward_mask(grad_output.contiguous(), packed)


# --------------------------------------------------------- fused BN -> ReLU -> compact
@_op("affine_relu_compact")
def _affine_relu_compact(x: Tensor, scale: Tensor, shift: Tensor, upper: Optional[float],
                         idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return impl_for(x).affine_relu_compact(x, scale, shift, upper, idx)


@_affine_relu_compact.register_fake
def _(x, scale, shift, upper, idx):
    dtype = torch.promote_types(x.dtype, torch.promote_types(scale.dtype, shift.dtype))
    n, _, h, w = x.shape
    return (torch.empty_like(x, dtype=dtype),
            x.new_empty((_mask_bytes(x.numel()),), dtype=torch.uint8),
            x.new_empty((n, idx.shape[0], h, w), dtype=dtype))


def affine_relu_compact(x: Tensor, scale: Tensor, shift: Tensor, upper: float | None,
                        idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fused frozen BatchNorm -> ReLU/ReLU6 -> compaction of channels ``idx``."""
    return _affine_relu_compact(_dense(x), scale, shift, upper, idx)


OPS = {name: getattr(torch.ops.trady, name) for name in (
    "compact_channels", "conv2d_weight_grad_masked", "linear_weight_grad_masked", "pack_mask",
    "unpack_mask", "relu_forward_mask", "relu_backward_mask", "affine_relu_compact")}
