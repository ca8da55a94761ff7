"""Masked weight gradient of Linear and pointwise (1x1, stride 1, no padding) conv.

``dW[:, idx] = dY^T @ Xc``: A = dY as ``[O, L]``, B = the compact input as
``[L, K]``. The reduction index is two-level, ``l = (row, col)``: for a pointwise
conv row = n and col = h*w, for Linear row = the flattened leading dims and
col is trivial. A chunk of ``BLOCK_L`` reduction elements is ``BLOCK_L // BI``
rows by ``BI`` columns with ``BI`` a power of two: the decomposition is a shift,
and Triton sees ``BI``-long contiguous runs along h*w, so NCHW operands load
coalesced and vectorised (channels_last / Linear operands are contiguous along
o or k, which Triton sees from the unit stride). Split-K over rows when the
``O x K`` output tiles are too few to fill the GPU (see ``_splitk``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _checks, _splitk

# Autotuned on a GPU only; the interpreter runs the one plain configuration.
GPU_CONFIGS = (  # (BLOCK_M, BLOCK_N, BLOCK_L, num_warps, num_stages)
    (64, 32, 64, 4, 3),
    (64, 64, 64, 4, 3),
    (128, 64, 32, 4, 3),
    (128, 128, 32, 8, 3),
)
# Few large programs: the interpreter pays per operation, not per element.
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_L=64)
INNER_BLOCKS = (1, 4, 8, 16, 32)     # BI: <= the smallest BLOCK_L


def inner_block(size: int) -> int:
    """Power-of-two run length along the innermost reduction axis of ``size`` elements."""
    for b in INNER_BLOCKS:
        if size <= b:
            return b
    return INNER_BLOCKS[-1]


@triton.jit
def _gemm_wgrad_kernel(x_ptr, dy_ptr, idx_ptr, out_ptr,
                       O, K, C, R, R_PER_SPLIT, S,
                       sxr, sxk, sxs, sdr, sdo, sds, so_split, so_o, so_k,
                       KEY_M, KEY_N, KEY_L,
                       SCATTER: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                       BI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_L: tl.constexpr):
    RB: tl.constexpr = BLOCK_L // BI
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_n = (K + BLOCK_N - 1) // BLOCK_N
    pid_m = pid // num_n
    pid_n = pid - pid_m * num_n
    o = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = o < O
    k_ok = k < K
    a_col = o.to(tl.int64) * sdo                         # [BLOCK_M]
    b_col = k.to(tl.int64) * sxk                         # [BLOCK_N]
    i = tl.arange(0, BLOCK_L)
    i_row = i // BI                                      # constexpr power of two: shifts
    i_col = i % BI
    r_start = split * R_PER_SPLIT
    r_end = tl.minimum(R, r_start + R_PER_SPLIT)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # chunks (row-block, col-block) meeting this split's rows, as one flat loop (the
    # software pipeliner only pipelines the innermost loop)
    n_cb = (S + BI - 1) // BI
    j_start = (r_start // RB) * n_cb
    j_end = ((r_end - 1) // RB + 1) * n_cb
    for j in range(j_start, j_end):
        rb = j // n_cb
        row = rb * RB + i_row
        col = ((j - rb * n_cb) * BI + i_col).to(tl.int64)
        row64 = row.to(tl.int64)
        l_ok = (row >= r_start) & (row < r_end) & (col < S)
        a = tl.load(dy_ptr + a_col[:, None] + (row64 * sdr + col * sds)[None, :],
                    mask=o_ok[:, None] & l_ok[None, :], other=0.0)
        b = tl.load(x_ptr + (row64 * sxr + col * sxs)[:, None] + b_col[None, :],
                    mask=l_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:      # the interpreter's bf16 / fp16 dot is wrong or imprecise
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if SCATTER:          # straight into the dense gradient, at the selected columns
        c = tl.load(idx_ptr + k, mask=k_ok, other=0).to(tl.int64)
        k_ok = k_ok & (c >= 0) & (c < C)
        col_out = c
    else:                # into the float32 split-K workspace
        col_out = k.to(tl.int64)
    ptrs = out_ptr + split.to(tl.int64) * so_split + (o.to(tl.int64) * so_o)[:, None] \
        + (col_out * so_k)[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_ok[:, None] & k_ok[None, :])


def _configs():
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_L": l}, num_warps=w, num_stages=s)
            for m, n, l, w, s in GPU_CONFIGS]


# K and L change with every draw of channels: key on rounded sizes so that
# autotuning runs once per size class, not once per epoch.
_gemm_wgrad_autotuned = None if _checks.INTERPRET else triton.autotune(
    configs=_configs(), key=["KEY_M", "KEY_N", "KEY_L"])(_gemm_wgrad_kernel)


def launch_gemm_wgrad(x: Tensor, dy: Tensor, idx: Tensor, out: Tensor, O: int, K: int, C: int,
                      R: int, S: int, sx: tuple[int, int, int], sd: tuple[int, int, int],
                      d_o: int, d_k: int, split_k: int | None) -> None:
    """out[o*d_o + idx[k]*d_k] = sum over (row, col) of dy[row, o, col] * x[row, k, col].

    ``sx = (row, k, col)`` and ``sd = (row, o, col)`` strides; R rows of S columns.
    """
    _checks.check_int32_range("rows of the reduction", 2 * R)
    nominal_tiles = _checks.cdiv(O, 64) * _checks.cdiv(K, 64)
    split, per = _splitk.choose_split(nominal_tiles, R, S, out.device, split_k)
    if split == 1:
        target, so = out, (0, d_o, d_k)
    else:
        target = _checks.empty((split, O, K, 1), torch.float32, out.device)
        so = (O * K, K, 1)
    bi = inner_block(S)
    args = (x, dy, idx, target, O, K, C, R, per, S, *sx, *sd, *so,
            _checks.next_pow2(O), _checks.next_pow2(K), _checks.next_pow2(per * S))
    flags = dict(SCATTER=split == 1, PRECISION=_checks.dot_precision(x.dtype), BI=bi)
    if _gemm_wgrad_autotuned is None:
        cfg = INTERPRET_CONFIG
        grid = (_checks.cdiv(O, cfg["BLOCK_M"]) * _checks.cdiv(K, cfg["BLOCK_N"]), split)
        _gemm_wgrad_kernel[grid](*args, UPCAST=True, **flags, **cfg)
    else:
        def grid(meta):
            return (_checks.cdiv(O, meta["BLOCK_M"]) * _checks.cdiv(K, meta["BLOCK_N"]), split)
        key = ("gemm", x.dtype, split == 1, bi, *args[-3:], sd[1] == 1, sx[1] == 1)
        _splitk.launch_tuned(_gemm_wgrad_autotuned, _gemm_wgrad_kernel, grid, key, args,
                             dict(UPCAST=False, **flags))
    if split > 1:
        _splitk.reduce_scatter(target, idx, out, C, d_o, d_k, 0)


def linear_weight_grad_masked(x_compact: Tensor, grad_output: Tensor, idx: Tensor,
                              in_features: int, *, split_k: int | None = None) -> Tensor:
    """Dense Linear weight gradient ``[out, in]`` with only the columns ``idx`` filled.

    ``x_compact`` is ``x[..., idx]`` (``[..., K]``), ``grad_output`` is ``[..., out]``
    with the same leading dims. ``split_k`` forces the number of reduction splits
    (tests); None picks it from the GPU's size.
    """
    _checks.check_float("x_compact", x_compact)
    _checks.check_float("grad_output", grad_output)
    _checks.check_same_dtype(grad_output=grad_output, x_compact=x_compact)
    _checks.check_tensor("idx", idx)
    _checks.check_device(grad_output=grad_output, x_compact=x_compact, idx=idx)
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"in_features: expected an int >= 1, got {in_features!r}")
    if x_compact.dim() < 1 or grad_output.dim() < 1:
        raise ValueError("x_compact, grad_output: expected tensors of at least one dimension")
    K = _checks.check_index("idx", idx, in_features, what="in_features")
    if x_compact.shape[-1] != K:
        raise ValueError(f"x_compact: last dim must equal idx.numel() = {K}, "
                         f"got shape {tuple(x_compact.shape)}")
    if x_compact.shape[:-1] != grad_output.shape[:-1]:
        raise ValueError(f"grad_output: leading dims {tuple(grad_output.shape[:-1])} differ from "
                         f"x_compact's {tuple(x_compact.shape[:-1])}; they must be equal")
    O = grad_output.shape[-1]
    out = torch.zeros((O, in_features), dtype=grad_output.dtype, device=grad_output.device)
    rows = x_compact.numel() // K if K else 0
    if K == 0 or O == 0 or rows == 0:
        return out
    xr = x_compact.reshape(rows, K)          # views for contiguous inputs
    dyr = grad_output.reshape(rows, O)
    launch_gemm_wgrad(xr, dyr, idx, out, O, K, in_features, rows, 1,
                      (xr.stride(0), xr.stride(1), 1), (dyr.stride(0), dyr.stride(1), 1),
                      in_features, 1, split_k)
    return out


def _compile_specs():
    sig_ints = ("O", "K", "C", "R", "R_PER_SPLIT", "S", "sxr", "sxk", "sxs", "sdr", "sdo",
                "sds", "so_split", "so_o", "so_k", "KEY_M", "KEY_N", "KEY_L")
    gpu = [(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_L=l), {"num_warps": w, "num_stages": s})
           for m, n, l, w, s in GPU_CONFIGS]
    for dt in ("fp16", "bf16", "fp32"):
        prec = "tf32x3" if dt == "fp32" else "ieee"
        for scatter in (True, False):
            sig = {"x_ptr": f"*{dt}", "dy_ptr": f"*{dt}", "idx_ptr": "*i32",
                   "out_ptr": f"*{dt if scatter else 'fp32'}"}
            sig.update({n: "i32" for n in sig_ints})
            sig.update({n: "constexpr" for n in ("SCATTER", "UPCAST", "PRECISION", "BI",
                                                 "BLOCK_M", "BLOCK_N", "BLOCK_L")})
            # every autotune config x every run length for the scattering launch;
            # the workspace launch differs only in its store: one config each
            for cfg, opts in (gpu if scatter else gpu[:1]):
                for bi in (INNER_BLOCKS if scatter else INNER_BLOCKS[-1:]):
                    cst = dict(cfg, SCATTER=scatter, UPCAST=False, PRECISION=prec, BI=bi)
                    yield _gemm_wgrad_kernel, sig, cst, opts
