"""Choose, per call, between the Triton kernels and the plain-PyTorch CPU implementation.

The ops of :mod:`trady_triton.ops` (``torch.ops.trady.*``) call :func:`ops_for` inside
their CPU and CUDA kernels: PyTorch's dispatcher picks the device, this module only
honours the backend switch below and names the one CPU implementation (``CPU_IMPL``).

Backends:

* ``"auto"`` (default): CUDA tensors go to the Triton kernels, CPU tensors to
  ``cpu_kernels.py`` (one-pass numba loops, which hand what they do not serve to
  ``reference.py``).
* ``"triton"``: always the Triton kernels. On CPU this needs
  ``TRITON_INTERPRET=1`` set before ``trady_triton`` is imported (tests use it).
* ``"reference"``: always plain PyTorch (the readable oracle; a debugging aid).

Set it with the environment variable ``TRADY_BACKEND`` or :func:`set_backend` /
the :func:`backend` context manager.
"""

from __future__ import annotations

import contextlib
import os

import torch

from . import cpu_kernels, reference

# The CPU implementation every op's CPU kernel calls (the "auto" backend): one module with
# the signatures of ``reference.py``, whose numba loops hand what they do not serve to it.
CPU_IMPL = cpu_kernels

BACKENDS = ("auto", "triton", "reference")
_backend = os.environ.get("TRADY_BACKEND", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"TRADY_BACKEND={_backend!r}: allowed values are {BACKENDS}")


def set_backend(name: str) -> None:
    """Select the kernel backend: one of ``"auto"``, ``"triton"``, ``"reference"``."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: allowed values are {BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def backend(name: str):
    """Context manager form of :func:`set_backend`."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def uses_triton(tensor: torch.Tensor) -> bool:
    if _backend == "triton":
        return True
    if _backend == "reference":
        return False
    return tensor.is_cuda


def ops_for(tensor: torch.Tensor):
    """The module of implementations (Triton launchers or ``CPU_IMPL``) for ``tensor``."""
    if uses_triton(tensor):
        from . import kernels  # imported lazily: Triton is only needed here
        return kernels
    return reference if _backend == "reference" else CPU_IMPL


def check_channel_index(name: str, idx, size: int) -> None:
    """The one check of a selection's channel indices: a 1-D int32/int64 tensor, values in
    ``[0, size)``, no repeats. Costs one host sync: call it when a selection changes
    (``apply_selection`` / ``resample``), never inside a training step."""
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64) \
            or idx.dim() != 1:
        got = (f"dtype {idx.dtype}, shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor)
               else type(idx).__name__)
        raise TypeError(f"{name}: expected a 1-D int32/int64 tensor of channel indices, got {got}")
    if idx.numel() == 0:
        return
    ordered = idx.sort().values
    repeats = (ordered[1:] == ordered[:-1]).sum().to(idx.dtype)
    lo, hi, repeats = torch.stack([ordered[0], ordered[-1], repeats]).tolist()
    if lo < 0 or hi >= size:
        raise ValueError(f"{name}: channels must be in [0, {size}); got min {lo}, max {hi}")
    if repeats:
        raise ValueError(f"{name}: channels must not repeat; got {repeats} repeated value(s)")


def prepare_index(idx: torch.Tensor, size: int) -> torch.Tensor:
    """``idx`` (already checked) with the kernels' per-index facts computed now.

    On the Triton path the launchers need a range check and, for the fused BN kernel,
    the inverse map ``pos[c] = k``; they cache both per index buffer (object, version).
    Computing them here, once per selection, leaves no host sync for the training steps.
    Returns ``idx``.
    """
    if idx.numel() and uses_triton(idx):
        from . import kernels
        kernels.prepare_index(idx, size)
    return idx
