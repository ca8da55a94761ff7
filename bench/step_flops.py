#!/usr/bin/env python
"""How fast a TraDy step can be, from its multiply-adds: the floor of the time ratio.

    python bench/step_flops.py                     # MbV2-w0.35 128x128, the issue's budget
    python bench/step_flops.py --model mcunet

TraDy runs the same forward as full fine-tuning and, behind its earliest trained layer,
the same input gradients (dX); it saves only the weight gradients (dW) of the unselected
channels. For a convolution or Linear the forward, dX and full dW each take the same
multiply-adds, so the conv/linear work of a TraDy step is (F + X_trady + W_selected) /
(F + X_full + F) of full fine-tuning's: with kernels equally fast per multiply-add, the
step-time ratio cannot go much below it (elementwise passes and Python cost come on top
of both rows).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def step_macs(layers, counts: dict[str, int]) -> dict[str, float]:
    """Per-image multiply-adds of the parts of a step, for the layers' cost facts and the
    selected channels per layer."""
    layers = sorted(layers, key=lambda l: l.order)
    forward = {l.name: l.macs_per_channel * l.in_channels for l in layers}
    trained = [l.order for l in layers if counts.get(l.name, 0) > 0]
    if not trained:
        raise ValueError("counts: no layer has a selected channel; allowed: a selection "
                         "with at least one trained layer")
    earliest = min(trained)
    return {
        "forward": sum(forward.values()),
        "dx_full": sum(forward[l.name] for l in layers[1:]),     # all but the input conv
        "dx_trady": sum(forward[l.name] for l in layers if l.order > earliest),
        "dw_full": sum(forward.values()),
        "dw_trady": sum(l.macs_per_channel * counts.get(l.name, 0) for l in layers),
    }


def macs_ratio(parts: dict[str, float]) -> float:
    """TraDy's conv/linear multiply-adds of a step over full fine-tuning's."""
    trady = parts["forward"] + parts["dx_trady"] + parts["dw_trady"]
    full = parts["forward"] + parts["dx_full"] + parts["dw_full"]
    return trady / full


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mbv2", choices=("mbv2", "lite0", "mcunet"))
    p.add_argument("--batch", type=int, default=None, help="default: the bench's batch")
    args = p.parse_args(argv)
    from _train_bench import StepSetup

    batch = args.batch or {"lite0": 8}.get(args.model, 32)
    setup = StepSetup(args.model, "trady", "small", batch)
    parts = step_macs(setup.controller.layers, setup.controller.counts())
    print(f"{args.model}, per image, millions of multiply-adds: "
          + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in parts.items()))
    print(f"conv/linear multiply-adds of a TraDy step / full fine-tuning's: "
          f"{macs_ratio(parts):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
