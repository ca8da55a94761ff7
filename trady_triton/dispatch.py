"""Choose, per call, between the Triton kernels and the plain-PyTorch CPU implementation.

The ops of :mod:`trady_triton.ops` (``torch.ops.trady.*``) call :func:`ops_for` inside
their CPU and CUDA kernels: PyTorch's dispatcher picks the device, this module only
honours the backend switch below and names the one CPU implementation (``CPU_IMPL``).

Backends:

* ``"auto"`` (default): CUDA tensors go to the Triton kernels, CPU tensors to
  ``reference.py``.
* ``"triton"``: always the Triton kernels. On CPU this needs
  ``TRITON_INTERPRET=1`` set before ``trady_triton`` is imported (tests use it).
* ``"reference"``: always plain PyTorch (a debugging aid on GPU).

Set it with the environment variable ``TRADY_BACKEND`` or :func:`set_backend` /
the :func:`backend` context manager.
"""

from __future__ import annotations

import contextlib
import os

import torch

from . import reference

# The plain-PyTorch implementation every CPU kernel calls: one module with the
# signatures of ``reference.py`` (swap it here, in one place, for a faster CPU module).
CPU_IMPL = reference

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
    return CPU_IMPL
