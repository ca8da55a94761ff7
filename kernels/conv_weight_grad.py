"""Masked Conv2d weight gradient, ``groups == 1``, any kernel / stride / padding / dilation.

Implicit GEMM, one kernel tap at a time: for tap ``t = (r, s)``

    dW[o, idx[k], r, s] = sum over l = (n, p, q) of dY[n, o, p, q] * Xc[n, k, h, w],
    h = p * stride_h + r * dil_h - pad_h,  w = q * stride_w + s * dil_w - pad_w,

i.e. ``dY^T [O, L] @ shift_t(Xc) [L, K]``. Two layouts of the taps, both in the
autotuner's configs: in the grid (one tap per program: KH*KW times the output tiles,
and dY read once per tap) or in the GEMM's columns (``TAPS_IN_N``: columns are
(channel, tap) pairs, so dY is read once per tile of K*KH*KW columns; the few kept
channels of a TraDy layer make this the layout that saves dY traffic). The x offset
splits into a row part (n, p, q) and a column part (channel, tap), so either layout
costs one add and a bounds test per element. The reduction runs over chunks of
one sample, ``BLOCK_L // BI`` output rows and ``BI`` output columns (``BI`` a power
of two, see ``gemm_weight_grad.inner_block``): no per-element division, and runs
along W' that Triton sees as contiguous, so NCHW operands load coalesced. The
rows N*H' are split (``_splitk``) when the tiles are too few to fill the GPU.

:func:`conv2d_weight_grad_masked` is the public entry point for every conv: it
sends pointwise convs to the GEMM kernel, depthwise convs to their reduction
kernel, ``groups == 1`` here, and other grouped convs to the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _checks, _splitk
from ._chunks import _chunk_rows, _split_chunks
from .depthwise_weight_grad import launch_depthwise_wgrad
from .gemm_weight_grad import (GPU_CONFIGS, INNER_BLOCKS, INTERPRET_CONFIG, inner_block,
                               launch_gemm_wgrad)


@triton.jit
def _conv_wgrad_kernel(x_ptr, dy_ptr, idx_ptr, out_ptr,
                       O, K, C, H, W, P, Q, R, R_PER_SPLIT, KW, T,
                       sxn, sxk, sxh, sxw, sdn, sdo, sdp, sdq, so_split, so_o, so_k, so_t,
                       stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                       KEY_M, KEY_N, KEY_L,
                       SCATTER: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                       BI: tl.constexpr, TAPS_IN_N: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    # Reduction chunk: one sample n, BLOCK_L // BI output rows p, BI output columns q.
    # No per-element division, and BI-long runs along q that Triton sees as contiguous.
    RB: tl.constexpr = BLOCK_L // BI
    pid = tl.program_id(0)
    split = tl.program_id(1)
    if TAPS_IN_N:
        # GEMM columns are (channel, tap) pairs: dY is read once per column tile
        num_n = (K * T + BLOCK_N - 1) // BLOCK_N
        pid_m = pid // num_n
        pid_n = pid - pid_m * num_n
        col = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k = col // T
        t = col - k * T
        col_ok = col < K * T
    else:
        # one tap per program, tap fastest: neighbours share a dY tile (L2 reuse)
        t0 = pid % T
        tile = pid // T
        num_n = (K + BLOCK_N - 1) // BLOCK_N
        pid_m = tile // num_n
        pid_n = tile - pid_m * num_n
        k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        t = tl.zeros([BLOCK_N], dtype=tl.int32) + t0
        col_ok = k < K
    r = t // KW
    s = t - r * KW
    h_off = r * dil_h - pad_h                            # per GEMM column
    w_off = s * dil_w - pad_w
    # x offset = row part (n, p, q) + column part (k, tap): separable, one add per element
    b_col = k.to(tl.int64) * sxk + h_off.to(tl.int64) * sxh + w_off.to(tl.int64) * sxw
    o = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_ok = o < O
    a_col = o.to(tl.int64) * sdo
    i = tl.arange(0, BLOCK_L)
    i_row = i // BI
    i_col = i % BI
    r_start, r_end, n_pb, n_qb, j_start, j_end = _split_chunks(split, R_PER_SPLIT, R, P, Q,
                                                               RB, BI)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for j in range(j_start, j_end):
        n, p, q, p_ok, q_ok = _chunk_rows(j, n_pb, n_qb, i_row, i_col, P, Q, r_start, r_end,
                                          RB, BI)
        l_ok = p_ok & q_ok
        hp = p * stride_h
        wq = q * stride_w
        h = hp[:, None] + h_off[None, :]
        w = wq[:, None] + w_off[None, :]
        x_ok = (l_ok[:, None] & col_ok[None, :] & (h >= 0) & (h < H)
                & (w >= 0) & (w < W))
        n64 = tl.cast(n, tl.int64)
        a = tl.load(dy_ptr + a_col[:, None]
                    + (n64 * sdn + p.to(tl.int64) * sdp + q.to(tl.int64) * sdq)[None, :],
                    mask=o_ok[:, None] & l_ok[None, :], other=0.0)
        b_row = n64 * sxn + hp.to(tl.int64) * sxh + wq.to(tl.int64) * sxw
        b = tl.load(x_ptr + b_row[:, None] + b_col[None, :], mask=x_ok, other=0.0)
        if UPCAST:      # the interpreter's bf16 / fp16 dot is wrong or imprecise
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if SCATTER:          # dense [O, C, KH, KW] gradient, at the selected channels
        c = tl.load(idx_ptr + k, mask=col_ok, other=0).to(tl.int64)
        col_ok = col_ok & (c >= 0) & (c < C)
    else:                # float32 split-K workspace [split, O, K, T]
        c = k.to(tl.int64)
    ptrs = out_ptr + split.to(tl.int64) * so_split + (o.to(tl.int64) * so_o)[:, None] \
        + (c * so_k + t.to(tl.int64) * so_t)[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_ok[:, None] & col_ok[None, :])


# Test hook / override: True puts the taps in the GEMM's column axis, False one tap per
# program (each with its first configuration); None lets the autotuner pick on a GPU
# (both layouts are in its configs) and uses taps-in-columns under the interpreter.
TAPS_IN_N: bool | None = None


def _configs(taps_modes=(True, False)):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_L": l, "TAPS_IN_N": taps},
                          num_warps=w, num_stages=s)
            for taps in taps_modes for m, n, l, w, s in GPU_CONFIGS]


_conv_wgrad_autotuned = None if _checks.INTERPRET else triton.autotune(
    configs=_configs(), key=["KEY_M", "KEY_N", "KEY_L", "T"])(_conv_wgrad_kernel)


def _grid_size(O: int, K: int, T: int, meta: dict) -> int:
    if meta["TAPS_IN_N"]:
        return _checks.cdiv(O, meta["BLOCK_M"]) * _checks.cdiv(K * T, meta["BLOCK_N"])
    return _checks.cdiv(O, meta["BLOCK_M"]) * _checks.cdiv(K, meta["BLOCK_N"]) * T


def _launch_conv(x: Tensor, dy: Tensor, idx: Tensor, out: Tensor, O: int, K: int, C: int,
                 KH: int, KW: int, stride, padding, dilation, split_k) -> None:
    N, _, H, W = x.shape
    P, Q = dy.shape[2], dy.shape[3]
    T = KH * KW
    R = N * P
    nominal_tiles = _checks.cdiv(O, 64) * _checks.cdiv(K * T, 64)
    split, per = _splitk.choose_split(nominal_tiles, R, Q, out.device, split_k)
    if split == 1:
        target, so = out, (0, C * T, T, 1)                 # dense [O, C, KH, KW]
    else:
        target = _checks.empty((split, O, K, T), torch.float32, out.device)
        so = (O * K * T, K * T, T, 1)
    bi = inner_block(Q)
    args = (x, dy, idx, target, O, K, C, H, W, P, Q, R, per, KW, T,
            *x.stride(), *dy.stride(), *so, *stride, *padding, *dilation,
            _checks.next_pow2(O), _checks.next_pow2(K), _checks.next_pow2(per * Q))
    flags = dict(SCATTER=split == 1, PRECISION=_checks.dot_precision(x.dtype), BI=bi)
    if _conv_wgrad_autotuned is None or TAPS_IN_N is not None:
        # interpreter, or a forced layout: its first plain configuration
        if _conv_wgrad_autotuned is None:
            cfg, opts = dict(INTERPRET_CONFIG, TAPS_IN_N=TAPS_IN_N is not False), {}
        else:
            c = _configs((TAPS_IN_N,))[0]
            cfg, opts = dict(c.kwargs), dict(num_warps=c.num_warps, num_stages=c.num_stages)
        grid = (_grid_size(O, K, T, cfg), split)
        _conv_wgrad_kernel[grid](*args, UPCAST=_conv_wgrad_autotuned is None, **flags, **cfg,
                                 **opts)
    else:
        def grid(meta):
            return (_grid_size(O, K, T, meta), split)
        key = ("conv", x.dtype, split == 1, bi, T, *args[-3:], dy.stride(1) == 1)
        _splitk.launch_tuned(_conv_wgrad_autotuned, _conv_wgrad_kernel, grid, key, args,
                             dict(UPCAST=False, **flags))
    if split > 1:
        _splitk.reduce_scatter(target, idx, out, C, C * T, T, 1)


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _check_conv_args(x_compact: Tensor, grad_output: Tensor, idx: Tensor, weight_shape,
                     stride, padding, dilation, groups) -> tuple:
    """Validate the arguments of :func:`conv2d_weight_grad_masked` before any launch.

    Returns ``(O, in_per_group, KH, KW, stride, padding, dilation, K)`` with the conv
    parameters as int pairs.
    """
    _checks.check_float("x_compact", x_compact)
    _checks.check_float("grad_output", grad_output)
    _checks.check_same_dtype(grad_output=grad_output, x_compact=x_compact)
    _checks.check_tensor("idx", idx)
    _checks.check_device(grad_output=grad_output, x_compact=x_compact, idx=idx)
    if (not isinstance(weight_shape, (tuple, list, torch.Size)) or len(weight_shape) != 4
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                       for v in weight_shape)):
        raise ValueError(f"weight_shape: expected 4 positive ints (out, in/groups, kh, kw), "
                         f"got {weight_shape!r}")
    O, in_per_group, KH, KW = (int(v) for v in weight_shape)
    stride = _checks.pair("stride", stride)
    padding = _checks.pair("padding", padding)
    dilation = _checks.pair("dilation", dilation)
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"stride, dilation must be >= 1 and padding >= 0; got stride={stride}, "
                         f"padding={padding}, dilation={dilation}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or O % groups:
        raise ValueError(f"groups: expected an int >= 1 dividing out_channels={O}, "
                         f"got {groups!r}")
    if x_compact.dim() != 4 or grad_output.dim() != 4:
        raise ValueError(f"x_compact, grad_output: expected 4-D tensors, got shapes "
                         f"{tuple(x_compact.shape)} and {tuple(grad_output.shape)}")
    K = _checks.check_index("idx", idx, in_per_group * groups, what="input channels")
    _check_conv_shapes(x_compact, grad_output, K, tuple(weight_shape), stride, padding, dilation)
    return O, in_per_group, KH, KW, stride, padding, dilation, K


def _check_conv_shapes(x_compact, grad_output, K, weight_shape, stride, padding, dilation):
    """x_compact holds K channels and grad_output has the conv's output shape."""
    O, _, KH, KW = weight_shape
    N, Kx, H, W = x_compact.shape
    if Kx != K:
        raise ValueError(f"x_compact: dim 1 must equal idx.numel() = {K}, "
                         f"got shape {tuple(x_compact.shape)}")
    P = _out_size(H, KH, stride[0], padding[0], dilation[0])
    Q = _out_size(W, KW, stride[1], padding[1], dilation[1])
    expected = (N, O, P, Q)
    if tuple(grad_output.shape) != expected:
        raise ValueError(f"grad_output: expected shape {expected} from x_compact "
                         f"{tuple(x_compact.shape)}, weight_shape {weight_shape}, "
                         f"stride {stride}, padding {padding}, dilation {dilation}; "
                         f"got {tuple(grad_output.shape)}")
    if P < 1 or Q < 1:
        raise ValueError(f"x_compact: spatial size {(H, W)} is too small for kernel "
                         f"{(KH, KW)} with padding {padding} and dilation {dilation}")
    _checks.check_int32_range("N*H'*W' (the reduction length)", 2 * N * P * Q)


