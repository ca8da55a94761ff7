"""1x1 convolutions on the CPU path by the fastest of three exact forms, chosen per shape.

A 1x1 conv (stride 1, no padding, one group) of NCHW ``x`` is the matrix product ``W @ x``
over the channel axis. Three ways to compute it, none best everywhere (bench/RESULTS.md,
"1x1 convs per shape"):

* ``batched``: ``W @ x[n]`` as one batched GEMM over the images' planes, no copy. Fast on
  large planes (MobileNetV2 at 128x128: 2-3x faster than oneDNN), slow on tiny ones: a
  batch of 32 products of ``[C_out, C_in] @ [C_in, 4]`` costs more than one big product.
* ``flat``: one GEMM over the batch-flattened planes, ``W @ X`` with ``X = [C_in, N*H*W]``:
  two transposing copies (input and output), then one well-shaped product. Fast on small
  planes (EfficientNet-Lite0 at 40x40: 2x2-5x5 planes).
* ``aten``: ATen's own conv (oneDNN), and for the gradients ATen's backward.

Each op times the candidates once per (op, shapes, dtype, thread count) with the wall
clock and keeps the fastest, like ``cpu_depthwise.fastest``. ``TRADY_CPU_POINTWISE`` pins
the choice: ``timed`` (default), ``batched``, ``flat`` or ``aten``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .fastest import PathChooser, wall_time_ms

PATHS = ("timed", "batched", "flat", "aten")

__all__ = ["forward", "input_grad", "weight_grad_masked", "CHOOSER", "PATHS"]


CHOOSER = PathChooser(timer=wall_time_ms)


def _run(key: tuple, candidates: dict[str, Callable[[], Tensor]],
         chooser: PathChooser) -> Tensor:
    return chooser.run(key + (torch.get_num_threads(),), candidates, "TRADY_CPU_POINTWISE",
                       PATHS)


# ------------------------------------------------------------------ the matrix forms
def _batched_product(matrix: Tensor, x: Tensor) -> Tensor:
    """``matrix @ x[n]`` for every image, straight into a new NCHW tensor."""
    n, c, h, w = x.shape
    out = x.new_empty((n, matrix.shape[0], h, w))
    torch.matmul(matrix, x.view(n, c, h * w), out=out.view(n, matrix.shape[0], h * w))
    return out


def _flat_product(matrix: Tensor, x: Tensor) -> Tensor:
    """``matrix @ [C, N*H*W]`` in one GEMM, its result copied back to NCHW."""
    n, _, h, w = x.shape
    product = matrix @ _flat_planes(x)                           # [C_out, N*H*W]
    # copied into a new tensor, not .contiguous(): at N == 1 that would return a view
    out = x.new_empty((n, matrix.shape[0], h, w))
    return out.copy_(product.view(matrix.shape[0], n, h, w).transpose(0, 1))


def _flat_planes(t: Tensor) -> Tensor:
    """``[N, C, H, W] -> [C, N*H*W]`` (a copy)."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _scatter_columns(partial: Tensor, idx: Tensor, weight_shape) -> Tensor:
    """The dense ``[C_out, C_in, 1, 1]`` gradient with the columns ``idx`` filled."""
    grad_weight = partial.new_zeros(tuple(weight_shape))
    grad_weight.view(weight_shape[0], -1).index_copy_(1, idx.long(), partial)
    return grad_weight


def _add_bias(y: Tensor, bias: Tensor | None) -> Tensor:
    if bias is not None:
        y += bias.to(y.dtype).view(1, -1, 1, 1)
    return y


# ------------------------------------------------------------------ the three ops
def forward(x: Tensor, weight: Tensor, bias: Tensor | None,
            chooser: PathChooser = CHOOSER) -> Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1x1 ``weight`` (stride 1, no padding)."""
    matrix = weight.view(weight.shape[0], weight.shape[1])
    key = ("forward", tuple(x.shape), tuple(weight.shape), x.dtype)
    return _run(key, {
        "batched": lambda: _add_bias(_batched_product(matrix, x), bias),
        "flat": lambda: _add_bias(_flat_product(matrix, x), bias),
        "aten": lambda: F.conv2d(x, weight, bias)}, chooser)


def input_grad(x_shape, weight: Tensor, grad_y: Tensor,
               chooser: PathChooser = CHOOSER) -> Tensor:
    """dX of a 1x1 conv: ``W^T @ dY``."""
    matrix_t = weight.view(weight.shape[0], weight.shape[1]).t()
    key = ("input_grad", tuple(grad_y.shape), tuple(weight.shape), grad_y.dtype)
    return _run(key, {
        "batched": lambda: _batched_product(matrix_t, grad_y),
        "flat": lambda: _flat_product(matrix_t, grad_y),
        "aten": lambda: reference.conv2d_input_grad(x_shape, weight, grad_y, (1, 1), (0, 0),
                                                    (1, 1), 1)}, chooser)


def weight_grad_masked(x_compact: Tensor, grad_output: Tensor, idx: Tensor, weight_shape,
                       chooser: PathChooser = CHOOSER) -> Tensor:
    """The dense 1x1 weight gradient with only the input channels ``idx`` filled:
    ``sum_n dY[n] @ x_compact[n]^T`` (``x_compact = x[:, idx]``; ``idx`` distinct)."""
    n, c_out, h, w = grad_output.shape
    k = x_compact.shape[1]

    def batched():
        # the channel count spelled out: an empty batch cannot infer it from -1
        partial = torch.matmul(grad_output.view(n, c_out, h * w),
                               x_compact.view(n, k, h * w).transpose(1, 2)).sum(dim=0)
        return _scatter_columns(partial, idx, weight_shape)

    def flat():
        return _scatter_columns(_flat_planes(grad_output) @ _flat_planes(x_compact).t(), idx,
                                weight_shape)

    key = ("weight_grad", tuple(x_compact.shape), tuple(grad_output.shape), x_compact.dtype)
    return _run(key, {
        "batched": batched, "flat": flat,
        "aten": lambda: reference.conv2d_weight_grad_masked(
            x_compact, grad_output, idx, tuple(weight_shape), (1, 1), (0, 0), (1, 1), 1)},
        chooser)
