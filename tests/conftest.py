# --- Triton kernels (tests/test_kernels_*.py) -------------------------------------------
# Without a CUDA device the Triton kernels run in Triton's interpreter on the CPU.
# TRITON_INTERPRET must be set before any module that defines kernels is imported,
# hence here, at the very top of the first conftest.
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def device() -> str:
    """Where kernel tests put their tensors: cuda if present, else cpu (interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
# --- end of the Triton kernel section ----------------------------------------------------


@pytest.fixture
def one_thread():
    """Tiny shapes: one torch thread is faster, and the machine's cores are shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_collection_modifyitems(config, items):
    """``slow`` tests (minutes on two cores: full-size torch.compile, sm_80 compiles, notebooks,
    bench-script dry runs, soak) run only with TRADY_RUN_SLOW=1: reported as
    skipped otherwise, never dropped silently."""
    if os.environ.get("TRADY_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set TRADY_RUN_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
