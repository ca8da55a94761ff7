"""The kernels as PyTorch operators in the ``trady`` namespace (``torch.ops.trady.*``).

One dispatch mechanism, PyTorch's: each op is defined by a schema in a
``torch.library.Library`` with a CPU kernel, a CUDA kernel and a fake (meta)
implementation giving output shapes, dtypes and strides without running anything.
``torch.compile`` therefore traces a converted model without graph breaks (an op is one
opaque node; any data-dependent work runs inside it, never in traced Python), and
CUDA-graph capture sees a fixed launch sequence per op. Eager calls skip the
dispatcher and run the same device kernel directly (see :class:`_Op`); a
``torch.library.custom_op`` would cost several times more host time per call
(``bench/op_overhead.py``).

Which implementation a device's kernel calls is :func:`trady_triton.dispatch.ops_for`:
the Triton launchers of ``trady_triton.kernels`` on CUDA, ``dispatch.CPU_IMPL`` (plain
PyTorch) on CPU, and ``TRADY_BACKEND`` / ``set_backend`` still force either (tests run
the Triton kernels on CPU under ``TRITON_INTERPRET=1``). On CUDA the conv (``groups ==
1``) and Linear weight gradients go through :mod:`trady_triton.fastest`, which picks per
shape, by timing once, between the Triton kernel and cuDNN / cuBLAS on the compact copy.
The Python functions below have the signatures of ``reference.py`` and call the ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import fastest
from .dispatch import ops_for as impl_for, uses_triton

_LIB = torch.library.Library("trady", "FRAGMENT")


class _Op:
    """``trady::<schema>`` defined with ``kernel`` on CPU (and CUDA unless given apart).

    Calling it while torch.compile / torch.export traces records the op; an eager call
    runs the same device kernel directly, since the dispatcher's trip into a Python
    kernel costs more host time than the kernel's own launcher (``bench/op_overhead.py``).
    """

    def __init__(self, schema: str, kernel, fake, cuda_kernel=None):
        name = schema.split("(", 1)[0]
        _LIB.define(schema)
        _LIB.impl(name, kernel, "CPU")
        _LIB.impl(name, cuda_kernel or kernel, "CUDA")
        torch.library.register_fake(f"trady::{name}", fake, lib=_LIB)
        self.op = getattr(torch.ops.trady, name).default
        self.kernel, self.cuda_kernel = kernel, cuda_kernel or kernel

    def __call__(self, first: Tensor, *args):
        if torch.compiler.is_compiling():
            return self.op(first, *args)
        if first.device.type not in ("cpu", "cuda"):   # meta / fake tensors: their kernels
            return self.op(first, *args)
        return (self.cuda_kernel if first.is_cuda else self.kernel)(first, *args)


_define = _Op


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
def _compact_fake(x, idx, channel_dim):
    shape = list(x.shape)
    shape[channel_dim % x.dim()] = idx.shape[0]
    return x.new_empty(shape)


_compact = _define("compact_channels(Tensor x, Tensor idx, int channel_dim) -> Tensor",
                   lambda x, idx, dim: impl_for(x).compact_channels(x, idx, dim), _compact_fake)


def compact_channels(x: Tensor, idx: Tensor, channel_dim: int) -> Tensor:
    """``x`` restricted to the channels ``idx`` along ``channel_dim``, contiguous."""
    return _compact(x, idx, channel_dim)


# ------------------------------------------------------------ weight gradients
def _conv_wgrad(x_compact, grad_output, idx, weight_shape, stride, padding, dilation, groups):
    return impl_for(grad_output).conv2d_weight_grad_masked(
        x_compact, grad_output, idx, tuple(weight_shape), tuple(stride), tuple(padding),
        tuple(dilation), groups)


def _conv_wgrad_cuda(x_compact, grad_output, idx, weight_shape, stride, padding, dilation,
                     groups):
    if not uses_triton(grad_output):      # backend("reference") forced on the GPU
        return _conv_wgrad(x_compact, grad_output, idx, weight_shape, stride, padding,
                           dilation, groups)
    return fastest.conv2d_weight_grad_masked(
        x_compact, grad_output, idx, tuple(weight_shape), tuple(stride), tuple(padding),
        tuple(dilation), groups, kernels=impl_for(grad_output))


_conv_wgrad_op = _define(
    "conv2d_weight_grad_masked(Tensor x_compact, Tensor grad_output, Tensor idx, "
    "int[] weight_shape, int[] stride, int[] padding, int[] dilation, int groups) -> Tensor",
    _conv_wgrad, lambda xc, dy, idx, shape, *_: dy.new_empty(tuple(shape)), _conv_wgrad_cuda)


def conv2d_weight_grad_masked(x_compact: Tensor, grad_output: Tensor, idx: Tensor,
                              weight_shape, stride, padding, dilation, groups: int) -> Tensor:
    """Dense conv weight gradient with only the input channels ``idx`` filled."""
    return _conv_wgrad_op(x_compact, grad_output, idx, list(weight_shape), list(stride),
                          list(padding), list(dilation), groups)


def _linear_wgrad(x_compact, grad_output, idx, in_features):
    return impl_for(grad_output).linear_weight_grad_masked(x_compact, grad_output, idx,
                                                           in_features)


def _linear_wgrad_cuda(x_compact, grad_output, idx, in_features):
    if not uses_triton(grad_output):
        return _linear_wgrad(x_compact, grad_output, idx, in_features)
    return fastest.linear_weight_grad_masked(x_compact, grad_output, idx, in_features,
                                             kernels=impl_for(grad_output))


_linear_wgrad_op = _define(
    "linear_weight_grad_masked(Tensor x_compact, Tensor grad_output, Tensor idx, "
    "int in_features) -> Tensor",
    _linear_wgrad, lambda xc, dy, idx, n: dy.new_empty((dy.shape[-1], n)), _linear_wgrad_cuda)


def linear_weight_grad_masked(x_compact: Tensor, grad_output: Tensor, idx: Tensor,
                              in_features: int) -> Tensor:
    """Dense Linear weight gradient ``[out, in]`` with only columns ``idx`` filled."""
    return _linear_wgrad_op(x_compact, grad_output, idx, in_features)


# ---------------------------------------------------------------- 1-bit masks
_pack = _define("pack_mask(Tensor passes) -> Tensor",
                lambda passes: impl_for(passes).pack_mask(passes),
                lambda passes: passes.new_empty((_mask_bytes(passes.numel()),),
                                                dtype=torch.uint8))


def pack_mask(passes: Tensor) -> Tensor:
    """Pack a boolean tensor into ``ceil(numel / 8)`` bytes (little bit order)."""
    return _pack(passes)


_unpack = _define("unpack_mask(Tensor packed, int numel) -> Tensor",
                  lambda packed, numel: impl_for(packed).unpack_mask(packed, numel),
                  lambda packed, numel: packed.new_empty((numel,), dtype=torch.bool))


def unpack_mask(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_mask`: a flat bool tensor of ``numel`` elements."""
    return _unpack(packed, numel)


