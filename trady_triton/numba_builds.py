"""Serial and parallel numba builds of one loop, and the rule that picks between them.

Shared by the CPU loops of ``cpu_kernels.py`` and ``cpu_depthwise.py``.
"""

from __future__ import annotations

import types

import torch

try:
    import numba
    from numba import njit
except ImportError:   # numba is a dependency; without it the callers use ATen / reference
    numba = None

__all__ = ["compiled_builds", "thread_count", "run"]


def compiled_builds(loop, **options):
    """(serial, parallel) builds of ``loop``. One thread runs the serial one: an
    OpenMP pool of numba's would spin beside torch's on the same cores.

    numba's on-disk cache keys an entry by function name and signature, not by
    ``parallel``: two builds of one function share it, and the serial one would load
    the parallel one's code (whose idle OpenMP workers then spin on the cores torch
    uses). The parallel build is compiled from a renamed copy, its own entry."""
    twin = types.FunctionType(loop.__code__, loop.__globals__, loop.__name__ + "_parallel",
                              loop.__defaults__, loop.__closure__)
    twin.__qualname__ = loop.__qualname__ + "_parallel"
    return (njit(nogil=True, cache=True, **options)(loop),
            njit(parallel=True, nogil=True, cache=True, **options)(twin))


def thread_count() -> int:
    """torch's intra-op thread count, capped by numba's pool size."""
    return min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)


def run(builds, *args) -> None:
    """Run the serial build on one thread, else the parallel one on :func:`thread_count`."""
    threads = thread_count()
    if threads <= 1:
        builds[0](*args)
        return
    numba.set_num_threads(threads)
    builds[1](*args)
