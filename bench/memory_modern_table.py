#!/usr/bin/env python
"""Bytes kept for backward at 2 % of full units, modern architectures, exact mode.

    python bench/memory_modern_table.py            # rewrites the cpu-memory-modern section
    python bench/memory_modern_table.py --no-write # prints the table only

Per architecture (random init, float32, batch 2) and seed: plain PyTorch full fine-tuning
(every parameter trained, eval mode so BatchNorm keeps its statistics) against the
converted model in train mode, both measured with ``saved_tensor_bytes`` (parameters
excluded), and the cost model's ``controller.saved_bytes``. Deterministic: no timing.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from _bench_env import replace_section  # noqa: E402

from trady_triton.accounting import plain_and_converted_bytes  # noqa: E402
from trady_triton.models.efficientnet_b0 import EfficientNetB0  # noqa: E402
from trady_triton.models.mobilenetv3 import MobileNetV3Small  # noqa: E402
from trady_triton.models.resnet import ResNet18  # noqa: E402
from trady_triton.models.transformers import BertEncoder, VisionTransformer  # noqa: E402

# name -> (constructor, input, the target factor or None)
ARCHITECTURES = {
    "MobileNetV3-Small 224": (MobileNetV3Small, lambda: torch.randn(2, 3, 224, 224), 3.5),
    "EfficientNet-B0 224": (EfficientNetB0, lambda: torch.randn(2, 3, 224, 224), 3.5),
    "ResNet-18 224": (ResNet18, lambda: torch.randn(2, 3, 224, 224), None),
    "ViT-Tiny 224": (VisionTransformer, lambda: torch.randn(2, 3, 224, 224), 2.2),
    "BERT-style encoder (4x256, 128 tokens)": (
        BertEncoder, lambda: torch.randint(0, 30522, (2, 128)), 2.2),
}
SEEDS = (0, 1, 2)


def table() -> str:
    rows = ["| architecture | plain PyTorch MiB | TraDy MiB (seeds 0-2) | = cost model | "
            "plain / TraDy (min) | target |", "|---|---|---|---|---|---|"]
    for name, (make, inputs, target) in ARCHITECTURES.items():
        x = inputs()
        results = []
        for seed in SEEDS:
            torch.manual_seed(0)   # the same random init for every draw
            results.append(plain_and_converted_bytes(make(num_classes=10), x, 0.02, seed))
        plain = results[0][0]
        ratio = min(plain / r[1] for r in results)
        verdict = "-" if target is None else f">= {target} ({'PASS' if ratio >= target else 'FAIL'})"
        rows.append(f"| {name} | {plain / 2**20:.2f} | "
                    f"{', '.join(f'{r[1] / 2**20:.2f}' for r in results)} | "
                    f"{'yes' if all(r[1] == r[2] for r in results) else 'NO'} | {ratio:.2f}x | "
                    f"{verdict} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    warnings.simplefilter("ignore")   # "no layer ranking": every layer is in the pool
    torch.set_num_threads(2)
    body = table()
    print(body)
    if not args.no_write:
        path = BENCH / "RESULTS.md"
        path.write_text(replace_section(path.read_text(), "cpu-memory-modern", body))


if __name__ == "__main__":
    main()
