"""Masked depthwise conv weight gradient (``groups == C_in``, any channel multiplier).

For a selected channel ``c = idx[k]``, multiplier ``m`` (output channel
``o = c * MULT + m``) and tap ``t = (r, s)``:

    dW[o, 0, r, s] = sum over l = (n, p, q) of dY[n, o, p, q] * Xc[n, k, h, w]

No GEMM here: each (channel pair, tap) is a dot product of length N*H'*W'. A
program owns ``BLOCK_P`` pairs and one tap, and accumulates a ``[BLOCK_L, BLOCK_P]``
float32 tile that it sums once at the end. Only ``dY[:, idx]`` and the compact
input are read. NCHW wants long ``BLOCK_L`` runs along W', channels_last wants
wide ``BLOCK_P`` runs along the channels: two autotune lists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _checks, _splitk
from ._chunks import _chunk_rows, _split_chunks
from .gemm_weight_grad import INNER_BLOCKS, inner_block

GPU_CONFIGS_NCHW = (   # (BLOCK_L, BLOCK_P, num_warps, num_stages)
    (512, 1, 4, 2),
    (256, 2, 4, 2),
)
GPU_CONFIGS_NHWC = (   # BLOCK_L >= the largest run length BI
    (32, 32, 4, 2),
    (64, 32, 8, 2),
)
# Few large programs: the interpreter pays per operation, not per element.
INTERPRET_CONFIG = dict(BLOCK_L=128, BLOCK_P=16)


@triton.jit
def _dw_wgrad_kernel(x_ptr, dy_ptr, idx_ptr, out_ptr,
                     KP, MULT, C, H, W, P, Q, R, R_PER_SPLIT, KW, T,
                     sxn, sxk, sxh, sxw, sdn, sdo, sdp, sdq, so_split, so_m, so_k, so_t,
                     stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                     KEY_P, KEY_L,
                     SCATTER: tl.constexpr, BI: tl.constexpr, BLOCK_L: tl.constexpr,
                     BLOCK_P: tl.constexpr):
    # Same reduction chunks as the groups=1 kernel: one sample, BLOCK_L // BI rows p,
    # BI columns q; no per-element division.
    RB: tl.constexpr = BLOCK_L // BI
    pid = tl.program_id(0)
    split = tl.program_id(1)
    t = pid % T                       # tap fastest: the same dY block is reused from L2
    pb = pid // T
    r = t // KW
    s = t - r * KW
    pp = pb * BLOCK_P + tl.arange(0, BLOCK_P)       # pair = k * MULT + m
    p_ok_ = pp < KP
    k = pp // MULT
    m = pp - k * MULT
    c = tl.load(idx_ptr + k, mask=p_ok_, other=0).to(tl.int64)
    pair_ok = p_ok_ & (c >= 0) & (c < C)
    a_col = (c * MULT + m) * sdo
    b_col = k.to(tl.int64) * sxk
    i = tl.arange(0, BLOCK_L)
    i_row = i // BI
    i_col = i % BI
    h_off = r * dil_h - pad_h
    w_off = s * dil_w - pad_w
    r_start, r_end, n_pb, n_qb, j_start, j_end = _split_chunks(split, R_PER_SPLIT, R, P, Q,
                                                               RB, BI)
    acc = tl.zeros([BLOCK_L, BLOCK_P], dtype=tl.float32)
    for j in range(j_start, j_end):
        n, p, q, p_ok, q_ok = _chunk_rows(j, n_pb, n_qb, i_row, i_col, P, Q, r_start, r_end,
                                          RB, BI)
        h = p * stride_h + h_off
        w = q * stride_w + w_off
        x_ok = p_ok & q_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        a_p = tl.cast(n, tl.int64) * sdn + p.to(tl.int64) * sdp
        b_h = tl.cast(n, tl.int64) * sxn + h.to(tl.int64) * sxh
        dy = tl.load(dy_ptr + (a_p + q.to(tl.int64) * sdq)[:, None] + a_col[None, :],
                     mask=(p_ok & q_ok)[:, None] & pair_ok[None, :], other=0.0)
        xv = tl.load(x_ptr + (b_h + w.to(tl.int64) * sxw)[:, None] + b_col[None, :],
                     mask=x_ok[:, None] & pair_ok[None, :], other=0.0)
        acc += dy.to(tl.float32) * xv.to(tl.float32)
    res = tl.sum(acc, axis=0)
    col = c if SCATTER else k.to(tl.int64)
    tl.store(out_ptr + split.to(tl.int64) * so_split + m.to(tl.int64) * so_m + col * so_k
             + t.to(tl.int64) * so_t, res.to(out_ptr.dtype.element_ty), mask=pair_ok)


def _configs(table):
    return [triton.Config({"BLOCK_L": bl, "BLOCK_P": bp}, num_warps=w, num_stages=s)
            for bl, bp, w, s in table]


_dw_autotuned_nchw = None if _checks.INTERPRET else triton.autotune(
    configs=_configs(GPU_CONFIGS_NCHW), key=["KEY_P", "KEY_L", "T"])(_dw_wgrad_kernel)
_dw_autotuned_nhwc = None if _checks.INTERPRET else triton.autotune(
    configs=_configs(GPU_CONFIGS_NHWC), key=["KEY_P", "KEY_L", "T"])(_dw_wgrad_kernel)


def launch_depthwise_wgrad(x: Tensor, dy: Tensor, idx: Tensor, out: Tensor, mult: int, K: int,
                           C: int, KH: int, KW: int, stride, padding, dilation,
                           split_k) -> None:
    """Checked arguments; ``out`` is the dense zero ``[C * mult, 1, KH, KW]`` gradient."""
    N, _, H, W = x.shape
    P, Q = dy.shape[2], dy.shape[3]
    T = KH * KW
    R = N * P
    KP = K * mult
    channel_fast = dy.stride(1) == 1 and dy.shape[1] > 1
    nominal_tiles = (_checks.cdiv(KP, 32) if channel_fast else KP) * T
    split, per = _splitk.choose_split(nominal_tiles, R, Q, out.device, split_k)
    if split == 1:
        target, so = out, (0, T, mult * T, 1)
    else:
        target = _checks.empty((split, mult, K, T), torch.float32, out.device)
        so = (mult * K * T, K * T, T, 1)
    bi = inner_block(Q)
    args = (x, dy, idx, target, KP, mult, C, H, W, P, Q, R, per, KW, T,
            *x.stride(), *dy.stride(), *so, *stride, *padding, *dilation,
            _checks.next_pow2(KP), _checks.next_pow2(per * Q))
    if _dw_autotuned_nchw is None:
        cfg = INTERPRET_CONFIG
        grid = (_checks.cdiv(KP, cfg["BLOCK_P"]) * T, split)
        _dw_wgrad_kernel[grid](*args, SCATTER=split == 1, BI=bi, **cfg)
    else:
        def grid(meta):
            return (_checks.cdiv(KP, meta["BLOCK_P"]) * T, split)
        kernel = _dw_autotuned_nhwc if channel_fast else _dw_autotuned_nchw
        key = ("dw", x.dtype, split == 1, bi, T, *args[-2:], channel_fast)
        _splitk.launch_tuned(kernel, _dw_wgrad_kernel, grid, key, args,
                             dict(SCATTER=split == 1, BI=bi))
    if split > 1:
        _splitk.reduce_scatter(target, idx, out, C, T, mult * T, 1)


def _compile_specs():
    sig_ints = ("KP", "MULT", "C", "H", "W", "P", "Q", "R", "R_PER_SPLIT", "KW", "T",
                "sxn", "sxk", "sxh", "sxw", "sdn", "sdo", "sdp", "sdq", "so_split", "so_m",
                "so_k", "so_t", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
                "KEY_P", "KEY_L")
    for dt in ("fp16", "bf16", "fp32"):
        for scatter in (True, False):
            sig = {"x_ptr": f"*{dt}", "dy_ptr": f"*{dt}", "idx_ptr": "*i32",
                   "out_ptr": f"*{dt if scatter else 'fp32'}"}
            sig.update({n: "i32" for n in sig_ints})
            sig.update(SCATTER="constexpr", BI="constexpr", BLOCK_L="constexpr",
                       BLOCK_P="constexpr")
            table = GPU_CONFIGS_NCHW + GPU_CONFIGS_NHWC
            for bl, bp, w, s in (table if scatter else table[:1]):
                for bi in (INNER_BLOCKS if scatter else INNER_BLOCKS[-1:]):
                    cst = {"SCATTER": scatter, "BI": bi, "BLOCK_L": bl, "BLOCK_P": bp}
                    yield _dw_wgrad_kernel, sig, cst, {"num_warps": w, "num_stages": s}
