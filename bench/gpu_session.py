#!/usr/bin/env python
"""The GPU checks and the GPU benchmarks in one call, within the device tool's 10 minutes.

    python bench/gpu_session.py --out "$OUT"            # tests, then the full bench
    python bench/gpu_session.py --out "$OUT" --quick    # tests, then the quick bench

1. The kernel tests and the end-to-end test on the GPU (pytest, every kernel with its first
   configuration: TRADY_AUTOTUNE=0), capped at ``--tests-s``; compile tests excluded (they
   run on the CPU in CI).
2. ``bench/graph_step.py``: TraDy against full fine-tuning, eager and CUDA-graph captured
   (like with like), host time apart from device time, and which weight-gradient path
   (Triton or cuDNN/cuBLAS) won per shape; capped at ``--graph-s``.
3. ``bench/run_bench.py`` on the GPU with the time that is left of ``--budget-s``.
4. A summary of the tests and the issue's targets, then the bench tables, printed last.

Writes into OUT: ``tests.log``, ``tests.xml`` (JUnit), ``graph_step.log`` /
``graph_step.json``, ``bench/`` (``cases.jsonl``,
``results.json``, ``results.md``). Runs from a bare copy of the repository (no install):
the repository goes on the path and ``kernels/`` is loaded as ``trady_triton.kernels``.
Afterwards, here: ``python bench/run_gpu.py --render <OUT>/bench --update-results``, and
copy ``<OUT>/bench`` to ``bench/results/gpu/``.
``--device cpu`` is a dry run of the same pipeline (interpreter, tiny bench) for its tests.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
KERNEL_TESTS = ("tests/test_kernels_compaction.py", "tests/test_kernels_activation.py",
                "tests/test_kernels_masks.py", "tests/test_kernels_conv_weight_grad.py",
                "tests/test_kernels_depthwise_weight_grad.py",
                "tests/test_kernels_gemm_weight_grad.py", "tests/test_kernels_errors.py",
                "tests/test_kernels_end_to_end.py")


def _env(device: str, autotune: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(BENCH)] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # the tests check every kernel with its first config; the bench autotunes (unless the
    # caller pinned it with TRADY_AUTOTUNE=0 in the environment)
    if not autotune:
        env["TRADY_AUTOTUNE"] = "0"
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    return env


def junit_counts(path: Path) -> dict:
    """tests / failures / errors / skipped from a JUnit file (zeros if it is missing)."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return counts
    for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    return counts


def _run_logged(cmd: list, log_path: Path, env: dict, timeout_s: float, flag: str) -> int | str:
    """Run ``cmd`` from the repository root into ``log_path``; its exit code, or why not."""
    with open(log_path, "w") as log:
        try:
            return subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            return f"stopped after {timeout_s:.0f} s ({flag})"


def run_tests(args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "_kernels_shim", "-p", "no:cacheprovider",
           "--junitxml", str(out / "tests.xml"), *args.tests]
    if args.k:
        cmd += ["-k", args.k]
    started = time.time()
    rc = _run_logged(cmd, out / "tests.log", _env(args.device, autotune=False), args.tests_s,
                     "--tests-s")
    result = {"rc": rc, "wall_s": time.time() - started, **junit_counts(out / "tests.xml")}
    return result


TARGETS = (
    "TraDy step <= 0.8x full fine-tuning (MbV2-w0.35 128x128, b64/b256, fp32/bf16), eager "
    "vs eager and graph vs graph: graph_step table above",
    "masked weight gradient device time <= 1.25 r x full + 5 us on every bench shape: "
    "kernels_core table",
    "compaction and the fused kernel >= 70 % of the copy bandwidth: kernels_core table",
    "largest TraDy batch under 2 GiB >= 0.8x the largest no-grad forward batch: max_batch table",
)


def run_graph_step(args, out: Path) -> int | str:
    """bench/graph_step.py in a subprocess, its output kept in graph_step.log and echoed."""
    cmd = [sys.executable, str(BENCH / "graph_step.py"), "--out", str(out),
           "--device", args.device]
    rc = _run_logged(cmd, out / "graph_step.log", _env(args.device, autotune=True),
                     args.graph_s, "--graph-s")
    print((out / "graph_step.log").read_text()[-6000:], flush=True)
    return rc


def run_bench(args, out: Path, seconds: float) -> int:
    mode = args.bench_mode or ("quick" if args.quick else "full")
    cmd = [sys.executable, str(BENCH / "run_bench.py"), "--device", args.device, "--mode", mode,
           "--out", str(out / "bench"), "--budget-s", f"{seconds:.0f}", "--grace-s", "15"]
    return subprocess.run(cmd, cwd=REPO, env=_env(args.device, autotune=True)).returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the logs and results")
    p.add_argument("--budget-s", type=float, default=540,
                   help="whole session, tests and bench (default 540: the tool allows 600)")
    p.add_argument("--tests-s", type=float, default=170, help="cap on the tests (default 170)")
    p.add_argument("--graph-s", type=float, default=120,
                   help="cap on bench/graph_step.py (default 120)")
    p.add_argument("--quick", action="store_true", help="the bench's quick pass")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: dry run under the Triton interpreter (for this script's tests)")
    p.add_argument("--tests", nargs="+", default=list(KERNEL_TESTS), help="test files")
    p.add_argument("-k", default="not compile", help="pytest -k expression (default: not compile)")
    p.add_argument("--bench-mode", choices=("full", "quick", "tiny"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tests = run_tests(args, out)
    failed = tests["failures"] + tests["errors"]
    print(f"[gpu_session] tests: {tests['tests']} run, {failed} failed or errored, "
          f"{tests['skipped']} skipped, rc {tests['rc']}, {tests['wall_s']:.0f} s "
          f"(log: {out / 'tests.log'})", flush=True)
    graph_rc = run_graph_step(args, out)
    left = args.budget_s - (time.time() - started) - 15 - 10    # the bench's grace + margin
    bench_rc = run_bench(args, out, left) if left > 30 else "skipped: no time left"
    for target in TARGETS:
        print(f"[gpu_session] target: {target}", flush=True)
    print(f"[gpu_session] tests rc {tests['rc']} ({failed} failed), graph_step rc {graph_rc}, "
          f"bench rc {bench_rc}, {time.time() - started:.0f} s in all", flush=True)
    return 0 if tests["rc"] == 0 and graph_rc == 0 and bench_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
