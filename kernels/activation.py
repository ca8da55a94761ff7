"""ReLU / ReLU6 forward with a 1-bit mask, optionally fused with a frozen BatchNorm
affine before it and the compaction of the selected channels after it.

One kernel family, three tilings:

* ``_act_fwd_rows_kernel`` handles contiguous NCHW when H*W is a multiple of 8 (every
  MobileNet activation at 128x128 and above): no mask byte straddles two channel rows,
  so a tile ``[BLOCK_R, 8*BYTES_HW]`` covers whole rows of one channel each. The
  channel, scale, shift and compact position are then one value per row, and the
  compact copy is a contiguous run per row: no per-element division or gather.
* ``_act_fwd_flat_kernel`` walks the tensor in logical (NCHW, row-major) order, so
  each program owns whole mask bytes. For contiguous inputs that is also memory
  order; for other layouts (channels_last with H*W not a multiple of 8) each
  element's address is computed from (n, c, hw) and strides.
* ``_act_fwd_cl_kernel`` handles channels_last when H*W is a multiple of 8: then
  no mask byte straddles two channels, so a tile ``[BLOCK_C, 8*BYTES_HW]`` of one
  sample reads along the contiguous channel axis and still writes whole bytes.

The channel of an element (needed for the affine and the compaction) is derived
once per mask byte with integer division and then per element by a compare,
since divisions per element would make this memory-bound kernel compute-bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _checks
from .compaction import compact_channels

FLAT_BYTES = 256                 # 2048 elements per program
ROWS_TILE_BYTES = 256            # rows kernel: BLOCK_R * BYTES_HW mask bytes per program
# Test hook: run the flat kernel's int64 index path on small tensors too.
FORCE_INT64_INDEX = False
CL_TILES = ((16, 32), (32, 16), (64, 8))   # (BLOCK_C, BYTES_HW): 4096 elements
NUM_WARPS = 8


@triton.jit
def _clamp_with_mask(x, ok, upper, HAS_UPPER: tl.constexpr):
    """(ReLU or clamp to [0, upper] of x, where the derivative is 1) for the valid ``ok``.

    where(x <= 0, 0, x) keeps NaN as NaN, like torch.relu / hardtanh. The mask follows
    reference.py: ReLU passes NaN (not x <= 0), as torch's kernels do; the clamp blocks it.
    """
    y = tl.where(x <= 0, 0.0, x)
    if HAS_UPPER:
        y = tl.where(y >= upper, upper, y)
        passes = (x > 0) & (x < upper) & ok
    else:
        passes = ~(x <= 0) & ok
    return y, passes


@triton.jit
def _act_fwd_flat_kernel(x_ptr, y_ptr, mask_ptr, scale_ptr, shift_ptr, pos_ptr, xc_ptr,
                         numel, C, HW, K, s_n, s_c, s_hw, upper,
                         HAS_AFFINE: tl.constexpr, HAS_UPPER: tl.constexpr,
                         HAS_COMPACT: tl.constexpr, STRIDED: tl.constexpr,
                         BIG_HW: tl.constexpr, INT32_INDEX: tl.constexpr,
                         BYTES: tl.constexpr):
    # Index arithmetic in int32 when every offset fits (int32 division is inline,
    # int64 division a subroutine call: it dominated this memory-bound kernel).
    if INT32_INDEX:
        pid = tl.program_id(0)
    else:
        pid = tl.program_id(0).to(tl.int64)
    b = pid * BYTES + tl.arange(0, BYTES)                 # mask bytes owned by this program
    j = tl.arange(0, 8)
    f = b[:, None] * 8 + j[None, :]                       # logical NCHW index, [BYTES, 8]
    ok = f < numel
    if STRIDED or HAS_AFFINE or HAS_COMPACT:
        # (n, c, hw) of each element: divide once per byte, then adjust per element.
        row0 = (b * 8) // HW
        n0 = row0 // C
        c0 = row0 - n0 * C
        rel = (b * 8 - row0 * HW)[:, None] + j[None, :]   # in [0, HW + 8)
        if BIG_HW:                                        # HW >= 8: a byte spans <= 2 rows
            dr = (rel >= HW).to(rel.dtype)
        else:
            dr = rel // HW
        hw = rel - dr * HW
        c = c0[:, None] + dr
        if BIG_HW:
            wrap = (c >= C).to(c.dtype)
        else:
            wrap = c // C
        c = c - wrap * C
        n = n0[:, None] + wrap
    if STRIDED:
        off = n * s_n + c * s_c + hw * s_hw
    else:
        off = f
    x = tl.load(x_ptr + off, mask=ok, other=0).to(tl.float32)
    if HAS_AFFINE:
        sc = tl.load(scale_ptr + c, mask=ok, other=0).to(tl.float32)
        sh = tl.load(shift_ptr + c, mask=ok, other=0).to(tl.float32)
        x = x * sc + sh
    y, passes = _clamp_with_mask(x, ok, upper, HAS_UPPER)
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=ok)
    bits = tl.sum(passes.to(tl.int32) << j[None, :], axis=1)
    tl.store(mask_ptr + b, bits.to(tl.uint8), mask=b * 8 < numel)
    if HAS_COMPACT:
        k = tl.load(pos_ptr + c, mask=ok, other=-1).to(n.dtype)
        tl.store(xc_ptr + (n * K + k) * HW + hw, y.to(xc_ptr.dtype.element_ty),
                 mask=ok & (k >= 0))


@triton.jit
def _act_rows_tile(x_ptr, y_ptr, mask_ptr, scale_ptr, shift_ptr, pos_ptr, xc_ptr, off, ok,
                   c, c_ok, n, row, bh, j, hw3, HW, K, upper, HAS_AFFINE: tl.constexpr,
                   HAS_UPPER: tl.constexpr, HAS_COMPACT: tl.constexpr):
    """One tile [R, BYTES_HW, 8] of whole-byte rows: R (n, c) rows of H*W (H*W % 8 == 0).

    ``c``, ``c_ok``, ``row = n*C + c`` (and ``n`` unless a scalar) are per tile row;
    ``off``/``ok`` address x and y. Applies the affine and the clamp, writes y, the mask
    bytes and the compact copy of the selected channels.
    """
    x = tl.load(x_ptr + off, mask=ok, other=0).to(tl.float32)
    if HAS_AFFINE:
        sc = tl.load(scale_ptr + c, mask=c_ok, other=0).to(tl.float32)
        sh = tl.load(shift_ptr + c, mask=c_ok, other=0).to(tl.float32)
        x = x * sc[:, None, None] + sh[:, None, None]
    y, passes = _clamp_with_mask(x, ok, upper, HAS_UPPER)
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=ok)
    bits = tl.sum(passes.to(tl.int32) << j[None, None, :], axis=2)       # [R, BYTES_HW]
    tl.store(mask_ptr + (row * (HW // 8))[:, None] + bh[None, :], bits.to(tl.uint8),
             mask=c_ok[:, None] & (bh * 8 < HW)[None, :])
    if HAS_COMPACT:
        k = tl.load(pos_ptr + c, mask=c_ok, other=-1).to(tl.int64)
        dst = ((n.to(tl.int64) * K + k) * HW)[:, None, None] + hw3
        tl.store(xc_ptr + dst, y.to(xc_ptr.dtype.element_ty), mask=ok & (k >= 0)[:, None, None])


@triton.jit
def _act_fwd_rows_kernel(x_ptr, y_ptr, mask_ptr, scale_ptr, shift_ptr, pos_ptr, xc_ptr,
                         ROWS, C, HW, K, upper, num_hw_blocks,
                         HAS_AFFINE: tl.constexpr, HAS_UPPER: tl.constexpr,
                         HAS_COMPACT: tl.constexpr, BLOCK_R: tl.constexpr,
                         BYTES_HW: tl.constexpr):
    # contiguous NCHW, HW % 8 == 0: rows r = n*C + c, tile [BLOCK_R, BYTES_HW, 8].
    # Row and channel arithmetic in int32 (ROWS = N*C fits; int32 division is inline,
    # int64 division a subroutine call); element offsets in int64.
    pid = tl.program_id(0)
    pid_r = pid // num_hw_blocks
    pid_h = pid - pid_r * num_hw_blocks
    r32 = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r32 < ROWS
    n = r32 // C                                          # one division per row
    c = r32 - n * C
    r = r32.to(tl.int64)
    bh = pid_h * BYTES_HW + tl.arange(0, BYTES_HW)       # byte index inside a row
    j = tl.arange(0, 8)
    hw = bh[:, None] * 8 + j[None, :]                     # [BYTES_HW, 8]
    hw3 = hw[None, :, :]
    ok = r_ok[:, None, None] & (hw3 < HW)
    off = (r * HW)[:, None, None] + hw3
    _act_rows_tile(x_ptr, y_ptr, mask_ptr, scale_ptr, shift_ptr, pos_ptr, xc_ptr, off, ok,
                   c, r_ok, n, r, bh, j, hw3, HW, K, upper, HAS_AFFINE, HAS_UPPER, HAS_COMPACT)


@triton.jit
def _act_fwd_cl_kernel(x_ptr, y_ptr, mask_ptr, scale_ptr, shift_ptr, pos_ptr, xc_ptr,
                       C, HW, K, s_n, s_hw, upper, num_c_blocks, num_hw_blocks,
                       HAS_AFFINE: tl.constexpr, HAS_UPPER: tl.constexpr,
                       HAS_COMPACT: tl.constexpr, BLOCK_C: tl.constexpr,
                       BYTES_HW: tl.constexpr):
    # channels_last, HW % 8 == 0: channel stride 1, tile [BLOCK_C, BYTES_HW, 8] of sample n.
    pid = tl.program_id(0).to(tl.int64)
    pid_c = pid % num_c_blocks
    rest = pid // num_c_blocks
    pid_h = rest % num_hw_blocks
    n = rest // num_hw_blocks
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    bh = pid_h * BYTES_HW + tl.arange(0, BYTES_HW)       # byte index inside a channel row
    j = tl.arange(0, 8)
    hw = bh[:, None] * 8 + j[None, :]                     # [BYTES_HW, 8]
    c3 = c[:, None, None]
    hw3 = hw[None, :, :]
    ok = (c3 < C) & (hw3 < HW)
    off = n * s_n + c3 + hw3 * s_hw
    _act_rows_tile(x_ptr, y_ptr, mask_ptr, scale_ptr, shift_ptr, pos_ptr, xc_ptr, off, ok,
                   c, c < C, n, n * C + c, bh, j, hw3, HW, K, upper, HAS_AFFINE, HAS_UPPER,
                   HAS_COMPACT)


def _rows_tile(HW: int) -> tuple[int, int]:
    """(BLOCK_R, BYTES_HW): whole rows when they fit in a tile, several rows per tile."""
    bytes_hw = min(ROWS_TILE_BYTES, _checks.next_pow2(HW // 8))
    return ROWS_TILE_BYTES // bytes_hw, bytes_hw


def _cl_tile(C: int) -> tuple[int, int]:
    for bc, bh in CL_TILES:
        if C <= bc:
            return bc, bh
    return CL_TILES[-1]


def _launch(x: Tensor, y: Tensor, mask: Tensor, scale, shift, pos, xc, upper, K: int) -> None:
    """x, y: same strides; 4-D when the affine or the compaction is on."""
    numel = x.numel()
    if numel == 0:
        return
    has_affine = scale is not None
    has_compact = pos is not None
    dummy = mask                          # never dereferenced when its flag is off
    scale = scale if has_affine else dummy
    shift = shift if has_affine else dummy
    pos_t = pos if has_compact else dummy
    xc_t = xc if has_compact else dummy
    up = 0.0 if upper is None else upper
    flags = dict(HAS_AFFINE=has_affine, HAS_UPPER=upper is not None, HAS_COMPACT=has_compact)
    # every offset (x, y, mask, compact copy; x's are < numel for these dense layouts)
    # and the padded byte range fit in int32
    small = numel + 8 * 8 * FLAT_BYTES <= _checks.INT32_MAX and not FORCE_INT64_INDEX
    if x.is_contiguous():
        if x.dim() == 4:
            C, HW = x.shape[1], x.shape[2] * x.shape[3]
        else:
            C, HW = 1, 1
        if x.dim() == 4 and HW % 8 == 0 and (has_affine or has_compact):
            rows = x.shape[0] * C
            br, bh = _rows_tile(HW)
            nh = _checks.cdiv(HW, 8 * bh)
            _act_fwd_rows_kernel[(_checks.cdiv(rows, br) * nh,)](
                x, y, mask, scale, shift, pos_t, xc_t, rows, C, HW, K, up, nh,
                BLOCK_R=br, BYTES_HW=bh, num_warps=NUM_WARPS, **flags)
            return
        grid = (_checks.cdiv(numel, 8 * FLAT_BYTES),)
        _act_fwd_flat_kernel[grid](x, y, mask, scale, shift, pos_t, xc_t, numel, C, HW, K,
                                   0, 0, 0, up, STRIDED=False, BIG_HW=HW >= 8,
                                   INT32_INDEX=small,
                                   BYTES=FLAT_BYTES, num_warps=NUM_WARPS, **flags)
        return
    # channels_last (checked by the callers): H and W merge into one axis of stride C.
    N, C, H, W = x.shape
    HW = H * W
    s_n = x.stride(0)
    if HW % 8 == 0:
        bc, bh = _cl_tile(C)
        nc, nh = _checks.cdiv(C, bc), _checks.cdiv(HW, 8 * bh)
        _act_fwd_cl_kernel[(N * nc * nh,)](x, y, mask, scale, shift, pos_t, xc_t, C, HW, K,
                                           s_n, C, up, nc, nh, BLOCK_C=bc, BYTES_HW=bh,
                                           num_warps=NUM_WARPS, **flags)
    else:
        grid = (_checks.cdiv(numel, 8 * FLAT_BYTES),)
        _act_fwd_flat_kernel[grid](x, y, mask, scale, shift, pos_t, xc_t, numel, C, HW, K,
                                   s_n, 1, C, up, STRIDED=True, BIG_HW=HW >= 8,
                                   INT32_INDEX=small,
                                   BYTES=FLAT_BYTES, num_warps=NUM_WARPS, **flags)


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def relu_forward_mask(x: Tensor, upper: float | None) -> tuple[Tensor, Tensor]:
    """ReLU (``upper=None``) or clamp to ``[0, upper]``; returns (output, packed mask).

    Same contract as :func:`trady_triton.reference.relu_forward_mask`. The output
    keeps ``x``'s layout (contiguous or channels_last; other layouts come out
    contiguous); the mask is in logical NCHW order.
    """
    _checks.check_float("x", x)
    _checks.check_device(x=x)
    upper = _checks.check_upper(upper)
    if not (x.is_contiguous() or _is_channels_last(x)):
        x = x.contiguous()
    y = _checks.empty(None, x.dtype, x.device, like=x)
    mask = _checks.empty((_checks.cdiv(x.numel(), 8),), torch.uint8, x.device)
    _launch(x, y, mask, None, None, None, None, upper, 0)
    return y, mask


def _check_unique_index(idx: Tensor, C: int) -> tuple[int, Tensor | None]:
    """Range check plus the inverse map ``pos[c] = k`` (-1 if unselected): one host sync
    per index tensor and version (cached, see ``_checks.cache_get``).

    Returns (K, pos), pos None when ``idx`` repeats a channel.
    """
    K = _checks.check_index("idx", idx, C, values=False)
    if K == 0:
        return 0, None
    cached = _checks.cache_get(idx, ("pos", C))
    if cached is not None:
        return K, cached[0]
    idx_l = idx.long()
    clamped = idx_l.clamp(0, C - 1)
    pos = torch.full((C,), -1, dtype=torch.int32, device=idx.device)
    ar = torch.arange(K, dtype=torch.int32, device=idx.device)
    pos.index_put_((clamped,), ar)
    lo, hi = torch.aminmax(idx_l)
    dup = (pos.index_select(0, clamped) != ar).any()
    lo, hi, dup = torch.stack([lo, hi, dup.long()]).tolist()
    if lo < 0 or hi >= C:
        raise ValueError(f"idx: values must lie in [0, {C}) (the number of channels of x); "
                         f"got min {lo}, max {hi}")
    pos = None if dup else pos
    _checks.cache_put(idx, ("pos", C), (pos,))
    _checks.cache_put(idx, ("range", C), True)
    return K, pos


def prepare_index(idx: Tensor, C: int) -> None:
    """Range check and inverse map of ``idx`` for ``C`` channels, computed and cached now.

    The controller calls it once per selection, so that the launchers (compaction, the
    weight gradients, the fused BN kernel) find them cached and a training step does
    no host sync.
    """
    _check_unique_index(idx, C)


def affine_relu_compact(x: Tensor, scale: Tensor, shift: Tensor, upper: float | None,
                        idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fused frozen BatchNorm -> ReLU/ReLU6 -> compaction of the channels ``idx``.

    ``y = relu(x * scale[c] + shift[c])`` (clamped at ``upper`` if given) for a 4-D
    ``x``; returns (y, packed mask, ``y[:, idx]`` contiguous), reading ``x`` once.
    The output dtype follows torch's promotion of x, scale and shift.
    """
    _checks.check_float("x", x)
    _checks.check_float("scale", scale)
    _checks.check_float("shift", shift)
    _checks.check_tensor("idx", idx)
    _checks.check_device(x=x, scale=scale, shift=shift, idx=idx)
    upper = _checks.check_upper(upper)
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D [N, C, H, W] tensor, got shape {tuple(x.shape)}")
    C = x.shape[1]
    for name, t in (("scale", scale), ("shift", shift)):
        if t.dim() != 1 or t.shape[0] != C:
            raise ValueError(f"{name}: expected shape ({C},) (one value per channel of x), "
                             f"got {tuple(t.shape)}")
    K, pos = _check_unique_index(idx, C)
    out_dtype = torch.promote_types(x.dtype, torch.promote_types(scale.dtype, shift.dtype))
    if not (x.is_contiguous() or _is_channels_last(x)):
        x = x.contiguous()
    scale = scale.contiguous()
    shift = shift.contiguous()
    N, _, H, W = x.shape
    y = _checks.empty(None, out_dtype, x.device, like=x)
    mask = _checks.empty((_checks.cdiv(x.numel(), 8),), torch.uint8, x.device)
    xc = _checks.empty((N, K, H, W), out_dtype, x.device)
    # Repeated channels (never drawn by the sampler) cannot use the inverse map:
    # compact from y in a second pass instead.
    _launch(x, y, mask, scale, shift, pos, xc if pos is not None else None, upper, K)
    if K and pos is None:
        xc = compact_channels(y, idx, 1)
    return y, mask, xc


