"""Helpers for testing the kernels against float64 references (used by tests/)."""

from __future__ import annotations

import contextlib
import math

import torch

from . import _checks

# (rtol, atol per sqrt(reduction length)): float32 accumulation everywhere, so the
# error is the output's rounding plus an accumulation error growing like sqrt(L).
_TOL = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (5e-2, 1e-2),
}


def tolerances(dtype: torch.dtype, reduction_length: int = 1) -> dict:
    """``rtol``/``atol`` for :func:`torch.testing.assert_close` at this dtype and length."""
    rtol, atol = _TOL[dtype]
    return {"rtol": rtol, "atol": atol * math.sqrt(max(1, reduction_length))}


@contextlib.contextmanager
def poisoned():
    """Within the block, every buffer a kernel must overwrite starts as NaN / 0xA5."""
    previous = _checks.POISON
    _checks.POISON = True
    try:
        yield
    finally:
        _checks.POISON = previous
