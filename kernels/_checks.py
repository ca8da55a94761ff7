"""Argument checks and small helpers shared by every launcher.

Every launcher validates its arguments here *before* any kernel launch, so bad
input fails with a ``TypeError``/``ValueError`` that names the parameter instead
of an illegal memory access. The kernels mask every index as well, so even an
unchecked index cannot make them read out of bounds.
"""

from __future__ import annotations

import math
import os
import weakref
from typing import Iterable, Sequence

import torch
from torch import Tensor

# Triton decides interpreted vs compiled when a kernel is decorated, i.e. when
# this package is imported: the variable must be set before that.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)

# Test hook: when True, buffers the kernels must fully overwrite are filled with
# NaN (floats) or a 0xA5 byte pattern (integers/bools) before each launch, so a
# test sees every element a kernel forgot to write.
POISON = False

# Accuracy of float32 tl.dot on the GPU: "tf32x3" (about float32 accuracy, the
# default), "tf32" (fastest, what cuDNN uses for convolutions by default) or
# "ieee" (exact float32 FMA, slowest). Half types always run on tensor cores.
FP32_DOT_PRECISION = os.environ.get("TRADY_FP32_DOT_PRECISION", "tf32x3")
if FP32_DOT_PRECISION not in ("tf32", "tf32x3", "ieee"):
    raise ValueError(f"TRADY_FP32_DOT_PRECISION={FP32_DOT_PRECISION!r}: allowed values are "
                     "'tf32', 'tf32x3', 'ieee'")

# TRADY_AUTOTUNE=0 launches the first GPU config of each kernel instead of
# autotuning (quick GPU test runs; every config is compiled by the test suite).
AUTOTUNE = os.environ.get("TRADY_AUTOTUNE", "1") != "0"

INT32_MAX = 2**31 - 1


def dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, dtypes: Sequence[torch.dtype] | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {str(t.dtype).replace('torch.', '')} is not supported; "
                        f"allowed dtypes are {dtype_names(dtypes)}")


def check_float(name: str, t) -> None:
    check_tensor(name, t, FLOAT_DTYPES)


def check_same_dtype(**tensors: Tensor) -> None:
    items = list(tensors.items())
    (n0, t0) = items[0]
    for n, t in items[1:]:
        if t.dtype != t0.dtype:
            raise TypeError(f"{n}: dtype {t.dtype} differs from {n0}'s dtype {t0.dtype}; "
                            "they must be equal")


def check_device(**tensors: Tensor) -> torch.device:
    """All tensors on one device: CUDA, or CPU under ``TRITON_INTERPRET=1``."""
    items = list(tensors.items())
    n0, t0 = items[0]
    for n, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{n}: device {t.device} differs from {n0}'s device {t0.device}; "
                             "all tensors must be on one device")
    dev = t0.device
    if dev.type == "cuda":
        return dev
    if dev.type == "cpu":
        if INTERPRET:
            return dev
        raise ValueError(f"{n0}: device cpu needs the Triton interpreter: set TRITON_INTERPRET=1 "
                         "before importing trady_triton (or use trady_triton.reference on CPU); "
                         "allowed devices are cuda, and cpu under the interpreter")
    raise ValueError(f"{n0}: device {dev} is not supported; allowed devices are cuda "
                     "(and cpu under TRITON_INTERPRET=1)")


def check_index(name: str, idx, size: int, what: str = "channels", values: bool = True) -> int:
    """``idx`` is a 1-D int32/int64 tensor with values in ``[0, size)``; returns its length.

    The range check (``values=True``) costs one device-to-host sync (a min/max of a
    tiny tensor).
    """
    if not isinstance(idx, Tensor):
        raise TypeError(f"{name}: expected a 1-D torch.Tensor of int32/int64 indices, "
                        f"got {type(idx).__name__}")
    if idx.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: dtype {str(idx.dtype).replace('torch.', '')} is not supported; "
                        f"allowed dtypes are {dtype_names(INDEX_DTYPES)}")
    if idx.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(idx.shape)}")
    if values and idx.numel() > 0 and cache_get(idx, ("range", size)) is None:
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(idx)).tolist())
        if lo < 0 or hi >= size:
            raise ValueError(f"{name}: values must lie in [0, {size}) (the number of {what}); "
                             f"got min {lo}, max {hi}")
        cache_put(idx, ("range", size), True)
    return idx.numel()