_relu_fwd = _define(
    "relu_forward_mask(Tensor x, float? upper) -> (Tensor, Tensor)",
    lambda x, upper: impl_for(x).relu_forward_mask(x, upper),
    lambda x, upper: (torch.empty_like(x),
                      x.new_empty((_mask_bytes(x.numel()),), dtype=torch.uint8)))


def relu_forward_mask(x: Tensor, upper: float | None) -> tuple[Tensor, Tensor]:
    """ReLU (``upper=None``) or ReLU6-style clamp; returns (output, packed mask)."""
    return _relu_fwd(_dense(x), upper)


_relu_bwd = _define(
    "relu_backward_mask(Tensor grad_output, Tensor packed) -> Tensor",
    lambda grad_output, packed: impl_for(grad_output).relu_backward_mask(grad_output, packed),
    lambda grad_output, packed: torch.empty_like(grad_output))


def relu_backward_mask(grad_output: Tensor, packed: Tensor) -> Tensor:
    """``grad_output`` where the mask passes, 0 elsewhere (contiguous in and out)."""
    return _relu_bwd(grad_output.contiguous(), packed)


# --------------------------------------------------------- fused BN -> ReLU -> compact
def _affine_relu_compact_fake(x, scale, shift, upper, idx):
    dtype = torch.promote_types(x.dtype, torch.promote_types(scale.dtype, shift.dtype))
    n, _, h, w = x.shape
    return (torch.empty_like(x, dtype=dtype),
            x.new_empty((_mask_bytes(x.numel()),), dtype=torch.uint8),
            x.new_empty((n, idx.shape[0], h, w), dtype=dtype))


