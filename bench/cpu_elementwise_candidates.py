#!/usr/bin/env python
"""Candidates for the CPU path's frozen BN -> ReLU6 -> 1-bit mask (forward) and mask + BN
scale (backward), timed side by side on one activation, interleaved; medians in ms.

    python bench/cpu_elementwise_candidates.py                 # [32, 48, 64, 64] float32, 1 thread
    python bench/cpu_elementwise_candidates.py --shape 8 32 112 112 --threads 2

Candidates: ``reference`` (vectorised torch ops + numpy.packbits, reference.py), ``numba``
(cpu_kernels.py, one loop), ``torch.compile`` (inductor's C++ backend on a pure-torch
version whose bit packing is a reshape-multiply-sum; skipped with a note when no C++
compiler is found; its compile time is reported) and, as the floor, what full fine-tuning
runs for the same activation (eval BatchNorm + hardtanh; hardtanh_backward + BN's input
gradient as a multiply).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _packed_pure_torch(passes):
    import torch
    bits = passes.reshape(-1, 8).to(torch.uint8) << torch.arange(8, dtype=torch.uint8)
    return bits.sum(dim=1, dtype=torch.uint8)


def _forward_pure_torch(x, scale, shift):
    import torch
    pre = torch.addcmul(shift[None, :, None, None], x, scale[None, :, None, None])
    y = pre.clamp(0.0, 6.0)
    return y, _packed_pure_torch((pre > 0) & (pre < 6))


def _backward_pure_torch(grad, packed, scale):
    import torch
    bits = (packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    keep = bits.reshape(grad.shape).bool()
    return torch.where(keep, grad, 0.0) * scale[None, :, None, None]


def candidates(x, grad, scale, shift):
    """name -> (forward callable, backward callable); compile notes in the second dict."""
    import torch
    import torch.nn.functional as F
    from trady_triton import cpu_kernels, reference

    _, packed = reference.affine_clamp_mask(x, scale, shift, 6.0)
    bn = torch.nn.BatchNorm2d(x.shape[1]).eval()
    out = {
        "reference (torch ops)": (lambda: reference.affine_clamp_mask(x, scale, shift, 6.0),
                                  lambda: reference.mask_scale_backward(grad, packed, scale)),
        "numba (cpu_kernels)": (lambda: cpu_kernels.affine_clamp_mask(x, scale, shift, 6.0),
                                lambda: cpu_kernels.mask_scale_backward(grad, packed, scale)),
        "full fine-tuning's ops": (lambda: F.hardtanh_(bn(x), 0.0, 6.0),
                                   lambda: torch.ops.aten.hardtanh_backward(grad, x, 0.0, 6.0)
                                   * scale[None, :, None, None]),
    }
    notes = {}
    if shutil.which("c++") or shutil.which("g++"):
        t = time.perf_counter()
        fwd = torch.compile(_forward_pure_torch, dynamic=False)
        bwd = torch.compile(_backward_pure_torch, dynamic=False)
        fwd(x, scale, shift)
        bwd(grad, packed, scale)
        notes["torch.compile"] = f"compile {time.perf_counter() - t:.1f} s for this one shape"
        out["torch.compile (inductor C++)"] = (lambda: fwd(x, scale, shift),
                                               lambda: bwd(grad, packed, scale))
    else:
        notes["torch.compile"] = "no C++ compiler found: not measured"
    return out, notes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=4, default=[32, 48, 64, 64])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args(argv)
    from _bench_env import ensure_repo_on_path
    ensure_repo_on_path()
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(*args.shape) * 3
    grad = torch.randn_like(x)
    scale, shift = torch.rand(args.shape[1]) + 0.5, torch.randn(args.shape[1])
    runs, notes = candidates(x, grad, scale, shift)
    times = {(name, k): [] for name in runs for k in (0, 1)}
    for f, b in runs.values():
        f(), b()
    for _ in range(args.reps):
        for name, pair in runs.items():
            for k, fn in enumerate(pair):
                t = time.perf_counter()
                fn()
                times[(name, k)].append(time.perf_counter() - t)
    print(f"| {list(args.shape)} float32, {args.threads} thread(s) | forward ms | backward ms |")
    print("|---|---|---|")
    for name in runs:
        f, b = (statistics.median(times[(name, k)]) * 1e3 for k in (0, 1))
        print(f"| {name} | {f:.2f} | {b:.2f} |")
    for k, v in notes.items():
        print(f"\n{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
