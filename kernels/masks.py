"""1-bit masks: pack, unpack, and the masked backward of ReLU / ReLU6.

Layout (shared with reference.py): flat uint8, ``ceil(numel / 8)`` bytes, bit j of
byte i is element ``8 * i + j`` in logical row-major (NCHW) order. Packing kernels
work on ``[BYTES, 8]`` tiles so each program owns whole bytes; the backward reads
one byte per 8 elements (contiguous gradients) or gathers the byte of each
element (channels_last gradients, where a tile runs along the channels).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _checks

FLAT_BYTES = 512                         # 4096 elements per program
CL_TILES = ((16, 256), (32, 128), (64, 64))    # (BLOCK_C, BLOCK_HW)
NUM_WARPS = 8


@triton.jit
def _pack_kernel(src_ptr, out_ptr, numel, BYTES: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid * BYTES + tl.arange(0, BYTES)
    j = tl.arange(0, 8)
    f = b[:, None] * 8 + j[None, :]
    v = tl.load(src_ptr + f, mask=f < numel, other=0)
    bits = tl.sum((v != 0).to(tl.int32) << j[None, :], axis=1)
    tl.store(out_ptr + b, bits.to(tl.uint8), mask=b * 8 < numel)


@triton.jit
def _unpack_kernel(packed_ptr, out_ptr, numel, BYTES: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid * BYTES + tl.arange(0, BYTES)
    j = tl.arange(0, 8)
    f = b[:, None] * 8 + j[None, :]
    byte = tl.load(packed_ptr + b, mask=b * 8 < numel, other=0).to(tl.int32)
    bits = (byte[:, None] >> j[None, :]) & 1
    tl.store(out_ptr + f, bits.to(tl.uint8), mask=f < numel)


@triton.jit
def _mask_bwd_flat_kernel(g_ptr, packed_ptr, out_ptr, numel, BYTES: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid * BYTES + tl.arange(0, BYTES)
    j = tl.arange(0, 8)
    f = b[:, None] * 8 + j[None, :]
    ok = f < numel
    byte = tl.load(packed_ptr + b, mask=b * 8 < numel, other=0).to(tl.int32)
    bit = (byte[:, None] >> j[None, :]) & 1
    g = tl.load(g_ptr + f, mask=ok, other=0)
    # where(), not a multiply: a NaN gradient behind a closed gate must give 0.
    tl.store(out_ptr + f, tl.where(bit != 0, g, tl.zeros_like(g)), mask=ok)


@triton.jit
def _mask_bwd_cl_kernel(g_ptr, packed_ptr, out_ptr, C, HW, s_n, s_hw, num_c_blocks,
                        num_hw_blocks, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    # channels_last gradient: tile along the contiguous channels, gather the mask bits.
    pid = tl.program_id(0).to(tl.int64)
    pid_c = pid % num_c_blocks
    rest = pid // num_c_blocks
    pid_h = rest % num_hw_blocks
    n = rest // num_hw_blocks
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = pid_h * BLOCK_HW + tl.arange(0, BLOCK_HW)
    ok = (c < C)[:, None] & (hw < HW)[None, :]
    f = ((n * C + c) * HW)[:, None] + hw[None, :]
    byte = tl.load(packed_ptr + (f >> 3), mask=ok, other=0).to(tl.int32)
    bit = (byte >> (f & 7).to(tl.int32)) & 1
    off = n * s_n + c[:, None] + (hw * s_hw)[None, :]
    g = tl.load(g_ptr + off, mask=ok, other=0)
    tl.store(out_ptr + off, tl.where(bit != 0, g, tl.zeros_like(g)), mask=ok)


def _flat_grid(numel: int) -> tuple[int]:
    return (_checks.cdiv(numel, 8 * FLAT_BYTES),)


def _check_packed(packed, numel: int) -> None:
    _checks.check_tensor("packed", packed, (torch.uint8,))
    nbytes = _checks.cdiv(numel, 8)
    if packed.dim() != 1 or packed.numel() != nbytes:
        raise ValueError(f"packed: expected a 1-D uint8 tensor of ceil({numel} / 8) = {nbytes} "
                         f"bytes, got shape {tuple(packed.shape)}")


def pack_mask(passes: Tensor) -> Tensor:
    """Pack a boolean tensor into ``ceil(numel / 8)`` bytes (little bit order)."""
    _checks.check_tensor("passes", passes, (torch.bool,))
    _checks.check_device(passes=passes)
    src = passes.contiguous().reshape(-1).view(torch.uint8)
    numel = src.numel()
    out = _checks.empty((_checks.cdiv(numel, 8),), torch.uint8, passes.device)
    if numel:
        _pack_kernel[_flat_grid(numel)](src, out, numel, BYTES=FLAT_BYTES, num_warps=NUM_WARPS)
    return out


def unpack_mask(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_mask`: a flat bool tensor of ``numel`` elements."""
    if isinstance(numel, bool) or not isinstance(numel, int):
        raise TypeError(f"numel: expected an int, got {type(numel).__name__}")
    if numel < 0:
        raise ValueError(f"numel: expected a value >= 0, got {numel}")
    _checks.check_tensor("packed", packed, (torch.uint8,))
    if packed.dim() != 1 or packed.numel() < _checks.cdiv(numel, 8):
        raise ValueError(f"packed: expected a 1-D uint8 tensor of at least ceil({numel} / 8) = "
                         f"{_checks.cdiv(numel, 8)} bytes, got shape {tuple(packed.shape)}")
    _checks.check_device(packed=packed)
    packed = packed.contiguous()
    out = _checks.empty((numel,), torch.bool, packed.device)
    if numel:
        _unpack_kernel[_flat_grid(numel)](packed, out.view(torch.uint8), numel,
                                          BYTES=FLAT_BYTES, num_warps=NUM_WARPS)
    return out


