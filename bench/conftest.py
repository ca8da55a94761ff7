"""pytest-benchmark suites of bench/: sizes, device, and the smoke mode.

Sizes (``--bench-size`` or ``TRADY_BENCH_SIZE``):

* ``tiny`` - the smoke run: tiny shapes, every case run once (no timing). This is the
  default whenever neither ``--benchmark-only`` nor ``--benchmark-enable`` is given, so
  a plain ``pytest`` (CI) or ``pytest bench/ --benchmark-disable`` takes seconds;
* ``cpu``  - the CPU suite (``pytest bench/ --benchmark-only``): MobileNetV2 / Lite0 /
  ResNet-18 layer shapes at batch 8, the training step at the paper's setting;
* ``gpu``  - the same on CUDA with the full sweep (default of ``--benchmark-only`` when
  a GPU is present; ``bench/run_gpu.py`` is the complete GPU run).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZES = ("auto", "tiny", "cpu", "gpu")


def pytest_addoption(parser):
    group = parser.getgroup("trady-bench")
    group.addoption("--bench-size", choices=SIZES,
                    default=os.environ.get("TRADY_BENCH_SIZE", "auto"),
                    help="shapes of bench/: tiny (smoke), cpu, gpu; auto = tiny unless "
                         "--benchmark-only/--benchmark-enable, then gpu if CUDA else cpu")
    group.addoption("--bench-threads", type=int,
                    default=int(os.environ.get("TRADY_BENCH_THREADS", "1")),
                    help="torch threads for the CPU suite (default 1)")


def _timing_requested(config) -> bool:
    return bool(config.getoption("benchmark_only", False)
                or config.getoption("benchmark_enable", False))


def bench_size(config) -> str:
    size = config.getoption("--bench-size")
    if size != "auto":
        return size
    if _timing_requested(config):
        import torch
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "tiny"


def pytest_configure(config):
    import torch

    if torch.cuda.is_available():
        from _bench_env import ensure_kernels
        ensure_kernels()      # the repository's kernels/ as trady_triton.kernels if not installed
    size = bench_size(config)
    config._trady_bench_size = size
    # The smoke run times nothing: same as --benchmark-disable (each case runs once).
    if size == "tiny" and not _timing_requested(config):
        config.option.benchmark_disable = True


def pytest_collection_modifyitems(config, items):
    """``slow`` cases (whole scripts end to end) run only with TRADY_RUN_SLOW=1, as in
    tests/: reported as skipped otherwise, never dropped silently."""
    if os.environ.get("TRADY_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set TRADY_RUN_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords and not item.get_closest_marker("skip"):
            item.add_marker(skip)


def pytest_report_header(config):
    return f"trady bench size: {getattr(config, '_trady_bench_size', '?')}"


@pytest.fixture(scope="session")
def size(request) -> str:
    return request.config._trady_bench_size


@pytest.fixture(scope="session")
def bench_device(size) -> str:
    import torch
    return "cuda" if size == "gpu" and torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def bench_threads(request) -> int:
    return request.config.getoption("--bench-threads")


@pytest.fixture(autouse=True)
def _bench_threads(request):
    """bench/ runs with ``--bench-threads`` torch threads (default 1), restored afterwards:
    on a shared machine oversubscribed OpenMP threads make tiny ops many times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(request.config.getoption("--bench-threads"))
    yield
    torch.set_num_threads(previous)
