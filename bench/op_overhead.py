#!/usr/bin/env python
"""Host time one trady op adds per call, by registration style (no GPU needed).

    python bench/op_overhead.py

The same plain-PyTorch compaction called three ways, interleaved in rounds so that machine
load hits all alike: directly, through ``trady_triton.ops.compact_channels`` in eager mode
(which skips the dispatcher), as ``torch.ops.trady.compact_channels`` (a
``torch.library.Library`` definition: the dispatcher calls the Python kernel; what a
traced graph runs), and as a ``torch.library.custom_op`` of the same function. Prints
the median microseconds per call and the overhead over the direct call. On a GPU this is host time a step waits on unless
the step is CUDA-graph captured.
"""

from __future__ import annotations

import statistics
import time

import torch

from trady_triton import ops, reference


@torch.library.custom_op("trady_bench::compact_channels", mutates_args=(), device_types="cpu")
def _custom_op_compact(x: torch.Tensor, idx: torch.Tensor, channel_dim: int) -> torch.Tensor:
    return reference.compact_channels(x, idx, channel_dim)


def _per_call_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main(rounds: int = 15, calls: int = 300) -> None:
    torch.set_num_threads(1)
    x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([1, 5, 2])
    ways = {"direct (reference.py)": lambda: reference.compact_channels(x, idx, 1),
            "ops.compact_channels (eager)": lambda: ops.compact_channels(x, idx, 1),
            "torch.ops.trady (Library)": lambda: ops.OPS["compact_channels"](x, idx, 1),
            "torch.library.custom_op": lambda: _custom_op_compact(x, idx, 1)}
    times = {name: [] for name in ways}
    for fn in ways.values():
        _per_call_us(fn, calls)                       # warm-up
    for _ in range(rounds):
        for name, fn in ways.items():
            times[name].append(_per_call_us(fn, calls))
    direct = statistics.median(times["direct (reference.py)"])
    print("| call | us per call (median of rounds) | overhead us |\n|---|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.1f} | {med - direct:+.1f} |")


if __name__ == "__main__":
    main()