def _cl_tile(C: int) -> tuple[int, int]:
    for bc, bh in CL_TILES:
        if C <= bc:
            return bc, bh
    return CL_TILES[-1]


def relu_backward_mask(grad_output: Tensor, packed: Tensor) -> Tensor:
    """``grad_output`` where the mask passes, 0 elsewhere (keeps grad_output's layout)."""
    _checks.check_float("grad_output", grad_output)
    _checks.check_tensor("packed", packed)
    _checks.check_device(grad_output=grad_output, packed=packed)
    numel = grad_output.numel()
    _check_packed(packed, numel)
    packed = packed.contiguous()
    g = grad_output
    if g.dim() == 4 and not g.is_contiguous() and g.is_contiguous(
            memory_format=torch.channels_last):
        out = _checks.empty(None, g.dtype, g.device, like=g)
        N, C, H, W = g.shape
        bc, bh = _cl_tile(C)
        nc, nh = _checks.cdiv(C, bc), _checks.cdiv(H * W, bh)
        if numel:
            _mask_bwd_cl_kernel[(N * nc * nh,)](g, packed, out, C, H * W, g.stride(0), C, nc, nh,
                                                BLOCK_C=bc, BLOCK_HW=bh, num_warps=NUM_WARPS)
        return out
    g = g.contiguous()
    out = _checks.empty(g.shape, g.dtype, g.device)
    if numel:
        _mask_bwd_flat_kernel[_flat_grid(numel)](g, packed, out, numel, BYTES=FLAT_BYTES,
                                                 num_warps=NUM_WARPS)
    return out


def _compile_specs():
    opts = {"num_warps": NUM_WARPS}
    yield _pack_kernel, {"src_ptr": "*u8", "out_ptr": "*u8", "numel": "i64",
                         "BYTES": "constexpr"}, {"BYTES": FLAT_BYTES}, opts
    yield _unpack_kernel, {"packed_ptr": "*u8", "out_ptr": "*u8", "numel": "i64",
                           "BYTES": "constexpr"}, {"BYTES": FLAT_BYTES}, opts
    for dt in ("fp16", "bf16", "fp32"):
        yield _mask_bwd_flat_kernel, {"g_ptr": f"*{dt}", "packed_ptr": "*u8", "out_ptr": f"*{dt}",
                                      "numel": "i32", "BYTES": "constexpr"}, \
            {"BYTES": FLAT_BYTES}, opts
        for bc, bh in CL_TILES:
            sig = {"g_ptr": f"*{dt}", "packed_ptr": "*u8", "out_ptr": f"*{dt}"}
            sig.update({n: "i32" for n in ("C", "HW", "s_n", "s_hw", "num_c_blocks",
                                           "num_hw_blocks")})
            sig.update(BLOCK_C="constexpr", BLOCK_HW="constexpr")
            yield _mask_bwd_cl_kernel, sig, {"BLOCK_C": bc, "BLOCK_HW": bh}, opts
