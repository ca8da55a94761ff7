"""Plain-PyTorch versions of every kernel: the CPU path and the test oracle.

Each function here has a Triton twin in ``trady_triton.kernels`` with the same
signature and the same result (up to float rounding). ``dispatch.py`` picks one.

Conventions shared with the kernels:

* ``idx`` is a 1-D int32/int64 tensor of selected input-channel indices, any
  order, no repeats (the sampler never draws a channel twice).
* The compact copy of a conv input keeps the layout ``[N, K, H, W]``; of a
  Linear input ``[..., K]`` (channel = last dim).
* A 1-bit mask is a flat uint8 tensor of ``ceil(numel / 8)`` bytes; bit ``j`` of
  byte ``i`` is element ``8 * i + j`` of the tensor in logical (row-major,
  NCHW) order. 1 means "the gradient passes".
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def compact_channels(x: Tensor, idx: Tensor, channel_dim: int) -> Tensor:
    """``x`` restricted to the channels ``idx`` along ``channel_dim``, contiguous."""
    return x.index_select(channel_dim, idx.long()).contiguous()


def conv2d_input_grad(x_shape, weight: Tensor, grad_output: Tensor, stride, padding,
                      dilation, groups: int) -> Tensor:
    """dX of a conv2d from W and dY alone.

    ``torch.nn.grad.conv2d_input`` passes an expanded (stride-0) stand-in for the input,
    which ``convolution_backward`` copies into a full-size contiguous tensor; an
    uninitialised one of the input's shape is neither read nor copied.
    """
    stand_in = grad_output.new_empty(x_shape)
    return torch.ops.aten.convolution_backward(
        grad_output, stand_in, weight, None, stride, padding, dilation, False, [0, 0], groups,
        [True, False, False])[0]


def conv2d_weight_grad_masked(
    x_compact: Tensor,
    grad_output: Tensor,
    idx: Tensor,
    weight_shape: tuple[int, int, int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> Tensor:
    """Dense conv weight gradient with only the input channels ``idx`` filled.

    ``x_compact`` is ``x[:, idx]``. The slices ``dW[:, c]`` of unselected input
    channels are exact zeros. Works for any ``groups``: input channel ``c``
    belongs to group ``c // (C / groups)`` and its gradient slice is
    ``dW[o, c % (C / groups)]`` for the output channels ``o`` of that group.
    """
    out_channels, in_per_group, kh, kw = weight_shape
    idx = idx.long()
    grad_weight = grad_output.new_zeros(weight_shape)
    if idx.numel() == 0:
        return grad_weight
    if groups == 1:
        partial = torch.nn.grad.conv2d_weight(
            x_compact, (out_channels, idx.numel(), kh, kw), grad_output,
            stride=stride, padding=padding, dilation=dilation, groups=1)
        grad_weight[:, idx] = partial
        return grad_weight
    # Grouped: pair each selected input channel with its group's output
    # channels and run one grouped weight-gradient with one group per channel.
    out_per_group = out_channels // groups
    group_of_channel = idx // in_per_group
    local_channel = idx % in_per_group
    out_index = (group_of_channel[:, None] * out_per_group
                 + torch.arange(out_per_group, device=idx.device)[None, :])   # [K, opg]
    grad_out_per_channel = grad_output.index_select(1, out_index.reshape(-1))
    partial = torch.nn.grad.conv2d_weight(
        x_compact, (idx.numel() * out_per_group, 1, kh, kw), grad_out_per_channel,
        stride=stride, padding=padding, dilation=dilation, groups=idx.numel())
    partial = partial.reshape(idx.numel(), out_per_group, kh, kw)
    grad_weight[out_index, local_channel[:, None]] = partial
    return grad_weight


def linear_weight_grad_masked(x_compact: Tensor, grad_output: Tensor, idx: Tensor,
                              in_features: int) -> Tensor:
    """Dense Linear weight gradient ``[out, in]`` with only columns ``idx`` filled."""
    out_features = grad_output.shape[-1]
    grad_weight = grad_output.new_zeros((out_features, in_features))
    if idx.numel() == 0:
        return grad_weight
    dy = grad_output.reshape(-1, out_features)
    xc = x_compact.reshape(-1, idx.numel())
    grad_weight[:, idx.long()] = dy.t() @ xc
    return grad_weight


def _bit_weights(device: torch.device) -> Tensor:
    return (2 ** torch.arange(8, device=device, dtype=torch.int32))


def pack_mask(passes: Tensor) -> Tensor:
    """Pack a boolean tensor into ``ceil(numel / 8)`` bytes (little bit order)."""
    flat = passes.reshape(-1)
    # numpy's packbits is one C loop, the CPU hot path; torch.compile cannot trace it.
    if flat.device.type == "cpu" and not torch.compiler.is_compiling():
        return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8).to(torch.int32) * _bit_weights(flat.device)
    return bits.sum(dim=1).to(torch.uint8)


def unpack_mask(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_mask`: a flat bool tensor of ``numel`` elements."""
    if packed.device.type == "cpu" and not torch.compiler.is_compiling():
        bits = np.unpackbits(packed.numpy(), count=numel, bitorder="little")
        return torch.from_numpy(bits).view(torch.bool)
    bits = (packed.to(torch.int32)[:, None] & _bit_weights(packed.device)) != 0
    return bits.reshape(-1)[:numel]


