"""Channel compaction: ``x.index_select(dim, idx).contiguous()`` in one pass.

The input is seen as ``(outer, C, inner)`` with arbitrary strides (NCHW: outer=N,
inner=H*W; channels_last: channel stride 1, inner stride C; Linear: inner=1), the
output is the dense ``(outer, K, inner)``. Only the selected channels are read.
Two tile orders, so that the fastest tile axis is the contiguous one of the input:

* inner-fast (NCHW): tile ``[BLOCK_K, BLOCK_I]``, loads and stores run along inner;
* channel-fast (channels_last, Linear): tile ``[BLOCK_I, BLOCK_K]``, loads run
  along the (gathered) channels, Triton transposes through shared memory for the
  store when the output's contiguous axis differs.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import _checks

# One tile = 4096 elements: large enough to stream, small enough for registers.
INNER_FAST_TILES = ((4, 1024), (16, 256), (64, 64), (256, 16))      # (BLOCK_K, BLOCK_I)
CHANNEL_FAST_TILES = ((16, 256), (32, 128), (64, 64), (128, 32))     # (BLOCK_K, BLOCK_I)
NUM_WARPS = 8


@triton.jit
def _compact_inner_kernel(x_ptr, idx_ptr, out_ptr,
                          K, C, INNER, s_o, s_c, s_i, d_o, d_k, d_i, num_k_blocks, num_i_blocks,
                          BLOCK_K: tl.constexpr, BLOCK_I: tl.constexpr):
    # int64 program id: offsets below may pass 2**31 on large activations.
    pid = tl.program_id(0).to(tl.int64)
    pid_i = pid % num_i_blocks
    rest = pid // num_i_blocks
    pid_k = rest % num_k_blocks
    o = rest // num_k_blocks
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    k_ok = k < K
    c = tl.load(idx_ptr + k, mask=k_ok, other=0).to(tl.int64)
    k_ok = k_ok & (c >= 0) & (c < C)      # never read outside x, even with a bad index
    m = k_ok[:, None] & (i < INNER)[None, :]
    v = tl.load(x_ptr + o * s_o + (c * s_c)[:, None] + (i * s_i)[None, :], mask=m)
    tl.store(out_ptr + o * d_o + (k * d_k)[:, None] + (i * d_i)[None, :], v, mask=m)


@triton.jit
def _compact_channel_kernel(x_ptr, idx_ptr, out_ptr,
                            K, C, INNER, s_o, s_c, s_i, d_o, d_k, d_i, num_k_blocks, num_i_blocks,
                            BLOCK_K: tl.constexpr, BLOCK_I: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    pid_k = pid % num_k_blocks
    rest = pid // num_k_blocks
    pid_i = rest % num_i_blocks
    o = rest // num_i_blocks
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    k_ok = k < K
    c = tl.load(idx_ptr + k, mask=k_ok, other=0).to(tl.int64)
    k_ok = k_ok & (c >= 0) & (c < C)
    m = (i < INNER)[:, None] & k_ok[None, :]
    v = tl.load(x_ptr + o * s_o + (i * s_i)[:, None] + (c * s_c)[None, :], mask=m)
    tl.store(out_ptr + o * d_o + (i * d_i)[:, None] + (k * d_k)[None, :], v, mask=m)


def _inner_fast_tile(inner: int) -> tuple[int, int]:
    for bk, bi in INNER_FAST_TILES:
        if inner >= bi // 2 or bi == INNER_FAST_TILES[-1][1]:
            return bk, bi
    raise AssertionError("unreachable")


def _channel_fast_tile(k: int) -> tuple[int, int]:
    for bk, bi in CHANNEL_FAST_TILES:
        if k <= bk:
            return bk, bi
    return CHANNEL_FAST_TILES[-1]


def launch_compact(x: Tensor, idx: Tensor, out: Tensor, outer: int, C: int, inner: int,
                   s_o: int, s_c: int, s_i: int, d_o: int, d_k: int, d_i: int) -> None:
    """Launch on already-checked arguments: ``out[o, k, i] = x[o, idx[k], i]`` (strided)."""
    K = idx.numel()
    if K == 0 or outer == 0 or inner == 0:
        return
    if inner == 1 and outer > 1:
        # Linear-like (outer, C, 1): walk the rows as the "inner" axis of one outer slab.
        outer, inner, s_i, d_i, s_o, d_o = 1, outer, s_o, d_o, 0, 0
    if s_i == 1 and inner > 1:
        bk, bi = _inner_fast_tile(inner)
        kernel = _compact_inner_kernel
    else:
        bk, bi = _channel_fast_tile(K)
        kernel = _compact_channel_kernel
    nk, ni = _checks.cdiv(K, bk), _checks.cdiv(inner, bi)
    kernel[(outer * nk * ni,)](x, idx, out, K, C, inner, s_o, s_c, s_i, d_o, d_k, d_i, nk, ni,
                               BLOCK_K=bk, BLOCK_I=bi, num_warps=NUM_WARPS)


def compact_channels(x: Tensor, idx: Tensor, channel_dim: int) -> Tensor:
    """``x`` restricted to the channels ``idx`` along ``channel_dim``, contiguous.

    Same contract as :func:`trady_triton.reference.compact_channels`; any order of
    ``idx``, repeats allowed; NCHW, channels_last and N-D inputs.
    """
    _checks.check_tensor("x", x)
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
        raise TypeError(f"channel_dim: expected an int, got {type(channel_dim).__name__}")
    if x.dim() == 0:
        raise ValueError("x: expected a tensor with at least one dimension, got a scalar")
    if not -x.dim() <= channel_dim < x.dim():
        raise ValueError(f"channel_dim: {channel_dim} is out of range for a {x.dim()}-D x; "
                         f"allowed values are {-x.dim()} .. {x.dim() - 1}")
    _checks.check_tensor("idx", idx)
    _checks.check_device(x=x, idx=idx)
    dim = channel_dim % x.dim()
    C = x.shape[dim]
    K = _checks.check_index("idx", idx, C)
    shape = list(x.shape)
    shape[dim] = K
    out = _checks.empty(shape, x.dtype, x.device)
    if out.numel() == 0:
        return out
    v = _checks.view3d(x, dim)
    if v is None:            # strides that cannot be merged: one extra copy, still correct
        x = x.contiguous()
        v = _checks.view3d(x, dim)
    outer, C, inner, s_o, s_c, s_i = v
    launch_compact(x, idx, out, outer, C, inner, s_o, s_c, s_i, K * inner, inner, 1)
    return out


def _compile_specs():
    """(kernel, signature, constexprs, options) for every tile the launcher can pick."""
    for dt in ("fp16", "bf16", "fp32"):
        for kernel, tiles in ((_compact_inner_kernel, INNER_FAST_TILES),
                              (_compact_channel_kernel, CHANNEL_FAST_TILES)):
            for bk, bi in tiles:
                sig = {"x_ptr": f"*{dt}", "idx_ptr": "*i32", "out_ptr": f"*{dt}"}
                for n in ("K", "C", "INNER", "s_o", "s_c", "s_i", "d_o", "d_k", "d_i",
                          "num_k_blocks", "num_i_blocks"):
                    sig[n] = "i64" if n in ("s_o", "d_o") else "i32"
                sig["BLOCK_K"] = sig["BLOCK_I"] = "constexpr"
                yield kernel, sig, {"BLOCK_K": bk, "BLOCK_I": bi}, {"num_warps": NUM_WARPS}