def _compile_specs():
    for dt in ("fp16", "bf16", "fp32"):
        base = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "mask_ptr": "*u8", "scale_ptr": "*fp32",
                "shift_ptr": "*fp32", "pos_ptr": "*i32", "xc_ptr": f"*{dt}"}
        # The constexpr branches are additive: "all on" plus "all off" (and the
        # small-H*W path) compile every line of each kernel.
        for affine, upper, compact, strided, big, small in (
                (True, True, True, True, True, True), (True, True, True, True, True, False),
                (False, False, False, False, False, False),
                (True, False, True, False, False, True)):
            flags = {"HAS_AFFINE": affine, "HAS_UPPER": upper, "HAS_COMPACT": compact}
            sig = dict(base)
            sig.update({n: "i32" for n in ("C", "HW", "K", "s_n", "s_c", "s_hw")})
            sig["numel"] = "i64"
            sig["upper"] = "fp32"
            sig.update({n: "constexpr" for n in list(flags) + ["STRIDED", "BIG_HW", "INT32_INDEX",
                                                                "BYTES"]})
            cst = dict(flags, STRIDED=strided, BIG_HW=big, INT32_INDEX=small, BYTES=FLAT_BYTES)
            yield _act_fwd_flat_kernel, sig, cst, {"num_warps": NUM_WARPS}
        for affine, upper, compact in ((True, True, True), (False, False, False)):
            flags = {"HAS_AFFINE": affine, "HAS_UPPER": upper, "HAS_COMPACT": compact}
            # every tile _rows_tile makes (H*W = 8 .. 8 * ROWS_TILE_BYTES and beyond) with
            # every branch on; the all-off variant on one tile
            row_tiles = sorted({_rows_tile(8 << i) for i in range(ROWS_TILE_BYTES.bit_length())})
            for br, bh in (row_tiles if affine else row_tiles[:1]):
                sig = dict(base)
                sig.update({n: "i32" for n in ("ROWS", "C", "HW", "K", "num_hw_blocks")})
                sig["upper"] = "fp32"
                sig.update({n: "constexpr" for n in list(flags) + ["BLOCK_R", "BYTES_HW"]})
                cst = dict(flags, BLOCK_R=br, BYTES_HW=bh)
                yield _act_fwd_rows_kernel, sig, cst, {"num_warps": NUM_WARPS}
            for bc, bh in CL_TILES:
                sig = dict(base)
                sig.update({n: "i32" for n in ("C", "HW", "K", "s_n", "s_hw",
                                                 "num_c_blocks", "num_hw_blocks")})
                sig["upper"] = "fp32"
                sig.update({n: "constexpr" for n in list(flags) + ["BLOCK_C", "BYTES_HW"]})
                cst = dict(flags, BLOCK_C=bc, BYTES_HW=bh)
                yield _act_fwd_cl_kernel, sig, cst, {"num_warps": NUM_WARPS}
