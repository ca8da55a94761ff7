#!/usr/bin/env python
"""Bytes kept for backward at 2 % of full units, modern architectures, exact and compressed.

    python bench/memory_modern_table.py            # rewrites the cpu-memory-modern section
    python bench/memory_modern_table.py --no-write # prints the table only

Per architecture (random init, float32, batch 2) and seed: plain PyTorch full fine-tuning
(every parameter trained, eval mode so BatchNorm keeps its statistics) against the
converted model in train mode, both measured with ``saved_tensor_bytes`` (parameters
excluded), and the cost model's ``controller.saved_bytes``; the same with
``backward_bits`` 8, 4 and 2; then the compressed-mode gradient cosines per trained layer
(worst layer, and how many reach the issue's 0.99). No timing.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from _bench_env import replace_section  # noqa: E402

import trady_triton as tt  # noqa: E402
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
COMPRESSED_BITS = (8, 4, 2)
TARGET_4_BITS = {"MobileNetV3-Small 224": 12, "EfficientNet-B0 224": 12, "ViT-Tiny 224": 6,
                 "BERT-style encoder (4x256, 128 tokens)": 6}


def _draws(make, x, **options):
    results = []
    for seed in SEEDS:
        torch.manual_seed(0)   # the same random init for every draw
        results.append(plain_and_converted_bytes(make(num_classes=10), x, 0.02, seed, **options))
    return results


def _verdict(ratio: float, target) -> str:
    return "-" if target is None else f">= {target} ({'PASS' if ratio >= target else 'FAIL'})"


def _row(name, make, inputs, target) -> str:
    """One architecture: exact, then each compressed setting (min over seeds)."""
    x = inputs()
    by_bits = {bits: _draws(make, x, backward_bits=bits) for bits in (None, *COMPRESSED_BITS)}
    plain = by_bits[None][0][0]
    ratio = {bits: min(plain / r[1] for r in results) for bits, results in by_bits.items()}
    costed = all(r[1] == r[2] for results in by_bits.values() for r in results)
    exact_mib = ", ".join(f"{r[1] / 2**20:.2f}" for r in by_bits[None])
    return (f"| {name} | {plain / 2**20:.2f} | {exact_mib} | {ratio[None]:.2f}x | "
            f"{_verdict(ratio[None], target)} | {ratio[8]:.2f}x | {ratio[4]:.2f}x | "
            f"{_verdict(ratio[4], TARGET_4_BITS.get(name))} | {ratio[2]:.2f}x | "
            f"{'yes' if costed else 'NO'} |")


def table() -> str:
    rows = ["| architecture | plain PyTorch MiB | exact TraDy MiB (seeds 0-2) | exact: plain / TraDy "
            "(min) | target | 8-bit | 4-bit | 4-bit target | 2-bit | measured = cost model "
            "(all) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, (make, inputs, target) in ARCHITECTURES.items():
        rows.append(_row(name, make, inputs, target))
    return "\n".join(rows)


def _trained_gradients(net, x, bits) -> dict[str, torch.Tensor]:
    controller = tt.convert(net, 0.1, example_input=x, policy="d-fullrandom", seed=2,
                            backward_bits=bits)
    net.eval()
    net(x).logsumexp(1).sum().backward()
    return {name: m.weight.grad.double() for name, m in controller.modules.items()
            if getattr(m, "weight", None) is not None and m.weight.grad is not None}


def cosine_table() -> str:
    """Per trained layer, cosine of the compressed weight gradient with the exact one."""
    rows = ["| architecture (batch 4, keep 10 %) | bits | min cosine | layers >= 0.99 |",
            "|---|---|---|---|"]
    for name, make, x in (("EfficientNet-B0 96", EfficientNetB0, torch.randn(4, 3, 96, 96)),
                          ("MobileNetV3-Small 96", MobileNetV3Small, torch.randn(4, 3, 96, 96)),
                          ("ViT-Tiny 224", VisionTransformer, torch.randn(4, 3, 224, 224)),
                          ("BERT-style encoder 128 tokens", BertEncoder,
                           torch.randint(0, 30522, (4, 128)))):
        torch.manual_seed(0)
        net = make(num_classes=10)
        exact = _trained_gradients(copy.deepcopy(net), x, None)
        for bits in COMPRESSED_BITS:
            got = _trained_gradients(copy.deepcopy(net), x, bits)
            cosines = [float((g * got[k]).sum() / (g.norm() * got[k].norm())) for k, g in exact.items()]
            rows.append(f"| {name} | {bits} | {min(cosines):.4f} | "
                        f"{sum(c >= 0.99 for c in cosines)}/{len(cosines)} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    warnings.simplefilter("ignore")   # "no layer ranking": every layer is in the pool
    torch.set_num_threads(2)
    body = table() + "\n\nCompressed mode, gradient cosines against exact mode (one draw):\n\n" \
        + cosine_table()
    print(body)
    if not args.no_write:
        path = BENCH / "RESULTS.md"
        path.write_text(replace_section(path.read_text(), "cpu-memory-modern", body))


if __name__ == "__main__":
    main()