_fused = _define(
    "affine_relu_compact(Tensor x, Tensor scale, Tensor shift, float? upper, Tensor idx) "
    "-> (Tensor, Tensor, Tensor)",
    lambda x, scale, shift, upper, idx: impl_for(x).affine_relu_compact(x, scale, shift,
                                                                        upper, idx),
    _affine_relu_compact_fake)


def affine_relu_compact(x: Tensor, scale: Tensor, shift: Tensor, upper: float | None,
                        idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fused frozen BatchNorm -> ReLU/ReLU6 -> compaction of channels ``idx``."""
    return _fused(_dense(x), scale, shift, upper, idx)


# ------------------------------------------- frozen BN -> ReLU, no compact copy (CPU path)
def _affine_clamp_mask(x, scale, shift, upper):
    impl = impl_for(x)
    if hasattr(impl, "affine_clamp_mask"):   # one pass (CPU implementations)
        return impl.affine_clamp_mask(x, scale, shift, upper)
    # the Triton kernels (autograd uses this op only where has_affine_clamp): two passes,
    # the same addcmul as FrozenAffine, so the result is the same
    per_channel = (1, -1) + (1,) * (x.dim() - 2)
    pre = torch.addcmul(shift.reshape(per_channel), x, scale.reshape(per_channel))
    return impl.relu_forward_mask(pre, upper)


_affine_clamp = _define(
    "affine_clamp_mask(Tensor x, Tensor scale, Tensor shift, float? upper) -> (Tensor, Tensor)",
    _affine_clamp_mask,
    lambda x, scale, shift, upper: (
        torch.empty_like(x, dtype=torch.promote_types(x.dtype, scale.dtype)),
        x.new_empty((_mask_bytes(x.numel()),), dtype=torch.uint8)))


def affine_clamp_mask(x: Tensor, scale: Tensor, shift: Tensor,
                      upper: float | None) -> tuple[Tensor, Tensor]:
    """Frozen BatchNorm -> ReLU/ReLU6 in one pass; returns (output, packed mask)."""
    return _affine_clamp(_dense(x), scale, shift, upper)


def _mask_scale_backward(grad_output, packed, scale):
    impl = impl_for(grad_output)
    if hasattr(impl, "mask_scale_backward"):   # one pass (CPU implementations)
        return impl.mask_scale_backward(grad_output, packed, scale)
    grad = impl.relu_backward_mask(grad_output, packed)   # the Triton kernels: two passes
    if scale is None:
        return grad
    return grad * scale.to(grad.dtype).reshape((1, -1) + (1,) * (grad.dim() - 2))


_mask_scale = _define(
    "mask_scale_backward(Tensor grad_output, Tensor packed, Tensor? scale) -> Tensor",
    _mask_scale_backward,
    lambda grad_output, packed, scale: torch.empty_like(grad_output))


def mask_scale_backward(grad_output: Tensor, packed: Tensor, scale: Tensor | None) -> Tensor:
    """Backward of frozen BN -> ReLU/ReLU6: the 1-bit mask, then BN's per-channel scale."""
    return _mask_scale(grad_output.contiguous(), packed, scale)


OPS = {name: getattr(torch.ops.trady, name) for name in (
    "compact_channels", "conv2d_weight_grad_masked", "linear_weight_grad_masked", "pack_mask",
    "unpack_mask", "relu_forward_mask", "relu_backward_mask", "affine_relu_compact",
    "affine_clamp_mask", "mask_scale_backward")}