def _launch_pointwise(x_compact: Tensor, grad_output: Tensor, idx: Tensor, out: Tensor,
                      O: int, K: int, C: int, split_k) -> None:
    """A 1x1 stride-1 unpadded conv is a plain GEMM over (n, h*w): the GEMM kernel.

    Its x / dy strides need mergeable H, W (else one contiguous copy)."""
    N, _, H, W = x_compact.shape
    xv = _checks.view3d(x_compact, 1)
    dv = _checks.view3d(grad_output, 1)
    if xv is None:
        x_compact = x_compact.contiguous()
        xv = _checks.view3d(x_compact, 1)
    if dv is None:
        grad_output = grad_output.contiguous()
        dv = _checks.view3d(grad_output, 1)
    launch_gemm_wgrad(x_compact, grad_output, idx, out, O, K, C, N, H * W,
                      (xv[3], xv[4], xv[5]), (dv[3], dv[4], dv[5]), C, 1, split_k)


def conv2d_weight_grad_masked(
    x_compact: Tensor,
    grad_output: Tensor,
    idx: Tensor,
    weight_shape: tuple[int, int, int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    *,
    split_k: int | None = None,
) -> Tensor:
    """Dense conv weight gradient with only the input channels ``idx`` filled.

    Same contract as :func:`trady_triton.reference.conv2d_weight_grad_masked`:
    ``x_compact`` is ``x[:, idx]`` (``[N, K, H, W]``, any strides), ``grad_output``
    is ``[N, O, H', W']``; the result has ``weight_shape`` and grad_output's dtype,
    with exact zeros in the unselected slices. ``groups == 1`` and depthwise
    (``groups == C_in``, any channel multiplier) run Triton kernels; other grouped
    convs fall back to the plain-PyTorch reference. ``split_k`` forces the number
    of reduction splits (tests); None picks it from the GPU's size.
    """
    O, in_per_group, KH, KW, stride, padding, dilation, K = _check_conv_args(
        x_compact, grad_output, idx, weight_shape, stride, padding, dilation, groups)
    C = in_per_group * groups
    out = torch.zeros((O, in_per_group, KH, KW), dtype=grad_output.dtype,
                      device=grad_output.device)
    if K == 0 or x_compact.shape[0] == 0:
        return out
    if groups == 1:
        if (KH, KW) == (1, 1) and stride == (1, 1) and padding == (0, 0):
            _launch_pointwise(x_compact, grad_output, idx, out, O, K, C, split_k)
        else:
            _launch_conv(x_compact, grad_output, idx, out, O, K, C, KH, KW, stride, padding,
                         dilation, split_k)
        return out
    if in_per_group == 1 and groups == C:
        launch_depthwise_wgrad(x_compact, grad_output, idx, out, O // C, K, C, KH, KW,
                               stride, padding, dilation, split_k)
        return out
    # General grouped convs (neither groups == 1 nor depthwise): plain PyTorch.
    from ..reference import conv2d_weight_grad_masked as _reference
    return _reference(x_compact, grad_output, idx, (O, in_per_group, KH, KW), stride, padding,
                      dilation, groups)


def _compile_specs():
    sig_ints = ("O", "K", "C", "H", "W", "P", "Q", "R", "R_PER_SPLIT", "KW", "T",
                "sxn", "sxk", "sxh", "sxw", "sdn", "sdo", "sdp", "sdq", "so_split", "so_o",
                "so_k", "so_t", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
                "KEY_M", "KEY_N", "KEY_L")
    gpu = [(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_L=l), {"num_warps": w, "num_stages": s})
           for m, n, l, w, s in GPU_CONFIGS]
    for dt in ("fp16", "bf16", "fp32"):
        for scatter in (True, False):
            sig = {"x_ptr": f"*{dt}", "dy_ptr": f"*{dt}", "idx_ptr": "*i32",
                   "out_ptr": f"*{dt if scatter else 'fp32'}"}
            sig.update({n: "i32" for n in sig_ints})
            sig.update({n: "constexpr" for n in ("SCATTER", "UPCAST", "PRECISION", "BI",
                                                 "TAPS_IN_N", "BLOCK_M", "BLOCK_N",
                                                 "BLOCK_L")})
            prec = "tf32x3" if dt == "fp32" else "ieee"
            for taps in (True, False):
                for cfg, opts in (gpu if scatter else gpu[:1]):
                    for bi in (INNER_BLOCKS if scatter else INNER_BLOCKS[-1:]):
                        cst = dict(cfg, SCATTER=scatter, UPCAST=False, PRECISION=prec, BI=bi,
                                   TAPS_IN_N=taps)
                        yield _conv_wgrad_kernel, sig, cst, opts