# Facts about an index tensor (range checked, inverse map) are cached per tensor
# object and its version counter: the sampler's index buffers change once per
# epoch, so steady-state training does no device-to-host sync here. In-place
# writes through torch bump ``_version`` and invalidate the entry; writes that
# bypass autograd's counter (``idx.data[...] = ...``) are not seen: replace or
# ``copy_`` index buffers instead.
_INDEX_CACHE: dict = {}
_INDEX_CACHE_MAX = 4096


def cache_get(idx: Tensor, kind):
    entry = _INDEX_CACHE.get((id(idx), kind))
    if entry is None:
        return None
    ref, version, ptr, value = entry
    if ref() is idx and version == idx._version and ptr == idx.data_ptr():
        return value
    return None


def cache_put(idx: Tensor, kind, value) -> None:
    if len(_INDEX_CACHE) >= _INDEX_CACHE_MAX:
        _INDEX_CACHE.clear()
    key = (id(idx), kind)
    try:
        ref = weakref.ref(idx, lambda _r, key=key: _INDEX_CACHE.pop(key, None))
    except TypeError:       # not weak-referenceable: do not cache
        return
    _INDEX_CACHE[key] = (ref, idx._version, idx.data_ptr(), value)


def check_upper(upper) -> float | None:
    if upper is None:
        return None
    if isinstance(upper, bool) or not isinstance(upper, (int, float)):
        raise TypeError(f"upper: expected None (ReLU) or a positive float (ReLU6-style clamp), "
                        f"got {type(upper).__name__}")
    upper = float(upper)
    if not (math.isfinite(upper) and upper > 0):
        raise ValueError(f"upper: expected None or a finite value > 0, got {upper}")
    return upper


def pair(name: str, v) -> tuple[int, int]:
    if isinstance(v, bool):
        raise TypeError(f"{name}: expected an int or a pair of ints, got bool")
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(
            isinstance(e, int) and not isinstance(e, bool) for e in v):
        return (int(v[0]), int(v[1]))
    raise TypeError(f"{name}: expected an int or a pair of ints, got {v!r}")


def check_int32_range(name: str, value: int) -> None:
    if value > INT32_MAX:
        raise ValueError(f"{name}: {value} exceeds 2**31 - 1, the limit of the kernels' "
                         "int32 reduction index")


def empty(shape, dtype: torch.dtype, device, like: Tensor | None = None) -> Tensor:
    """``torch.empty`` (or ``empty_like`` keeping ``like``'s layout), poisoned under POISON."""
    if like is not None:
        out = torch.empty_like(like, dtype=dtype)
    else:
        out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        if out.dtype.is_floating_point:
            out.fill_(float("nan"))
        elif out.dtype == torch.bool:
            out.view(torch.uint8).fill_(0xA5)
        else:
            out.view(torch.uint8).fill_(0xA5)
    return out


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for tl.dot: only float32 operands look at it."""
    return FP32_DOT_PRECISION if dtype == torch.float32 else "ieee"


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Multiprocessors of the device (a small fixed number under the interpreter)."""
    if device.type != "cuda":
        return 4
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SM_COUNT:
        _SM_COUNT[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SM_COUNT[i]


def cdiv(a: int, b: int) -> int:
    """Ceiling division for host code (``triton.cdiv`` costs ~1.5 us per call from Python)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def merge_dims(shape: Sequence[int], strides: Sequence[int]) -> tuple[int, int] | None:
    """(size, stride) of dims merged into one, or None if their strides do not allow it."""
    dims = [(s, st) for s, st in zip(shape, strides) if s != 1]
    size = math.prod(shape)
    if not dims:
        return size, 1
    for (s_a, st_a), (s_b, st_b) in zip(dims, dims[1:]):
        if st_a != st_b * s_b:
            return None
    return size, dims[-1][1]


def view3d(t: Tensor, dim: int) -> tuple[int, int, int, int, int, int] | None:
    """``t`` as (outer, C, inner) around ``dim``: sizes and strides, or None if not mergeable."""
    outer = merge_dims(t.shape[:dim], t.stride()[:dim])
    inner = merge_dims(t.shape[dim + 1:], t.stride()[dim + 1:])
    if outer is None or inner is None:
        return None
    return outer[0], t.shape[dim], inner[0], outer[1], t.stride(dim), inner[1]
