#!/usr/bin/env python
"""Where a CPU training step spends its time: torch.profiler's top ops, TraDy next to full.

    python bench/profile_step.py                       # MbV2-w0.35 128x128 batch 32, small budget
    python bench/profile_step.py --model lite0 --batch 8 --threads 2 --top 12
    python bench/profile_step.py --by-shape --top 25   # per op and input shapes (per layer)

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


def top_ops(setup, steps: int, top: int, by_shape: bool = False) -> list[tuple[str, float, int]]:
    """(op name, self CPU ms per step, calls per step) of the ``top`` costliest ops; with
    ``by_shape`` one row per op and input shapes (a conv layer's forward, dX or dW)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=by_shape) as prof:
        for _ in range(steps):
            setup.step()
    rows = sorted(prof.key_averages(group_by_input_shape=by_shape),
                  key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(_label(e, by_shape), e.self_cpu_time_total / 1e3 / steps, e.count // steps)
            for e in rows[:top]]


def _label(event, by_shape: bool) -> str:
    if not by_shape:
        return event.key
    shapes = [s for s in event.input_shapes if s][:3]   # data, weight / grad: enough to tell
    return f"{event.key} {shapes}"


def render(method: str, ops: list[tuple[str, float, int]], step_ms: float) -> str:
    lines = [f"**{method}** (profiled step {step_ms:.0f} ms)", "",
             "| op | self CPU ms / step | calls / step |", "|---|---|---|"]
    lines += [f"| `{name}` | {ms:.1f} | {calls} |" for name, ms, calls in ops]
    return "\n".join(lines) + "\n"


def earliest_trained(setup) -> str:
    """Where the dX chain ends: the first conv/linear (module order) that trains, and how
    many convs/linears run before it (their backward is skipped)."""
    import torch.nn as nn

    layers = [(name, m) for name, m in setup.model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))]
    for position, (name, module) in enumerate(layers):
        if module.weight.requires_grad:
            return f"earliest trained layer `{name}`: {position} of {len(layers)} convs/linears before it"
    return "no trained layer"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mbv2", choices=("mbv2", "lite0", "tiny"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--budget", default="small")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--by-shape", action="store_true",
                   help="one row per op and input shapes (which layer, forward / dX / dW)")
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
        ops = top_ops(s, args.steps, args.top, args.by_shape)
        total = sum(ms for _, ms, _ in top_ops(s, 1, 10_000))
        print(render(method, ops, total))
        print(earliest_trained(s) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
