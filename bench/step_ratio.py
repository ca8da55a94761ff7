#!/usr/bin/env python
"""TraDy's CPU training step against full fine-tuning, side by side in one process.

    python bench/step_ratio.py                          # MbV2-w0.35 128x128 batch 32, 1 thread
    python bench/step_ratio.py --model lite0 --batch 8 --threads 2
    python bench/step_ratio.py --model mcunet --backends auto reference
    python bench/step_ratio.py --variants               # + rows: BN unfolded, 1x1 by oneDNN

Rows (BatchNorm frozen in all): full fine-tuning, TraDy per ``--backends`` and a no-grad
forward of the same batch. Timing: two warm-up steps each, then ``--steps`` rounds in
which every row runs once (interleaved, so load changes hit all rows alike); medians.
Peak: in a child process with ``MALLOC_MMAP_THRESHOLD_=65536`` (freed tensors go back
to the OS), per row the process high-water mark of one steady-state step (after two
warm-up steps; reset with /proc/self/clear_refs) minus the resident size just before it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
MIB = 2**20
MMAP_THRESHOLD = "65536"
BUDGETS = {"mbv2": {"budget_units": 27_946}}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_above_idle(run) -> int:
    """Bytes the high-water mark of ``run()`` lies above the resident size before it.

    Linux keeps RSS counts per thread and folds them in lazily, so two reads can disagree by
    a few pages: a run that allocates nothing can read as 0.1 MiB *below* idle. Such a
    reading is no peak at all, so it is reported as 0.
    """
    Path("/proc/self/clear_refs").write_text("5")     # resets VmHWM to the current VmRSS
    idle = _status_kib("VmRSS")
    run()
    return max(0, _status_kib("VmHWM") - idle) * 1024


def build_rows(args) -> dict:
    """name -> zero-argument callable: one training step (or no-grad forward)."""
    import torch
    from _train_bench import StepSetup

    level = "small"
    full = StepSetup(args.model, "full", None, args.batch)
    rows = {"full": full.step}
    for backend in args.backends:
        rows[f"trady ({backend})"] = StepSetup(args.model, "trady", level, args.batch,
                                               backend=backend).step
        if args.variants:   # the same selection (same seed) without one of the speed-ups
            unfolded = StepSetup(args.model, "trady", level, args.batch, backend=backend)
            unfolded.controller.set_bn_folding(False)
            rows[f"trady ({backend}, BN not folded)"] = unfolded.step
            rows[f"trady ({backend}, 1x1 convs and depthwise dX by ATen)"] = _without_gemm(
                StepSetup(args.model, "trady", level, args.batch, backend=backend).step)

    def forward_no_grad():
        with torch.no_grad():
            full.model(full.x)
    rows["no-grad forward"] = forward_no_grad
    return rows


def _without_gemm(step):
    from trady_triton import cpu_kernels

    def run():
        with cpu_kernels.pointwise_gemm(False):
            step()
    return run


def time_rows(rows: dict, steps: int) -> dict:
    """name -> (median wall s, median process CPU s): CPU time is what the step itself
    spent on the cores, less sensitive to other processes than the wall clock."""
    for run in rows.values():
        run()
        run()
    times = {name: [] for name in rows}
    for _ in range(steps):
        for name, run in rows.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: tuple(statistics.median(t[k] for t in ts) for k in (0, 1))
            for name, ts in times.items()}


def peak_rows(rows: dict) -> dict:
    out = {}
    for name, run in rows.items():
        run()
        run()
        out[name] = peak_above_idle(run)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mbv2", choices=("mbv2", "lite0", "mcunet", "tiny"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--backends", nargs="+", default=["auto"])
    p.add_argument("--variants", action="store_true",
                   help="add rows per backend: frozen conv->BN pairs not folded; 1x1 convs "
                        "by ATen/oneDNN instead of a GEMM")
    p.add_argument("--peaks-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from _bench_env import ensure_repo_on_path
    ensure_repo_on_path()
    import torch
    torch.set_num_threads(args.threads)
    rows = build_rows(args)
    if args.peaks_only:
        print("@@PEAKS@@" + json.dumps(peak_rows(rows)))
        return 0
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    child = subprocess.run([sys.executable, __file__, "--peaks-only"] + (argv or sys.argv[1:]),
                           env=env, capture_output=True, text=True, check=True)
    peaks = json.loads(next(l for l in child.stdout.splitlines()
                            if l.startswith("@@PEAKS@@"))[len("@@PEAKS@@"):])
    medians = time_rows(rows, args.steps)
    wall_full, cpu_full = medians["full"]
    print(f"| {args.model} batch {args.batch}, {args.threads} thread(s) | median step ms "
          f"| x full | CPU ms | x full (CPU) | peak above idle MiB |\n|---|---|---|---|---|---|")
    for name, (wall, cpu) in medians.items():
        print(f"| {name} | {wall * 1e3:.0f} | {wall / wall_full:.2f} | {cpu * 1e3:.0f} | "
              f"{cpu / cpu_full:.2f} | {peaks[name] / MIB:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
