"""Environment helpers shared by the benchmark suites and scripts of bench/.

* makes ``trady_triton`` importable from a bare checkout (``PYTHONPATH=.`` or not) and
  registers the top-level ``kernels/`` folder as ``trady_triton.kernels`` when the
  package is not installed (pyproject's ``package-dir`` only maps it in an install);
* machine / version facts for the result files;
* a timer: ``triton.testing.do_bench`` on CUDA (median, 20th and 80th percentile),
  an equivalent wall-clock loop on CPU.

Nothing here imports torch at module import time, so the GPU orchestrator
(``run_bench.py``) can start without paying for it.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
KERNEL_API = ("compact_channels", "conv2d_weight_grad_masked", "linear_weight_grad_masked",
              "relu_forward_mask", "relu_backward_mask", "affine_relu_compact")


def ensure_repo_on_path() -> None:
    """``import trady_triton`` works from a bare copy of the repository."""
    try:
        importlib.import_module("trady_triton")
        return
    except ImportError:
        pass
    sys.path.insert(0, str(REPO_ROOT))
    importlib.invalidate_caches()
    importlib.import_module("trady_triton")


def _load_kernels_from_folder(folder: Path):
    """Register ``folder`` (the repository's ``kernels/``) as ``trady_triton.kernels``."""
    import trady_triton

    name = "trady_triton.kernels"
    sys.modules.pop(name, None)
    init = folder / "__init__.py"
    if init.exists():
        spec = importlib.util.spec_from_file_location(name, init,
                                                      submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
    else:
        # No __init__ yet (work in progress): collect the API from the submodules.
        module = types.ModuleType(name)
        module.__path__ = [str(folder)]
        module.__package__ = name
        module.__file__ = str(folder)
        sys.modules[name] = module
        for path in sorted(folder.glob("*.py")):
            if path.stem.startswith("_"):
                continue
            sub = importlib.import_module(f"{name}.{path.stem}")
            for api in KERNEL_API:
                if hasattr(sub, api) and not hasattr(module, api):
                    setattr(module, api, getattr(sub, api))
    trady_triton.kernels = module
    return module


def ensure_kernels():
    """(module, None) or (None, error text): ``trady_triton.kernels``, shimmed if needed."""
    ensure_repo_on_path()
    try:
        return importlib.import_module("trady_triton.kernels"), None
    except Exception as first:   # noqa: BLE001 - reported, not hidden
        first_error = f"{type(first).__name__}: {first}"
    folder = REPO_ROOT / "kernels"
    if not folder.is_dir():
        return None, f"{first_error}; and no kernels/ folder at {folder}"
    try:
        return _load_kernels_from_folder(folder), None
    except Exception as second:   # noqa: BLE001
        return None, f"{first_error}; loading {folder} directly: {type(second).__name__}: {second}"


def kernel_status() -> dict:
    """Which Triton kernel functions are importable (name -> True/False) and the import error."""
    module, error = ensure_kernels()
    found = {api: bool(module is not None and callable(getattr(module, api, None)))
             for api in KERNEL_API}
    return {"functions": found, "error": error,
            "file": getattr(module, "__file__", None) if module is not None else None}


# --------------------------------------------------------------------------- machine facts
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:   # noqa: BLE001 - no git on the machine is fine
        pass
    return None


def machine_info(device: str = "cpu") -> dict:
    import torch

    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "git": _git_commit(),
        "TRADY_FP32_DOT_PRECISION": os.environ.get("TRADY_FP32_DOT_PRECISION", "(default)"),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as e:   # noqa: BLE001
        info["triton"] = f"not importable: {e}"
    if device == "cuda" and torch.cuda.is_available():
        def safe(fn):
            try:
                return fn()
            except Exception as e:   # noqa: BLE001 - a missing fact must not stop the run
                return f"? ({type(e).__name__})"
        props = torch.cuda.get_device_properties(0)
        info.update({
            "gpu": safe(lambda: torch.cuda.get_device_name(0)),
            "gpu_memory_gib": safe(lambda: round(props.total_memory / 2**30, 1)),
            "gpu_sms": safe(lambda: props.multi_processor_count),
            "cuda": safe(lambda: torch.version.cuda),
            "cudnn": safe(lambda: torch.backends.cudnn.version()),
            "cudnn.allow_tf32": safe(lambda: torch.backends.cudnn.allow_tf32),
            "cudnn.benchmark": safe(lambda: torch.backends.cudnn.benchmark),
            "matmul.allow_tf32": safe(lambda: torch.backends.cuda.matmul.allow_tf32),
            "float32_matmul_precision": safe(torch.get_float32_matmul_precision),
        })
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,"
                                  "power.limit", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=15)
            if out.returncode == 0:
                info["nvidia_smi"] = out.stdout.strip()
        except Exception:   # noqa: BLE001
            pass
    return info


# --------------------------------------------------------------------------- timing
def bench_fn(fn, device: str, warmup_ms: float = 10, rep_ms: float = 40) -> dict:
    """Median and 20th / 80th percentile of ``fn()``'s time, in microseconds.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls).
    CPU: wall clock around each call after ``warmup_ms`` of warm-up calls.
    """
    if device == "cuda":
        from triton.testing import do_bench
        med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"median_us": med * 1e3, "p20_us": p20 * 1e3, "p80_us": p80 * 1e3}
    t0 = time.perf_counter()
    fn()
    estimate = max(time.perf_counter() - t0, 1e-6)
    for _ in range(max(0, min(int(warmup_ms / 1e3 / estimate), 50))):
        fn()
    n = max(3, min(int(rep_ms / 1e3 / estimate), 200))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return {"median_us": statistics.median(times) * 1e6, "p20_us": q[1] * 1e6,
            "p80_us": q[7] * 1e6}


def bench_graph(fn, rep_ms: float = 40) -> dict:
    """Device time of ``fn()`` alone, in microseconds: many calls captured in one CUDA graph
    and replayed (``triton.testing.do_bench_cudagraph``), so no Python or launch overhead
    and no L2 flush between calls. Beside :func:`bench_fn` it splits a time into what the
    GPU spends and what the host adds. ``fn`` must not synchronise (no ``.item()``)."""
    from triton.testing import do_bench_cudagraph
    med, p20, p80 = do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return {"median_us": med * 1e3, "p20_us": p20 * 1e3, "p80_us": p80 * 1e3}


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def cuda_healthy() -> bool:
    """False once the CUDA context is poisoned (illegal address and the like)."""
    try:
        import torch
        t = torch.ones(4, device="cuda")
        ok = float((t + 1).sum().item()) == 8.0
        torch.cuda.synchronize()
        return ok
    except Exception:   # noqa: BLE001
        return False


# --------------------------------------------------------------------------- results
def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line and flush it to disk (a crash loses nothing written before)."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:   # a line cut by a kill: skip it
            continue
    return out


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def replace_section(text: str, name: str, body: str) -> str:
    """Replace what lies between ``<!-- BEGIN name -->`` and ``<!-- END name -->``."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"markers {begin} ... {end} not found")
    return text[:i + len(begin)] + "\n" + body.rstrip() + "\n" + text[j:]


def synced(fn, device: str):
    """``fn`` followed by a device synchronisation (so wall-clock timers see the work)."""
    if device != "cuda":
        return fn
    import torch

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run