def relu_forward_mask(x: Tensor, upper: float | None) -> tuple[Tensor, Tensor]:
    """ReLU (``upper=None``) or ReLU6-style clamp; returns (output, packed mask).

    The mask says where the derivative is 1. At NaN inputs we follow PyTorch's
    vectorised CPU/CUDA kernels: ReLU passes the gradient (``not x <= 0``),
    ReLU6 blocks it (``0 < x < upper``). (PyTorch's scalar tail loop for
    tensors of under ~8 elements passes it for ReLU6 too; we do not copy that.)
    At the kinks the derivative is 0, as in PyTorch.
    """
    if upper is None:
        y = F.relu(x)
        passes = ~(x <= 0)
    else:
        y = F.hardtanh(x, 0.0, upper)
        passes = (x > 0) & (x < upper)
    return y, pack_mask(passes)


# Integer type of each float's width: the CPU backward masks with a bitwise AND.
_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64,
                   torch.float16: torch.int16, torch.bfloat16: torch.int16}


def relu_backward_mask(grad_output: Tensor, packed: Tensor) -> Tensor:
    """``grad_output`` where the mask passes, 0 elsewhere (NaN and inf blocked too)."""
    passes = unpack_mask(packed, grad_output.numel()).reshape(grad_output.shape)
    int_dtype = _SAME_WIDTH_INT.get(grad_output.dtype)
    if grad_output.device.type == "cpu" and int_dtype is not None \
            and not torch.compiler.is_compiling():
        # torch.where is ~6x slower on CPU than an AND of the float's bits with 0 or -1:
        # the same result bit for bit (blocked elements become +0.0, passed ones keep
        # their bits, NaN included)
        keep = passes.view(torch.uint8).to(int_dtype).neg_()
        bits = grad_output.contiguous().view(int_dtype) & keep
        return bits.view(grad_output.dtype)
    return torch.where(passes, grad_output, torch.zeros((), dtype=grad_output.dtype,
                                                         device=grad_output.device))


def mask_scale_backward(grad_output: Tensor, packed: Tensor, scale: Tensor | None) -> Tensor:
    """The backward of frozen BN -> ReLU/ReLU6: the mask, then BN's per-channel ``scale``.

    ``scale=None`` is :func:`relu_backward_mask`; otherwise ``grad_output`` is at least
    2-D with channels on axis 1.
    """
    grad = relu_backward_mask(grad_output, packed)
    if scale is None:
        return grad
    return grad * scale.to(grad.dtype).reshape((1, -1) + (1,) * (grad.dim() - 2))


def affine_clamp_mask(x: Tensor, scale: Tensor, shift: Tensor,
                      upper: float | None) -> tuple[Tensor, Tensor]:
    """Frozen BatchNorm -> ReLU/ReLU6 (channels on axis 1); returns (output, packed mask)."""
    per_channel = (1, -1) + (1,) * (x.dim() - 2)
    # the same single op as the unfused FrozenAffine, so fused and unfused agree exactly
    pre = torch.addcmul(shift.reshape(per_channel), x, scale.reshape(per_channel))
    return relu_forward_mask(pre, upper)


def affine_relu_compact(x: Tensor, scale: Tensor, shift: Tensor, upper: float | None,
                        idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fused frozen BatchNorm -> ReLU/ReLU6 -> compaction of channels ``idx``.

    ``x`` is ``[N, C, H, W]``; ``scale``/``shift`` are per-channel ``[C]``
    (``y = relu(x * scale + shift)``). Returns (output, packed mask, compact copy of
    the output's channels ``idx``).
    """
    y, packed = affine_clamp_mask(x, scale, shift, upper)
    return y, packed, compact_channels(y, idx, 1)
