#!/usr/bin/env python
"""TraDy against full fine-tuning, eager and CUDA-graph captured, like with like.

    python bench/graph_step.py --out DIR               # GPU: MbV2-w0.35 128x128, b64/b256,
                                                       # float32 and bf16 autocast
    python bench/graph_step.py --out DIR --device cpu  # dry run (tiny model, eager only)

Per case (method, batch, precision): ``eager_us`` (one synchronised step, CUDA events),
``host_us`` (the Python time to issue one eager step, no wait: the host's share),
``graph_us`` (one replay of the whole step captured in a CUDA graph: device time alone)
and ``capture_s`` (warm-up plus capture after a ``resample()``: the recompile cost paid
once per epoch). A TraDy step is re-captured after each resample, since the index
buffers, the trained layers and the saved tensors change. The summary prints the ratios
TraDy / full, eager against eager and graph against graph, beside the target (<= 0.8),
and which weight-gradient path (Triton or vendor) won per shape. Writes
``DIR/graph_step.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET_RATIO = 0.8
# the CPU plan only checks the pipeline: one tiny case, few timed steps
GPU_PLAN = {"spec": "mbv2", "batches": (64, 256), "precisions": ("float32", "bf16"),
            "warm_ms": 10, "rep_ms": 60, "host_steps": 10}
CPU_PLAN = {"spec": "tiny", "batches": (2,), "precisions": ("float32",),
            "warm_ms": 0, "rep_ms": 0, "host_steps": 1}


def _autocast(device: str, precision: str):
    import torch
    if precision == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _timed_step(setup, precision: str):
    def step():
        with _autocast(setup.device, precision):
            setup.step()
    return step


def _host_us(step, device: str, n: int = 10) -> float:
    """Mean time to issue one step (no synchronisation inside the loop)."""
    from _bench_env import synchronize
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    issued = (time.perf_counter() - t0) / n
    synchronize(device)
    return issued * 1e6


def capture_step(step, warmup: int = 3):
    """The whole step (forward, backward, optimizer) in a CUDA graph; (graph, seconds).

    Warm-up runs on a side stream first (autotuning, the weight-gradient path choice and
    lazy allocations happen there, outside the capture), as torch.cuda.graphs asks.
    """
    import torch
    t0 = time.perf_counter()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize()
    return graph, time.perf_counter() - t0


def _graph_us(graph, reps: int = 20) -> float:
    import torch
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3


def run_case(plan: dict, method: str, batch: int, precision: str, device: str) -> dict:
    from _bench_env import bench_fn
    from _train_bench import make_setup
    setup = make_setup({"model": plan["spec"], "method": method, "budget": "medium" if method ==
                        "trady" else None, "batch": batch, "backend": "auto"}, device)
    rec = {"method": method, "batch": batch, "precision": precision}
    try:
        step = _timed_step(setup, precision)
        step()                                        # compile, autotune, choose paths
        rec["eager_us"] = bench_fn(step, device, plan["warm_ms"], plan["rep_ms"])["median_us"]
        rec["host_us"] = _host_us(step, device, plan["host_steps"])
        if device == "cuda":
            if setup.controller is not None:
                setup.controller.resample(1)          # a new epoch: capture anew
            graph, rec["capture_s"] = capture_step(step)
            rec["graph_us"] = _graph_us(graph)
        else:
            rec["graph_us"] = rec["capture_s"] = None  # blocked: CUDA graphs need a GPU
    finally:
        setup.free()
    return rec


def _ratio(records, precision, batch, field):
    by = {r["method"]: r.get(field) for r in records
          if r["precision"] == precision and r["batch"] == batch and "error" not in r}
    if by.get("trady") is None or not by.get("full"):
        return None
    return by["trady"] / by["full"]


def summary(records: list[dict], chooser_table: str) -> str:
    lines = ["| precision | batch | TraDy/full eager | TraDy/full graph | target |",
             "|---|---:|---:|---:|---|"]
    for precision in sorted({r["precision"] for r in records}):
        for batch in sorted({r["batch"] for r in records}):
            cells = []
            for field in ("eager_us", "graph_us"):
                ratio = _ratio(records, precision, batch, field)
                cells.append("blocked" if ratio is None else
                             f"{ratio:.2f} {'ok' if ratio <= TARGET_RATIO else 'MISSED'}")
            lines.append(f"| {precision} | {batch} | {cells[0]} | {cells[1]} | "
                         f"<= {TARGET_RATIO} |")
    return "\n".join(lines + ["", "weight-gradient path per shape:", chooser_table])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = p.parse_args(argv)
    import torch
    from _bench_env import ensure_kernels
    if args.device == "cpu":
        torch.set_num_threads(1)       # a dry run on shared cores
    ensure_kernels()             # a bare copy of the repository (the GPU machine): kernels/
    from trady_triton import fastest
    plan = GPU_PLAN if args.device == "cuda" else CPU_PLAN
    records = []
    for precision in plan["precisions"]:
        for batch in plan["batches"]:
            for method in ("full", "trady"):
                try:
                    records.append(run_case(plan, method, batch, precision, args.device))
                except Exception as e:  # noqa: BLE001  (one failed case must not end the run)
                    records.append({"method": method, "batch": batch, "precision": precision,
                                    "error": f"{type(e).__name__}: {e}"})
                print(f"[graph_step] {json.dumps(records[-1])}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "graph_step.json").write_text(json.dumps(records, indent=1))
    print(summary(records, fastest.CHOOSER.table()), flush=True)
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
