"""Fast CPU versions of the elementwise TraDy ops: one pass per activation (numba).

The plain-PyTorch versions in ``reference.py`` make one full-size pass (and often one
full-size temporary) per torch op: the BN's ``addcmul``, the clamp, two comparisons, an
AND, ``numpy.packbits``; in backward an unpack, a negation, an AND and the BN scale's
multiplication. Here each is one loop over the activation that reads the input once and
writes the output and the 1-bit mask (forward) or the gradient (backward), compiled by
numba and split over torch's intra-op thread count.

Same signatures and results as ``reference.py`` (tests/test_cpu_kernels.py compares them
bit for bit on the masks and outputs): ``relu_forward_mask``, ``relu_backward_mask``,
``affine_relu_compact``; plus the fused ``affine_clamp_mask`` (frozen BN -> ReLU/ReLU6
-> mask, no compact copy) and ``mask_scale_backward`` (mask and BN scale applied to the
gradient in one pass), whose readable twins are in ``reference.py``. Inputs these loops
do not serve (half precision, non-contiguous tensors, no numba) go to ``reference.py``.

Pointwise (1x1, stride 1, no padding, one group) convolutions, the bulk of a MobileNet's
FLOPs, run in forward, dX and the masked dW by the fastest for their shape of a batched
GEMM ``W @ x[n]``, one GEMM over the batch-flattened planes and oneDNN's conv
(``cpu_pointwise.py``; the first is about 2x faster than oneDNN on large planes, the
others win on planes of 5x5 and below). Depthwise convolutions (forward, dX, masked dW) run by the loops
of ``cpu_depthwise.py`` or by ATen, whichever was faster when first timed for the shape.
Other convolutions are ATen's.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_depthwise, cpu_pointwise, reference
from .numba_builds import compiled_builds as _compiled, run as _run
# the ops with no faster CPU loop here are the reference's own
from .reference import linear_weight_grad_masked, pack_mask, unpack_mask  # noqa: F401

try:
    import numba
    from numba import njit, prange
except ImportError:   # numba is a dependency; without it every op here is the reference's
    numba = None

__all__ = ["compact_channels", "conv2d_weight_grad_masked", "linear_weight_grad_masked",
           "relu_forward_mask", "relu_backward_mask", "affine_relu_compact",
           "affine_clamp_mask", "mask_scale_backward", "available", "conv2d", "conv2d_input_grad"]

_FLOATS = (torch.float32, torch.float64)
_CHUNK_BYTES = 2048          # mask bytes per parallel task (16,384 elements)
_NO_UPPER = float("inf")     # ReLU: no upper clamp
_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def available(x: Tensor) -> bool:
    """Whether the one-pass loops serve ``x`` (else the reference does the work)."""
    return (numba is not None and x.device.type == "cpu" and x.dtype in _FLOATS
            and x.is_contiguous() and x.numel() > 0 and not torch.compiler.is_compiling())


def _layout(x: Tensor) -> tuple[int, int]:
    """(elements per channel plane, channels) of the per-channel axis 1 (1 plane if < 2-D)."""
    if x.dim() < 2:
        return max(x.numel(), 1), 1
    return max(math.prod(x.shape[2:]), 1), x.shape[1]


if numba is not None:
    @njit(inline="always")
    def _clamp_run(x, y, scale, shift, affine, zero, upper):
        """y = clamp(x * scale + shift) over one channel's run: torch's -0.0 and NaN."""
        if affine:
            for i in range(x.size):
                v = x[i] * scale + shift
                y[i] = zero if v < 0 else (upper if v > upper else v)
        else:
            for i in range(x.size):
                v = x[i]
                y[i] = zero if v < 0 else (upper if v > upper else v)

    @njit(inline="always")
    def _pack_run(y, packed, relu, upper):
        """Bits of ``y``, read from the clamped output: ReLU passes where not y <= 0 (NaN
        passes), ReLU6 where 0 < y < upper."""
        for b in range(packed.size):
            byte = np.uint8(0)
            for j in range(min(8, y.size - 8 * b)):
                v = y[8 * b + j]
                bit = (not v <= 0) if relu else (v > 0 and v < upper)
                byte |= np.uint8(bit) << np.uint8(j)
            packed[b] = byte

    @njit(inline="always")
    def _and_run(grad_bits, packed, out_bits, one):
        """out = grad where the bit passes, +0.0 elsewhere: an AND of the float's bits
        with 0 or -1 (``one`` is 1 in their same-width integer type). NaN kept."""
        for b in range(packed.size):
            byte = packed[b]
            for j in range(min(8, grad_bits.size - 8 * b)):
                keep = -(one * ((byte >> np.uint8(j)) & np.uint8(1)))
                out_bits[8 * b + j] = grad_bits[8 * b + j] & keep

    def _affine_clamp_pack_loop(x, scale, shift, affine, zero, upper, y, packed, plane, channels):
        n = x.size
        relu = upper == _NO_UPPER
        chunk = 8 * _CHUNK_BYTES
        for task in prange((n + chunk - 1) // chunk):
            first = task * chunk
            stop = min(first + chunk, n)
            e = first
            while e < stop:                     # one run per channel plane met in the chunk
                plane_index = e // plane
                run_stop = min(stop, (plane_index + 1) * plane)
                c = plane_index % channels
                _clamp_run(x[e:run_stop], y[e:run_stop], scale[c], shift[c], affine, zero,
                           upper)
                e = run_stop
            _pack_run(y[first:stop], packed[first // 8:(stop + 7) // 8], relu, upper)

    def _mask_scale_loop(grad_bits, packed, scale, scaled, one, out, out_bits, plane, channels):
        n = grad_bits.size
        chunk = 8 * _CHUNK_BYTES
        for task in prange((n + chunk - 1) // chunk):
            first = task * chunk
            stop = min(first + chunk, n)
            _and_run(grad_bits[first:stop], packed[first // 8:(stop + 7) // 8],
                     out_bits[first:stop], one)
            e = first
            while scaled and e < stop:   # then the BN scale, per channel run of the chunk
                plane_index = e // plane
                run_stop = min(stop, (plane_index + 1) * plane)
                s = scale[plane_index % channels]
                o = out[e:run_stop]
                for i in range(o.size):
                    o[i] *= s               # as reference: blocked -> (+0.0) * scale
                e = run_stop

    # "contract": x * scale + shift as one fused multiply-add, as torch.addcmul computes it
    _AFFINE_CLAMP_PACK = _compiled(_affine_clamp_pack_loop, fastmath={"contract"})
    _MASK_SCALE = _compiled(_mask_scale_loop)


def _flat(t: Tensor):
    """The 1-D numpy view of a contiguous tensor (numpy's reshape: cheaper per call than
    torch's, and these wrappers run ~100 times a step)."""
    return t.detach().numpy().reshape(-1)


# numpy scalar type per torch dtype the loops take
_NUMPY_SCALAR = {torch.float32: np.float32, torch.float64: np.float64,
                 torch.int32: np.int32, torch.int64: np.int64}


def _typed(x: Tensor, *values: float):
    """``values`` as numpy scalars of x's dtype: the loops then compute in that dtype."""
    kind = _NUMPY_SCALAR[x.dtype]
    return tuple(kind(v) for v in values)


def _affine_clamp(x: Tensor, scale: Tensor | None, shift: Tensor | None, upper: float | None,
                  out: Tensor) -> Tensor:
    """Write clamp(x * scale + shift) (or clamp(x)) into ``out``; return the packed mask."""
    packed = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8)
    plane, channels = _layout(x)
    affine = scale is not None
    if not affine:
        scale = shift = x.new_ones(1)
    _run(_AFFINE_CLAMP_PACK, _flat(x), _flat(scale.to(x.dtype)), _flat(shift.to(x.dtype)),
         affine, *_typed(x, 0.0, _NO_UPPER if upper is None else upper), _flat(out), _flat(packed),
         plane, channels if affine else 1)
    return packed


