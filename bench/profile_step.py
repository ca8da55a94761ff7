#!/usr/bin/env python
"""Where a CPU training step spends its time: torch.profiler's top ops, TraDy next to full.

    python bench/profile_step.py                       # MbV2-w0.35 128x128 batch 32, small budget
    python bench/profile_step.py --model lite0 --batch 8 --threads 2 --top 12

Both setups are built in one process (BN frozen in both, as in _train_bench.py), warmed up
by two steps each, then profiled over ``--steps`` steps each, alternating. Prints, per
method, the ops with the largest self CPU time as a markdown table (ms per step).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))


def top_ops(setup, steps: int, top: int) -> list[tuple[str, float, int]]:
    """(op name, self CPU ms per step, calls per step) of the ``top`` costliest ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            setup.step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / 1e3 / steps, e.count // steps) for e in rows[:top]]


def render(method: str, ops: list[tuple[str, float, int]], step_ms: float) -> str:
    lines = [f"**{method}** (profiled step {step_ms:.0f} ms)", "",
             "| op | self CPU ms / step | calls / step |", "|---|---|---|"]
    lines += [f"| `{name}` | {ms:.1f} | {calls} |" for name, ms, calls in ops]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mbv2", choices=("mbv2", "lite0", "tiny"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--budget", default="small")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args(argv)
    from _bench_env import ensure_repo_on_path
    ensure_repo_on_path()
    import torch
    from _train_bench import make_setup

    torch.set_num_threads(args.threads)
    setups = {m: make_setup({"model": args.model, "method": m, "batch": args.batch,
                             "budget": None if m == "full" else args.budget}, "cpu")
              for m in ("trady", "full")}
    for s in setups.values():
        s.step()
        s.step()
    for method, s in setups.items():
        ops = top_ops(s, args.steps, args.top)
        total = sum(ms for _, ms, _ in top_ops(s, 1, 10_000))
        print(render(method, ops, total))
    return 0


if __name__ == "__main__":
    sys.exit(main())
