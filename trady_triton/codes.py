"""k-bit codes for compressed backward: derivative levels and group-scaled integers.

Two codings, both packed ``8 // bits`` codes per byte (:func:`pooling.pack_codes`):

* :func:`fit_levels` / :func:`encode_levels`: a piecewise-constant approximation of an
  activation's derivative with ``2**bits`` levels placed where the derivative's values
  actually are (Lloyd-Max on a histogram of this tensor's values, as Few-bit backward
  places its pieces for the input's distribution). Each element keeps the index of its
  nearest level; the levels are the exact means of the values that chose them.
* :func:`quantize_groups` / :func:`dequantize_groups`: ``2**bits`` evenly spaced
  levels between each group's minimum and maximum (asymmetric: SiLU / Hardswish
  outputs are mostly >= 0), one (minimum, step) pair per group of ``group``
  consecutive elements, rounded to the nearest level.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .pooling import pack_codes, unpack_codes

_HISTOGRAM_BINS_PER_LEVEL = 16   # histogram resolution: well below a level's spacing
_LLOYD_ITERATIONS = 25


def _lloyd_on_histogram(centres: Tensor, weights: Tensor, levels: int) -> Tensor:
    """``levels`` sorted levels minimising the weighted squared error of ``centres``.

    Starts from the high-resolution optimum (level density proportional to the cube
    root of the value density, Panter-Dite), then Lloyd iterations.
    """
    companded = weights.pow(1 / 3)
    cumulative = companded.cumsum(0) / companded.sum()
    targets = (torch.arange(levels, dtype=centres.dtype) + 0.5) / levels
    found = centres[torch.searchsorted(cumulative, targets).clamp_(max=centres.numel() - 1)]
    for _ in range(_LLOYD_ITERATIONS):
        cell = torch.bucketize(centres, (found[1:] + found[:-1]) / 2)
        mass = torch.zeros(levels, dtype=centres.dtype).index_add_(0, cell, weights)
        total = torch.zeros(levels, dtype=centres.dtype).index_add_(0, cell, weights * centres)
        found = torch.where(mass > 0, total / mass.clamp(min=1e-300), found)
    return found.sort().values


def fit_levels(values: Tensor, bits: int) -> Tensor:
    """``2**bits`` levels (float64, on the CPU) for ``values``' distribution."""
    low, high = (float(v) for v in torch.aminmax(values.detach()))
    if high <= low:
        return torch.full((2 ** bits,), low, dtype=torch.float64)
    bins = max(1024, _HISTOGRAM_BINS_PER_LEVEL * 2 ** bits)
    histogram = torch.histc(values.detach().float(), bins, low, high).double().cpu()
    width = (high - low) / bins
    centres = low + width * (torch.arange(bins, dtype=torch.float64) + 0.5)
    return _lloyd_on_histogram(centres, histogram, 2 ** bits)


def encode_levels(values: Tensor, levels: Tensor) -> tuple[Tensor, Tensor]:
    """(codes of the nearest level, the levels as the exact mean of each code's values).

    A level no value chose keeps its fitted value. Levels come back in ``values``' dtype.
    """
    levels = levels.to(values.device, values.dtype)
    codes = torch.bucketize(values, (levels[1:] + levels[:-1]) / 2).reshape(-1)
    count = torch.bincount(codes, minlength=levels.numel()).to(values.dtype)
    total = torch.zeros_like(levels).index_add_(0, codes, values.reshape(-1))
    means = torch.where(count > 0, total / count.clamp(min=1), levels)
    return codes, means


def derivative_codes(values: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(packed ``bits``-bit codes, ``2**bits`` levels) of ``values`` (a derivative)."""
    codes, levels = encode_levels(values, fit_levels(values, bits))
    return pack_codes(codes, bits), levels


def decode_levels(packed: Tensor, levels: Tensor, bits: int, shape) -> Tensor:
    """Inverse of :func:`derivative_codes`: each element's level, in ``levels``' dtype."""
    return levels[unpack_codes(packed, bits, math.prod(shape))].reshape(shape)


def quantize_groups(x: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor]:
    """(packed codes, ``[groups, 2]`` (minimum, step)) of ``x`` in groups of ``group``.

    Groups are consecutive elements of the contiguous ``x``; ``group`` must divide its size.
    """
    if x.numel() % group:
        raise ValueError(f"group={group}: must divide the tensor's {x.numel()} elements")
    rows = x.detach().reshape(-1, group)
    low, high = torch.aminmax(rows, dim=1, keepdim=True)
    step = (high - low) / (2 ** bits - 1)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = ((rows - low) / safe).round_().clamp_(0, 2 ** bits - 1)
    return pack_codes(codes, bits), torch.cat([low, step], dim=1)


def dequantize_groups(packed: Tensor, scales: Tensor, bits: int, shape) -> Tensor:
    """Inverse of :func:`quantize_groups`: ``x`` of ``shape`` within half a step per element."""
    codes = unpack_codes(packed, bits, math.prod(shape)).reshape(scales.shape[0], -1)
    return (scales[:, :1] + codes.to(scales.dtype) * scales[:, 1:]).reshape(shape)


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes of :func:`pooling.pack_codes` for ``numel`` codes of ``bits`` bits."""
    per_byte = 8 // bits
    return -(-numel // per_byte)
