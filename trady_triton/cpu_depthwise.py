"""Depthwise convolutions on the CPU, one channel plane per task (numba).

oneDNN's stride-2 depthwise dX (ATen's backward-data) takes ~5 ns per element for 48 or 96
channels: 47 ms for MobileNetV2's [32, 48, 64, 64] at one thread, where the loop here takes
22 ms (bench/RESULTS.md, issue 11). Here:

* :func:`forward`: y = conv(x, W) + b, for one input channel per group (``groups ==
  C_in == C_out``), a square odd kernel, stride 1 or 2, dilation 1, symmetric padding
  below the kernel size;
* :func:`input_grad`: dX of such a conv. Stride 1: the forward of dY with the flipped
  kernel. Stride 2: each input row gathers from the (at most ceil(K/2)) output rows that
  touch it, so no zero-inserted copy of dY is built;
* :func:`weight_grad_masked`: the dW rows of the selected channels ``idx`` from the
  compact input ``x[:, idx]`` and the full dY (ATen's grouped weight gradient, which the
  reference calls, costs ~0.4 ms a call even for one channel).

Each plane's loop accumulates one output row at a time, one pass over the row per kernel
row (3 and 5 taps) or per tap (other kernels), all loads contiguous: the plane is first
copied into a zero-padded buffer, at stride 2 its even and odd columns apart.
:func:`serves` (:func:`serves_weight_grad` for dW) says whether a call is one of these.

Which is faster, this loop or ATen's, depends on the shape in ways no simple rule captures
(at one thread oneDNN's forward and stride-1 dX win all but 112x112 planes; its stride-2 dX
is fast at 32 channels, slow at 48 and 96): :func:`fastest` times both once per (op, shape,
kernel, stride, dtype, thread count), at the first step that meets it, and keeps the
winner. ``TRADY_CPU_DEPTHWISE`` pins it: ``timed`` (default), ``numba`` or ``aten``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .fastest import PathChooser, wall_time_ms
from .numba_builds import compiled_builds, run, thread_count

try:
    import numba
    from numba import njit, prange
except ImportError:   # numba is a dependency; without it every conv here is ATen's
    numba = None


__all__ = ["serves", "forward", "input_grad", "serves_weight_grad", "weight_grad_masked",
           "fastest", "PATHS"]

_FLOATS = (torch.float32, torch.float64)
PATHS = ("timed", "numba", "aten")


def _pair(v) -> tuple | None:
    return None if isinstance(v, str) else tuple(v)


def _depthwise_geometry(weight_shape, stride, padding, dilation, groups: int) -> bool:
    """Multiplier-1 depthwise, square odd kernel, stride (1, 1) or (2, 2), dilation 1,
    padding (p, p) with 0 <= p < kernel size: what every loop here takes. The depthwise
    test first: most convs stop there."""
    weight_shape = tuple(weight_shape)
    if len(weight_shape) != 4 or weight_shape[1] != 1 or groups != weight_shape[0]:
        return False
    k = weight_shape[2]
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    return (weight_shape[3] == k and k % 2 == 1 and stride in ((1, 1), (2, 2))
            and dilation == (1, 1) and padding is not None and padding[0] == padding[1]
            and 0 <= padding[0] < k)


def _loops_usable() -> bool:
    """numba is there, and no compile trace or CPU autocast is active."""
    return not (numba is None or torch.compiler.is_compiling()
                or torch.is_autocast_enabled("cpu"))


def serves(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation,
           groups: int) -> bool:
    """Whether the loops here compute this conv (``x`` the input, or dY for dX): CPU,
    float32/64 in one dtype, contiguous NCHW, the geometry of :func:`_depthwise_geometry`."""
    if not (weight.dim() == 4 and _depthwise_geometry(weight.shape, stride, padding, dilation,
                                                      groups) and _loops_usable()):
        return False
    tensors = [x, weight] + ([] if bias is None else [bias])
    return (x.device.type == "cpu" and x.dtype in _FLOATS and x.dim() == 4 and x.numel() > 0
            and x.shape[1] == groups
            and all(t.dtype == x.dtype and t.device == x.device and t.is_contiguous()
                    for t in tensors))

if numba is not None:
    @njit(inline="always")
    def _row_taps_stride_1(acc, row, kc, di, k):
        """acc[j] += sum_dj kc[di, dj] * row[j + dj] over a zero-padded input row: kernels
        of 3 and 5 taps in one pass over ``acc``, others one pass per tap."""
        if k == 3:
            t0, t1, t2 = kc[di, 0], kc[di, 1], kc[di, 2]
            for j in range(acc.size):
                acc[j] += t0 * row[j] + t1 * row[j + 1] + t2 * row[j + 2]
        elif k == 5:
            t0, t1, t2, t3, t4 = kc[di, 0], kc[di, 1], kc[di, 2], kc[di, 3], kc[di, 4]
            for j in range(acc.size):
                acc[j] += (t0 * row[j] + t1 * row[j + 1] + t2 * row[j + 2] + t3 * row[j + 3]
                           + t4 * row[j + 4])
        else:
            for dj in range(k):
                t = kc[di, dj]
                for j in range(acc.size):
                    acc[j] += t * row[j + dj]

    @njit(inline="always")
    def _row_taps_stride_2(acc, even, odd, kc, di, k):
        """acc[j] += sum_dj kc[di, dj] * row[2 j + dj], the padded row given as its even
        and odd columns apart: every load contiguous."""
        if k == 3:
            t0, t1, t2 = kc[di, 0], kc[di, 1], kc[di, 2]
            for j in range(acc.size):
                acc[j] += t0 * even[j] + t1 * odd[j] + t2 * even[j + 1]
        elif k == 5:
            t0, t1, t2, t3, t4 = kc[di, 0], kc[di, 1], kc[di, 2], kc[di, 3], kc[di, 4]
            for j in range(acc.size):
                acc[j] += (t0 * even[j] + t1 * odd[j] + t2 * even[j + 1] + t3 * odd[j + 1]
                           + t4 * even[j + 2])
        else:
            for dj in range(k):
                t = kc[di, dj]
                src = even if dj % 2 == 0 else odd
                for j in range(acc.size):
                    acc[j] += t * src[j + dj // 2]

    @njit(inline="always")
    def _planes(task, tasks, planes):
        """The planes [first, stop) of one of ``tasks`` parallel tasks (buffers per task)."""
        return task * planes // tasks, (task + 1) * planes // tasks

    @njit(inline="always")
    def _copy_padded(xp, even, odd, stride, pad):
        """The plane into the zero-padded buffer(s); their borders stay zero."""
        height, width = xp.shape
        for i in range(height):
            if stride == 1:
                even[i + pad, pad:pad + width] = xp[i]
            else:
                first_even = pad % 2            # column j lands at padded column j + pad
                for j in range(first_even, width, 2):
                    even[i + pad, (j + pad) // 2] = xp[i, j]
                for j in range(1 - first_even, width, 2):
                    odd[i + pad, (j + pad) // 2] = xp[i, j]

    def _forward_loop(x, w, bias, y, stride, pad, tasks):
        n_images, channels, height, width = x.shape
        k = w.shape[1]
        out_height, out_width = y.shape[2], y.shape[3]
        padded_width = width + 2 * pad + 2
        half = padded_width // 2 + 1 if stride == 2 else 1
        planes = n_images * channels
        for task in prange(tasks):
            # the plane zero-padded (at stride 2: its even and odd columns apart)
            even = np.zeros((height + 2 * pad + 1, padded_width if stride == 1 else half),
                            x.dtype)
            odd = np.zeros((height + 2 * pad + 1, half), x.dtype)
            acc = np.empty(out_width, x.dtype)
            first, stop = _planes(task, tasks, planes)
            for plane in range(first, stop):
                c = plane % channels
                yp, kc = y[plane // channels, c], w[c]
                _copy_padded(x[plane // channels, c], even, odd, stride, pad)
                for i in range(out_height):
                    b = bias[c]
                    for j in range(out_width):
                        acc[j] = b
                    for di in range(k):
                        if stride == 1:
                            _row_taps_stride_1(acc, even[i + di], kc, di, k)
                        else:
                            _row_taps_stride_2(acc, even[2 * i + di], odd[2 * i + di], kc, di,
                                               k)
                    out = yp[i]
                    for j in range(out_width):
                        out[j] = acc[j]

    def _input_grad_stride_2_loop(grad_y, w, grad_x, pad, tasks):
        """dX[x] gathers, per parity q of x + pad, the taps dj = 2e + q at dY[(x + pad - dj)
        / 2] from a zero-padded copy of dY's rows (e <= (k - 1) / 2 zeros on the left)."""
        n_images, channels, out_height, out_width = grad_y.shape
        height, width = grad_x.shape[2], grad_x.shape[3]
        k = w.shape[1]
        left = (k - 1) // 2
        half = (width + pad - 1) // 2 + 1          # padded columns 2m + q, m < half
        planes = n_images * channels
        for task in prange(tasks):
            padded = np.zeros((out_height, max(half, out_width) + 2 * left + 2), grad_y.dtype)
            acc_even = np.empty(half, grad_y.dtype)
            acc_odd = np.empty(half, grad_y.dtype)
            first, stop = _planes(task, tasks, planes)
            for plane in range(first, stop):
                c = plane % channels
                gp, xp, kc = grad_y[plane // channels, c], grad_x[plane // channels, c], w[c]
                for o in range(out_height):
                    padded[o, left:left + out_width] = gp[o]
                for i in range(height):
                    acc_even[:] = 0.0
                    acc_odd[:] = 0.0
                    for di in range((i + pad) % 2, k, 2):
                        o = (i + pad - di) // 2
                        if o < 0 or o >= out_height:
                            continue
                        row = padded[o]
                        for dj in range(k):
                            t = kc[di, dj]
                            shift = left - dj // 2
                            acc_q = acc_even if dj % 2 == 0 else acc_odd
                            for m in range(half):
                                acc_q[m] += t * row[m + shift]
                    out = xp[i]
                    first_even = pad % 2
                    for j in range(first_even, width, 2):
                        out[j] = acc_even[(j + pad) // 2]
                    for j in range(1 - first_even, width, 2):
                        out[j] = acc_odd[(j + pad) // 2]

    _FORWARD = compiled_builds(_forward_loop, fastmath={"contract"})
    _INPUT_GRAD_STRIDE_2 = compiled_builds(_input_grad_stride_2_loop, fastmath={"contract"})

    @njit(inline="always")
    def _weight_grad_row(acc, grow, xrow, di, k, stride):
        """acc[di, dj] += sum_j dY_row[j] * x_row[j * stride + dj] over a zero-padded input
        row: all k taps in one pass over j when k is 3 or 5.

        The 3- and 5-tap branches are written out on purpose: k scalar accumulators stay in
        registers and dY is read once per row, where the generic branch, a loop over a
        runtime k, reads it k times. Every depthwise conv of the nets here is 3x3 or 5x5;
        the generic branch serves the rest."""
        if k == 3:
            a0 = a1 = a2 = grow[0] * 0
            for j in range(grow.size):
                g, b = grow[j], j * stride
                a0 += g * xrow[b]
                a1 += g * xrow[b + 1]
                a2 += g * xrow[b + 2]
            acc[di, 0] += a0
            acc[di, 1] += a1
            acc[di, 2] += a2
        elif k == 5:
            a0 = a1 = a2 = a3 = a4 = grow[0] * 0
            for j in range(grow.size):
                g, b = grow[j], j * stride
                a0 += g * xrow[b]
                a1 += g * xrow[b + 1]
                a2 += g * xrow[b + 2]
                a3 += g * xrow[b + 3]
                a4 += g * xrow[b + 4]
            acc[di, 0] += a0
            acc[di, 1] += a1
            acc[di, 2] += a2
            acc[di, 3] += a3
            acc[di, 4] += a4
        else:
            for dj in range(k):
                total = grow[0] * 0
                for j in range(grow.size):
                    total += grow[j] * xrow[j * stride + dj]
                acc[di, dj] += total

    def _weight_grad_masked_loop(x_compact, grad_y, idx, out, stride, pad):
        """out[t, di, dj] = sum over images and output positions of dY[n, idx[t]] times the
        input tap x_compact[n, t] under it, from a zero-padded copy of each input plane: one
        parallel task per selected channel. Row sums in the input's dtype, the rest in
        float64."""
        n_images, kept, height, width = x_compact.shape
        out_height = grad_y.shape[2]
        k = out.shape[1]
        for t in prange(kept):
            c = idx[t]
            acc = np.zeros((k, k), np.float64)
            padded = np.zeros((height + 2 * pad + stride, width + 2 * pad + stride),
                              x_compact.dtype)
            for n in range(n_images):
                padded[pad:pad + height, pad:pad + width] = x_compact[n, t]
                gp = grad_y[n, c]
                for i in range(out_height):
                    for di in range(k):
                        _weight_grad_row(acc, gp[i], padded[i * stride + di], di, k, stride)
            for di in range(k):
                for dj in range(k):
                    out[t, di, dj] = acc[di, dj]

    _WEIGHT_GRAD_MASKED = compiled_builds(_weight_grad_masked_loop, fastmath={"contract"})


_TASKS_PER_THREAD = 4   # tasks of whole planes; each allocates its padded buffers once


def _run(builds, *args) -> None:
    """:func:`numba_builds.run` with the task count last: one task on one thread, else a
    few per thread (whole planes each)."""
    planes = args[0].shape[0] * args[0].shape[1]
    threads = thread_count()
    run(builds, *args, 1 if threads <= 1 else min(planes, threads * _TASKS_PER_THREAD))


def _out_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def _arrays(weight: Tensor, bias: Tensor | None, channels: int, dtype):
    """The kernel as [C, K, K] and the bias as [C] (zeros when there is none), numpy."""
    bias = torch.zeros(channels, dtype=dtype) if bias is None else bias
    return weight.detach()[:, 0].numpy(), bias.detach().numpy()


def forward(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, pad: int,
            out: Tensor | None = None) -> Tensor:
    """The depthwise conv of ``x`` (a call :func:`serves`), into ``out`` if given."""
    n, c, h, w = x.shape
    k = weight.shape[-1]
    shape = (n, c, _out_size(h, k, stride, pad), _out_size(w, k, stride, pad))
    if out is None:
        out = x.new_empty(shape)
    elif tuple(out.shape) != shape or not out.is_contiguous() or out.dtype != x.dtype:
        raise ValueError(f"out: expected a contiguous {x.dtype} tensor of shape {shape}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    _run(_FORWARD, x.detach().numpy(), *_arrays(weight, bias, c, x.dtype),
         out.detach().numpy(), stride, pad)
    return out


def input_grad(x_shape, weight: Tensor, grad_y: Tensor, stride: int, pad: int,
               out: Tensor | None = None) -> Tensor:
    """dX of the depthwise conv (a call :func:`serves` with dY as ``x``) of an input of
    ``x_shape``, into ``out`` if given."""
    x_shape = tuple(x_shape)
    k = weight.shape[-1]
    expected = x_shape[:2] + tuple(_out_size(s, k, stride, pad) for s in x_shape[2:])
    if tuple(grad_y.shape) != expected:
        raise ValueError(f"grad_y: expected shape {expected} for x_shape={x_shape}, "
                         f"got {tuple(grad_y.shape)}")
    if stride == 1:   # the same sizes back: pad' = k - 1 - pad keeps H
        return forward(grad_y, weight.flip(2, 3).contiguous(), None, 1, k - 1 - pad, out)
    if out is None:
        out = grad_y.new_empty(x_shape)
    elif tuple(out.shape) != x_shape or not out.is_contiguous() or out.dtype != grad_y.dtype:
        raise ValueError(f"out: expected a contiguous {grad_y.dtype} tensor of shape "
                         f"{x_shape}, got {out.dtype} {tuple(out.shape)}")
    _run(_INPUT_GRAD_STRIDE_2, grad_y.detach().numpy(), weight.detach()[:, 0].numpy(),
         out.detach().numpy(), pad)
    return out


def serves_weight_grad(x_compact: Tensor, grad_y: Tensor, idx: Tensor, weight_shape,
                       stride, padding, dilation, groups: int) -> bool:
    """Whether :func:`weight_grad_masked` computes this masked dW: the geometry of
    :func:`_depthwise_geometry`, ``x_compact`` holding the input channels ``idx`` of the
    input whose conv gave the full dY ``grad_y``."""
    if not (_depthwise_geometry(weight_shape, stride, padding, dilation, groups)
            and _loops_usable()):
        return False
    tensors = (x_compact, grad_y)
    if not (all(t.device.type == "cpu" and t.dtype == grad_y.dtype and t.dim() == 4
                and t.is_contiguous() and t.numel() > 0 for t in tensors)
            and grad_y.dtype in _FLOATS and grad_y.shape[1] == groups
            and idx.device.type == "cpu" and idx.dim() == 1 and 0 < idx.numel() <= groups
            and x_compact.shape[:2] == (grad_y.shape[0], idx.numel())):
        return False
    k, pad, stride = weight_shape[2], _pair(padding)[0], _pair(stride)[0]
    return tuple(grad_y.shape[2:]) == tuple(_out_size(s, k, stride, pad)
                                            for s in x_compact.shape[2:])


def weight_grad_masked(x_compact: Tensor, grad_y: Tensor, idx: Tensor, weight_shape,
                       stride: int, pad: int) -> Tensor:
    """The dense depthwise dW ``[C, 1, k, k]`` with only the rows ``idx`` filled (a call
    :func:`serves_weight_grad`), straight from the compact input and the full dY."""
    channels, _, k, _ = tuple(weight_shape)
    idx = idx.long()
    rows = x_compact.new_empty((idx.numel(), k, k))
    run(_WEIGHT_GRAD_MASKED, x_compact.detach().numpy(), grad_y.detach().numpy(),
        idx.numpy(), rows.numpy(), stride, pad)
    grad_weight = grad_y.new_zeros(tuple(weight_shape))
    grad_weight.view(channels, k * k).index_copy_(0, idx, rows.view(idx.numel(), k * k))
    return grad_weight


CHOOSER = PathChooser(timer=wall_time_ms)


def fastest(op: str, x: Tensor, weight: Tensor, stride: int, numba_path: Callable[[], Tensor],
            aten_path: Callable[[], Tensor], chooser: PathChooser = CHOOSER) -> Tensor:
    """The result of the faster path for this (op, shape of ``x``, shape of ``weight`` (the
    kernel; dY for a weight gradient), stride, dtype, thread count): timed once, then looked
    up (or pinned by ``TRADY_CPU_DEPTHWISE``)."""
    key = (op, tuple(x.shape), tuple(weight.shape), stride, x.dtype, torch.get_num_threads())
    return chooser.run(key, {"numba": numba_path, "aten": aten_path},
                       "TRADY_CPU_DEPTHWISE", PATHS)
