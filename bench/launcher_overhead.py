#!/usr/bin/env python
"""Host (Python) time of the kernel launchers, without a GPU.

    python bench/launcher_overhead.py

Every Triton launch is replaced by a no-op, so what remains is the launchers' own work:
argument checks, index caches, grid and split choices, output allocation. On a GPU this
time comes before every kernel and, for small layers, is what a step waits on. The
allocation of the dense weight gradient (``torch.zeros``) is timed apart: on CPU it is a
memset, on a GPU one more asynchronous launch.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")   # CPU tensors reach the launchers


def _time_us(fn, n: int = 3000) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main() -> int:
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    from trady_triton.kernels import affine_relu_compact, conv2d_weight_grad_masked

    InterpretedFunction.__getitem__ = lambda self, grid: (lambda *a, **k: None)
    torch.manual_seed(0)
    cases = [
        ("conv 3x3 256->256, 13 of 256 channels", (256, 256, 3, 3),
         lambda: conv2d_weight_grad_masked(x3, dy3, idx3, (256, 256, 3, 3), (1, 1), (1, 1),
                                           (1, 1), 1)),
        ("pointwise 96->16, 5 of 96 channels", (16, 96, 1, 1),
         lambda: conv2d_weight_grad_masked(x1, dy1, idx1, (16, 96, 1, 1), (1, 1), (0, 0),
                                           (1, 1), 1)),
        ("fused BN -> ReLU6 -> compact, 2 of 48 channels", None,
         lambda: affine_relu_compact(xa, scale, shift, 6.0, idxa)),
    ]
    idx3 = torch.randperm(256)[:13].int()
    x3, dy3 = torch.randn(4, 13, 14, 14), torch.randn(4, 256, 14, 14)
    idx1 = torch.randperm(96)[:5].int()
    x1, dy1 = torch.randn(4, 5, 16, 16), torch.randn(4, 16, 16, 16)
    idxa = torch.randperm(48)[:2].int()
    xa, scale, shift = torch.randn(4, 48, 16, 16), torch.rand(48), torch.randn(48)
    print("| launcher | host time µs (launch stubbed) | of which torch.zeros of dW µs |")
    print("|---|---|---|")
    for name, weight_shape, fn in cases:
        zeros = _time_us(lambda: torch.zeros(weight_shape)) if weight_shape else 0.0
        print(f"| {name} | {_time_us(fn):.1f} | {zeros:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
