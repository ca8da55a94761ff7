"""MaxPool2d and AvgPool2d that keep the least for backward.

* ``MaxPoolCodes`` keeps, per output element, the position of the maximum inside its
  window in the fewest bits that pack evenly into bytes (1, 2, 4 or 8 bits: 4 bits
  for a 3x3 window) instead of PyTorch's int64 input indices (16x less for 3x3).
  Backward rebuilds the indices and calls ATen's own max-pool backward.
* ``AvgPoolNoSave`` keeps nothing: its backward needs only the input's shape.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.nn.modules.utils import _pair
from .first_order import first_order_only

_CODE_BITS = (1, 2, 4, 8)


def code_bits(window_positions: int) -> int | None:
    """Fewest bits in (1, 2, 4, 8) that number ``window_positions`` positions; None if > 256."""
    return next((b for b in _CODE_BITS if 2 ** b >= window_positions), None)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Flat uint8 tensor holding ``8 // bits`` codes per byte (lowest bits first)."""
    per_byte = 8 // bits
    flat = codes.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, per_byte) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_codes`: ``numel`` codes as int64."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed[:, None] >> shifts) & (2 ** bits - 1)
    return codes.reshape(-1)[:numel].long()


def _window_origin(out_size: int, stride: int, padding: int, device) -> Tensor:
    return torch.arange(out_size, device=device) * stride - padding


def _codes_from_indices(indices: Tensor, in_width: int, geometry) -> Tensor:
    """Flat input indices of ATen's max pool -> position inside each window."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry
    oh, ow = indices.shape[-2:]
    row0 = _window_origin(oh, sh, ph, indices.device)[:, None]
    col0 = _window_origin(ow, sw, pw, indices.device)[None, :]
    row_offset = (indices // in_width - row0) // dh
    col_offset = (indices % in_width - col0) // dw
    return row_offset * kw + col_offset


def _indices_from_codes(codes: Tensor, in_width: int, geometry) -> Tensor:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry
    oh, ow = codes.shape[-2:]
    row0 = _window_origin(oh, sh, ph, codes.device)[:, None]
    col0 = _window_origin(ow, sw, pw, codes.device)[None, :]
    return (row0 + (codes // kw) * dh) * in_width + col0 + (codes % kw) * dw


class MaxPoolCodes(Function):
    """MaxPool2d keeping each maximum's window position in ``bits`` bits."""

    @staticmethod
    def forward(ctx, x, geometry, ceil_mode, bits):
        kernel, stride, padding, dilation = geometry
        y, indices = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode,
                                  return_indices=True)
        codes = _codes_from_indices(indices, x.shape[-1], geometry)
        ctx.geometry, ctx.ceil_mode, ctx.bits = geometry, ceil_mode, bits
        ctx.x_shape, ctx.y_shape = x.shape, y.shape
        ctx.save_for_backward(pack_codes(codes, bits))
        return y

    @staticmethod
    @first_order_only("TraDyMaxPool2d")
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        codes = unpack_codes(packed, ctx.bits, grad_y.numel()).reshape(ctx.y_shape)
        indices = _indices_from_codes(codes, ctx.x_shape[-1], ctx.geometry)
        kernel, stride, padding, dilation = ctx.geometry
        shape_only = grad_y.new_empty(ctx.x_shape)   # ATen reads its shape, not its values
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
            grad_y, shape_only, kernel, stride, padding, dilation, ctx.ceil_mode, indices)
        return grad_x, None, None, None


class AvgPoolNoSave(Function):
    """AvgPool2d keeping nothing for backward."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override):
        ctx.args = (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
        ctx.x_shape = x.shape
        return F.avg_pool2d(x, *ctx.args)

    @staticmethod
    @first_order_only("TraDyAvgPool2d")
    def backward(ctx, grad_y):
        shape_only = grad_y.new_empty(ctx.x_shape)   # ATen reads its shape, not its values
        grad_x = torch.ops.aten.avg_pool2d_backward(grad_y.contiguous(), shape_only, *ctx.args)
        return grad_x, None, None, None, None, None, None


def max_pool_geometry(pool: nn.MaxPool2d):
    """(kernel, stride, padding, dilation) as int pairs; stride defaults to the kernel."""
    kernel = _pair(pool.kernel_size)
    stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    return kernel, stride, _pair(pool.padding), _pair(pool.dilation)


class TraDyMaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d (``return_indices=False``) keeping window codes."""

    def _trady_setup(self) -> None:
        kernel = max_pool_geometry(self)[0]
        self.code_bits = code_bits(kernel[0] * kernel[1])

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        if x.dim() == 3:   # unbatched [C, H, W]
            return self.forward(x.unsqueeze(0)).squeeze(0)
        return MaxPoolCodes.apply(x, max_pool_geometry(self), self.ceil_mode, self.code_bits)


class TraDyAvgPool2d(nn.AvgPool2d):
    """nn.AvgPool2d keeping nothing for backward."""

    def _trady_setup(self) -> None:
        pass

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        if x.dim() == 3:   # unbatched [C, H, W]
            return self.forward(x.unsqueeze(0)).squeeze(0)
        stride = self.stride if self.stride is not None else self.kernel_size
        return AvgPoolNoSave.apply(x, _pair(self.kernel_size), _pair(stride), _pair(self.padding),
                                   self.ceil_mode, self.count_include_pad, self.divisor_override)