def compact_channels(x: Tensor, idx: Tensor, channel_dim: int) -> Tensor:
    """The reference's gather (one ATen ``index_select``), looked up at each call so that
    a patched oracle (the checkpoint tests spy on it) is the CPU path's too."""
    return reference.compact_channels(x, idx, channel_dim)


def relu_forward_mask(x: Tensor, upper: float | None, inplace: bool = False) -> tuple[Tensor, Tensor]:
    """As :func:`reference.relu_forward_mask`; ``inplace=True`` writes the output into ``x``."""
    if not available(x):
        return reference.relu_forward_mask(x, upper)
    y = x if inplace else torch.empty_like(x)
    return y, _affine_clamp(x, None, None, upper, y)


def affine_clamp_mask(x: Tensor, scale: Tensor, shift: Tensor,
                      upper: float | None) -> tuple[Tensor, Tensor]:
    """As :func:`reference.affine_clamp_mask`: frozen BN -> ReLU/ReLU6 -> mask, one pass."""
    if not (available(x) and x.dim() >= 2):
        return reference.affine_clamp_mask(x, scale, shift, upper)
    y = torch.empty_like(x)
    return y, _affine_clamp(x, scale, shift, upper, y)


def affine_relu_compact(x: Tensor, scale: Tensor, shift: Tensor, upper: float | None,
                        idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """As :func:`reference.affine_relu_compact`."""
    y, packed = affine_clamp_mask(x, scale, shift, upper)
    return y, packed, compact_channels(y, idx, 1)


def mask_scale_backward(grad_output: Tensor, packed: Tensor, scale: Tensor | None) -> Tensor:
    """As :func:`reference.mask_scale_backward`: mask (and per-channel scale) in one pass."""
    grad_output = grad_output.contiguous()
    if not available(grad_output) or (scale is not None and grad_output.dim() < 2):
        return reference.mask_scale_backward(grad_output, packed, scale)
    out = torch.empty_like(grad_output)
    plane, channels = _layout(grad_output)
    scaled = scale is not None
    scale = scale.to(grad_output.dtype) if scaled else grad_output.new_ones(1)
    int_dtype = _SAME_WIDTH_INT[grad_output.dtype]
    _run(_MASK_SCALE, _flat(grad_output.view(int_dtype)), _flat(packed), _flat(scale), scaled,
         _typed(out.view(int_dtype), 1)[0], _flat(out), _flat(out.view(int_dtype)),
         plane, channels if scaled else 1)
    return out


def relu_backward_mask(grad_output: Tensor, packed: Tensor) -> Tensor:
    """As :func:`reference.relu_backward_mask`."""
    return mask_scale_backward(grad_output, packed, None)


# ------------------------------------------------------------------ pointwise convolutions
_POINTWISE_GEMM = [True]   # switched off only by benches comparing with oneDNN's 1x1 conv


@contextlib.contextmanager
def pointwise_gemm(enabled: bool):
    """Within the block, 1x1 convs run by the fastest form of ``cpu_pointwise`` and
    depthwise convs by the faster of ``cpu_depthwise`` and ATen (``True``, the default),
    or all as ATen's plain calls."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled={enabled!r}: allowed values are True or False")
    previous, _POINTWISE_GEMM[0] = _POINTWISE_GEMM[0], enabled
    try:
        yield
    finally:
        _POINTWISE_GEMM[0] = previous


def _pointwise_geometry(kernel_size, stride, padding, groups) -> bool:
    """A plain 1x1 conv: stride 1, no padding, one group."""
    return (_POINTWISE_GEMM[0] and tuple(kernel_size) == (1, 1) and groups == 1
            and tuple(stride) == (1, 1) and padding in ((0, 0), [0, 0], "valid"))


def _gemm_ready(*tensors: Tensor) -> bool:
    """CPU, float32/64 in one dtype, NCHW-contiguous 4-D, eager and without autocast."""
    first = tensors[0]
    return (first.device.type == "cpu" and first.dtype in _FLOATS
            and all(t.dtype == first.dtype and t.dim() == 4 and t.is_contiguous()
                    for t in tensors)
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu"))


def _pointwise(x: Tensor, weight: Tensor, stride, padding, groups) -> bool:
    """Whether the GEMM path serves a conv of ``x`` (or a gradient shaped like its output)
    by ``weight``."""
    return _pointwise_geometry(weight.shape[2:], stride, padding, groups) and _gemm_ready(x, weight)


def _depthwise_stride_1(grad_y: Tensor, weight: Tensor, stride, padding, dilation,
                        groups: int) -> bool:
    """A depthwise conv (one input channel per group) with stride and dilation 1 and
    padding < kernel size: its dX is a plain forward conv, faster in oneDNN than ATen's
    backward-data here (bench/RESULTS.md, issue 11)."""
    return (_POINTWISE_GEMM[0] and weight.shape[1] == 1 and groups == weight.shape[0] > 1
            and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
            and not isinstance(padding, str)
            and all(0 <= p < k for p, k in zip(padding, weight.shape[2:]))
            and grad_y.device.type == "cpu" and not torch.compiler.is_compiling())


def _depthwise_loops(x: Tensor, weight: Tensor, bias, stride, padding, dilation,
                     groups: int) -> bool:
    """Whether ``cpu_depthwise`` is a candidate for this conv (``x``: its input or dY)."""
    return _POINTWISE_GEMM[0] and cpu_depthwise.serves(x, weight, bias, stride, padding,
                                                       dilation, groups)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation,
           groups: int) -> Tensor:
    """``F.conv2d``; a 1x1 conv by the fastest form for its shape (``cpu_pointwise``); a
    depthwise conv by the faster of ``cpu_depthwise.forward`` and ATen for its shape."""
    if _depthwise_loops(x, weight, bias, stride, padding, dilation, groups):
        return cpu_depthwise.fastest(
            "forward", x, weight, stride[0],
            lambda: cpu_depthwise.forward(x, weight, bias, stride[0], padding[0]),
            lambda: F.conv2d(x, weight, bias, stride, padding, dilation, groups))
    if not _pointwise(x, weight, stride, padding, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return cpu_pointwise.forward(x, weight, bias)


def _flipped_kernel_forward(weight: Tensor, grad_y: Tensor, padding, groups: int) -> Tensor:
    """dX of a stride-1 depthwise conv as the forward conv of dY with the flipped kernel."""
    return F.conv2d(grad_y, weight.flip(2, 3), None, 1,
                    (weight.shape[2] - 1 - padding[0], weight.shape[3] - 1 - padding[1]),
                    1, groups)


def _aten_depthwise_input_grad(x_shape, weight: Tensor, grad_y: Tensor, stride, padding,
                               dilation, groups: int) -> Tensor:
    """ATen's fastest depthwise dX: the flipped-kernel forward at stride 1, else
    backward-data."""
    if _depthwise_stride_1(grad_y, weight, stride, padding, dilation, groups):
        return _flipped_kernel_forward(weight, grad_y, padding, groups)
    return reference.conv2d_input_grad(x_shape, weight, grad_y, stride, padding, dilation,
                                       groups)


def conv2d_input_grad(x_shape, weight: Tensor, grad_y: Tensor, stride, padding, dilation,
                      groups: int) -> Tensor:
    """As :func:`reference.conv2d_input_grad`; a 1x1 conv's (``W^T @ dY``) by
    ``cpu_pointwise``; a
    depthwise conv's by the faster of ``cpu_depthwise.input_grad`` and ATen's own (at
    stride 1 the forward conv of dY with the flipped kernel)."""
    if _depthwise_loops(grad_y, weight, None, stride, padding, dilation, groups):
        return cpu_depthwise.fastest(
            "input_grad", grad_y, weight, stride[0],
            lambda: cpu_depthwise.input_grad(x_shape, weight, grad_y, stride[0], padding[0]),
            lambda: _aten_depthwise_input_grad(x_shape, weight, grad_y, stride, padding,
                                               dilation, groups))
    if _depthwise_stride_1(grad_y, weight, stride, padding, dilation, groups):
        return _flipped_kernel_forward(weight, grad_y, padding, groups)
    if not _pointwise(grad_y, weight, stride, padding, groups):
        return reference.conv2d_input_grad(x_shape, weight, grad_y, stride, padding, dilation,
                                           groups)
    return cpu_pointwise.input_grad(x_shape, weight, grad_y)


def conv2d_weight_grad_masked(x_compact: Tensor, grad_output: Tensor, idx: Tensor,
                              weight_shape, stride, padding, dilation, groups: int) -> Tensor:
    """As :func:`reference.conv2d_weight_grad_masked`; a 1x1 conv's
    (``sum_n dY[n] @ x_compact[n]^T``) by ``cpu_pointwise``; a
    depthwise conv's by the faster of ``cpu_depthwise.weight_grad_masked`` and the
    reference (ATen's grouped weight gradient, ~0.4 ms a call even for a few channels)."""
    if _POINTWISE_GEMM[0] and cpu_depthwise.serves_weight_grad(
            x_compact, grad_output, idx, weight_shape, stride, padding, dilation, groups):
        return cpu_depthwise.fastest(
            "weight_grad", x_compact, grad_output, stride[0],
            lambda: cpu_depthwise.weight_grad_masked(x_compact, grad_output, idx, weight_shape,
                                                     stride[0], padding[0]),
            lambda: reference.conv2d_weight_grad_masked(x_compact, grad_output, idx,
                                                        weight_shape, stride, padding,
                                                        dilation, groups))
    if not (idx.numel() and _pointwise_geometry(weight_shape[2:], stride, padding, groups)
            and _gemm_ready(grad_output, x_compact)):
        return reference.conv2d_weight_grad_masked(x_compact, grad_output, idx, weight_shape,
                                                   stride, padding, dilation, groups)
    return cpu_pointwise.weight_grad_masked(x_compact, grad_output, idx, weight_shape)
