#!/usr/bin/env python
"""Count the device work one training step launches, without a GPU.

    python bench/launch_count.py [--model tiny|mbv2|lite0] [--batch 2]

For full fine-tuning and TraDy (small budget, the Triton path under the interpreter) it
counts the ATen ops a step dispatches (``TorchDispatchMode``), those that launch device
work (views, allocations and metadata ops excluded), and the Triton kernel launches.
Triton kernels are not executed (their outputs are garbage): only the launches count.
On a GPU each launch costs host time, and a small network's step is bound by it, so
this is the figure to drive down when a TraDy step is slower than full fine-tuning.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parent))

# ops that dispatch but launch no device kernel
NO_KERNEL = {"view", "_unsafe_view", "expand", "t", "transpose", "permute", "detach", "alias",
             "as_strided", "reshape", "unsqueeze", "squeeze", "slice", "select", "empty",
             "empty_like", "new_empty", "empty_strided", "set_", "lift_fresh", "_reshape_alias",
             "split", "unbind", "expand_as", "view_as", "promote_types",
             "_record_function_enter_new", "_record_function_exit"}


def count_step(setup) -> tuple[collections.Counter, collections.Counter]:
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.interpreter import InterpretedFunction

    ops: collections.Counter = collections.Counter()
    launches: collections.Counter = collections.Counter()

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    original = InterpretedFunction.__getitem__

    def counted(self, grid):
        def launch(*args, **kwargs):
            launches[self.fn.__name__] += 1
        return launch

    InterpretedFunction.__getitem__ = counted
    try:
        setup.step()                      # warm-up (first-call caches)
        ops.clear()
        launches.clear()
        with Ops():
            setup.step()
    finally:
        InterpretedFunction.__getitem__ = original
    return ops, launches


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", choices=("tiny", "mbv2", "lite0"),
                        help="bench/_train_bench.py model spec (default tiny: MbV2-w0.35 at 32x32)")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    import trady_triton as tt
    import _train_bench as TB

    tt.set_backend("triton")
    for method, level in (("full", None), ("trady", "small")):
        setup = TB.make_setup({"model": args.model, "method": method, "budget": level,
                               "batch": args.batch, "backend": "triton"}, "cpu")
        ops, launches = count_step(setup)
        device_ops = {k: v for k, v in ops.items() if k not in NO_KERNEL}
        print(f"{method:5s}: {sum(ops.values())} ATen ops, {sum(device_ops.values())} launching "
              f"device work, {sum(launches.values())} Triton launches")
        top = sorted(device_ops.items(), key=lambda kv: -kv[1])[:8]
        print("       most frequent:", ", ".join(f"{k} {v}" for k, v in top))
        if launches:
            print("       Triton:", ", ".join(f"{k} {v}" for k, v in launches.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
