"""Split of a weight-gradient reduction over N*H'*W' and the final reduce-and-scatter.

When the output tiles alone cannot fill the GPU, the reduction axis is cut into
``split`` contiguous ranges. Each range writes its float32 partial tile into a
workspace ``[split, M, K, T]`` (plain stores, no atomics: deterministic, safe to
re-run while autotuning, and bf16-safe in the interpreter); this kernel sums the
partials and writes them into the dense gradient at the selected channels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _checks

REDUCE_BLOCK = 128
MIN_ELEMS_PER_SPLIT = 2048    # reduction elements: below this a split costs more than it saves
MAX_SPLIT = 64                # also the reduce kernel's split tile (SPLIT_BLOCK)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, idx_ptr, out_ptr, SPLIT, M, K, T, C, d_m, d_k, d_t,
                          SPLIT_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    # All partials of BLOCK outputs in one [SPLIT_BLOCK, BLOCK] load: one memory
    # round trip instead of SPLIT dependent ones.
    pid = tl.program_id(0).to(tl.int64)
    e = pid * BLOCK + tl.arange(0, BLOCK)
    total = M * K * T
    ok = e < total
    sp = tl.arange(0, SPLIT_BLOCK)
    part = tl.load(ws_ptr + (sp.to(tl.int64) * total)[:, None] + e[None, :],
                   mask=(sp < SPLIT)[:, None] & ok[None, :], other=0.0)
    acc = tl.sum(part, axis=0)
    t = e % T
    mk = e // T
    k = mk % K
    m = mk // K
    c = tl.load(idx_ptr + k, mask=ok, other=0).to(tl.int64)
    ok = ok & (c >= 0) & (c < C)
    tl.store(out_ptr + m * d_m + c * d_k + t * d_t, acc.to(out_ptr.dtype.element_ty), mask=ok)


def choose_split(tiles: int, rows: int, row_len: int, device: torch.device,
                 forced: int | None) -> tuple[int, int]:
    """(split, rows per split): the reduction is ``rows`` rows of ``row_len`` elements,
    the output has ``tiles`` tiles; split whole rows until the GPU has ~2 waves."""
    if forced is not None:
        if isinstance(forced, bool) or not isinstance(forced, int) or forced < 1:
            raise ValueError(f"split_k: expected None or an int >= 1, got {forced!r}")
        per = _checks.cdiv(rows, min(forced, rows, MAX_SPLIT))
        return _checks.cdiv(rows, per), per
    target = 2 * _checks.sm_count(device)
    split = 1
    if tiles < target:
        split = max(1, min(_checks.cdiv(target, tiles), rows * row_len // MIN_ELEMS_PER_SPLIT,
                           rows, MAX_SPLIT))
    per = _checks.cdiv(rows, split)
    return _checks.cdiv(rows, per), per


# Best autotune config per launch key, so that after the first call a launch
# skips the Autotuner's per-call bookkeeping (host time matters for small layers).
_BEST: dict = {}


def launch_tuned(autotuned, kernel, grid, key, args, kwargs) -> None:
    """Autotune on the first call for ``key``, then launch ``kernel`` with the winner."""
    best = _BEST.get(key)
    if best is None:
        if _checks.AUTOTUNE:
            autotuned[grid](*args, **kwargs)
            c = autotuned.best_config
            _BEST[key] = (dict(c.kwargs), c.num_warps, c.num_stages)
            return
        c = autotuned.configs[0]
        best = _BEST[key] = (dict(c.kwargs), c.num_warps, c.num_stages)
    meta, warps, stages = best
    kernel[grid(meta)](*args, **kwargs, **meta, num_warps=warps, num_stages=stages)


def reduce_scatter(ws: Tensor, idx: Tensor, out: Tensor, C: int, d_m: int, d_k: int,
                   d_t: int) -> None:
    """out[m*d_m + idx[k]*d_k + t*d_t] = sum_s ws[s, m, k, t]."""
    split, M, K, T = ws.shape
    total = M * K * T
    if total == 0:
        return
    grid = (_checks.cdiv(total, REDUCE_BLOCK),)
    _splitk_reduce_kernel[grid](ws, idx, out, split, M, K, T, C, d_m, d_k, d_t,
                                SPLIT_BLOCK=MAX_SPLIT, BLOCK=REDUCE_BLOCK, num_warps=4)


def _compile_specs():
    for dt in ("fp16", "bf16", "fp32"):
        sig = {"ws_ptr": "*fp32", "idx_ptr": "*i32", "out_ptr": f"*{dt}"}
        sig.update({n: "i32" for n in ("SPLIT", "M", "K", "T", "C", "d_m", "d_k", "d_t")})
        sig["SPLIT_BLOCK"] = sig["BLOCK"] = "constexpr"
        yield _splitk_reduce_kernel, sig, {"SPLIT_BLOCK": MAX_SPLIT, "BLOCK": REDUCE_BLOCK}, \
            {"num_warps": 4}
