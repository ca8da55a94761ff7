"""pytest plugin (``-p _kernels_shim``): ``trady_triton.kernels`` from the repository's
``kernels/`` folder when the package is not installed, as on the GPU machine, which runs
a bare copy of the repository. A no-op where the package is installed."""

from _bench_env import ensure_kernels

_module, _error = ensure_kernels()
if _module is None:
    raise ImportError(f"trady_triton.kernels: {_error}")
