#!/usr/bin/env python
"""Candidates for the CPU path's convolutions, timed side by side on MobileNetV2-w0.35's
shapes (128x128, batch 32), interleaved; medians in ms, summed over the shapes.

    python bench/cpu_conv_candidates.py               # 1 thread, 9 repetitions
    python bench/cpu_conv_candidates.py --threads 2 --reps 7

1x1 convs, forward and dX: ATen's conv (oneDNN) against one batched GEMM ``W @ x[n]``
(and, for dX, the forward conv with the transposed weight). Depthwise 3x3 dX: ATen's
backward-data against the forward conv of dY with the flipped kernel (stride 1) and
``conv_transpose2d`` (stride 1 and 2). Every candidate is checked against ATen first.

    python bench/cpu_conv_candidates.py --depthwise   # per shape: ATen against numba

``--depthwise``: per depthwise shape of MobileNetV2-w0.35 (batch 32, 128x128), MCUNet-in1
(batch 32, 128x128) and EfficientNet-Lite0 (batch 8, 224x224), forward and dX, the CPU
path's ATen call (forward: oneDNN's conv; dX: the flipped-kernel forward at stride 1,
``convolution_backward`` at stride 2) against ``trady_triton.cpu_depthwise``.

    python bench/cpu_conv_candidates.py --pointwise lite0 --resolution 40 --batch 32

``--pointwise NET``: per 1x1 conv of the net at ``--resolution`` and ``--batch`` (shapes
collected by running the plain model once), forward, dX and the masked dW (an eighth of the
input channels), the three forms of ``trady_triton.cpu_pointwise``: ``batched``,
``flat``, ``aten``; then their totals and the total of the per-shape fastest.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from unittest import mock
from pathlib import Path

POINTWISE = [(8, 48, 64), (48, 8, 32), (8, 48, 32), (16, 96, 16), (96, 16, 16), (24, 144, 8),
             (144, 24, 8), (16, 8, 64), (48, 8, 64), (336, 56, 4), (56, 336, 4)]  # c_in, c_out, hw
DEPTHWISE = [(16, 64, 1), (48, 64, 2), (48, 32, 1), (48, 32, 2), (96, 16, 1), (144, 16, 2),
             (144, 8, 1)]                                                       # c, hw, stride


def _aten_dx(grad_y, weight, x_shape, stride, padding, groups):
    import torch
    return torch.ops.aten.convolution_backward(
        grad_y, grad_y.new_empty(x_shape), weight, None, [stride] * 2, [padding] * 2, [1, 1],
        False, [0, 0], groups, [True, False, False])[0]


def _gemm(matrix, x):
    n, c, h, w = x.shape
    return (matrix @ x.reshape(n, c, h * w)).reshape(n, -1, h, w)


def pointwise_cases(batch):
    import torch
    import torch.nn.functional as F
    for c_in, c_out, hw in POINTWISE:
        x = torch.randn(batch, c_in, hw, hw)
        w = torch.randn(c_out, c_in, 1, 1)
        gy = torch.randn(batch, c_out, hw, hw)
        yield "1x1 forward", x, {"ATen conv": lambda: F.conv2d(x, w),
                                 "GEMM": lambda: _gemm(w.view(c_out, c_in), x)}
        yield "1x1 dX", x, {
            "ATen backward": lambda: _aten_dx(gy, w, x.shape, 1, 0, 1),
            "conv, W transposed": lambda: F.conv2d(gy, w.transpose(0, 1)),
            "GEMM": lambda: _gemm(w.view(c_out, c_in).t(), gy)}


def depthwise_cases(batch):
    import torch
    import torch.nn.functional as F
    for c, hw, stride in DEPTHWISE:
        x = torch.randn(batch, c, hw, hw)
        w = torch.randn(c, 1, 3, 3)
        gy = torch.randn_like(F.conv2d(x, w, None, stride, 1, 1, c))
        extra = hw - ((gy.shape[2] - 1) * stride - 2 + 3)
        cands = {"ATen backward": lambda: _aten_dx(gy, w, x.shape, stride, 1, c),
                 "conv_transpose2d": lambda: F.conv_transpose2d(gy, w, None, stride, 1, extra, c)}
        if stride == 1:
            cands["conv, kernel flipped"] = lambda: F.conv2d(gy, w.flip(2, 3), None, 1, 1, 1, c)
        yield f"depthwise dX, stride {stride}", x, cands


# (net, batch, channels, plane side, kernel, stride): every depthwise conv of the three nets
DEPTHWISE_NETS = [
    ("mbv2", 32, 16, 64, 3, 1), ("mbv2", 32, 48, 64, 3, 2), ("mbv2", 32, 48, 32, 3, 1),
    ("mbv2", 32, 48, 32, 3, 2), ("mbv2", 32, 96, 16, 3, 1), ("mbv2", 32, 96, 16, 3, 2),
    ("mbv2", 32, 144, 8, 3, 1), ("mbv2", 32, 192, 8, 3, 1), ("mbv2", 32, 192, 8, 3, 2),
    ("mbv2", 32, 336, 4, 3, 1),
    ("mcunet", 32, 16, 64, 3, 1), ("mcunet", 32, 32, 64, 3, 2), ("mcunet", 32, 48, 32, 7, 2),
    ("mcunet", 32, 120, 16, 3, 1), ("mcunet", 32, 120, 16, 3, 2), ("mcunet", 32, 160, 8, 5, 1),
    ("mcunet", 32, 160, 8, 7, 1), ("mcunet", 32, 240, 8, 7, 2), ("mcunet", 32, 384, 4, 5, 1),
    ("mcunet", 32, 576, 4, 3, 1),
    ("lite0", 8, 32, 112, 3, 1), ("lite0", 8, 96, 112, 3, 2), ("lite0", 8, 144, 56, 3, 1),
    ("lite0", 8, 144, 56, 5, 2), ("lite0", 8, 240, 28, 3, 2), ("lite0", 8, 240, 28, 5, 1),
    ("lite0", 8, 480, 14, 3, 1), ("lite0", 8, 480, 14, 5, 1), ("lite0", 8, 672, 14, 5, 1),
    ("lite0", 8, 672, 14, 5, 2), ("lite0", 8, 1152, 7, 3, 1), ("lite0", 8, 1152, 7, 5, 1),
]


def numba_depthwise_cases():
    import torch
    import torch.nn.functional as F
    from trady_triton import cpu_depthwise
    for net, batch, c, hw, k, stride in DEPTHWISE_NETS:
        p = k // 2
        x = torch.randn(batch, c, hw, hw)
        w = torch.randn(c, 1, k, k)
        gy = torch.randn_like(F.conv2d(x, w, None, stride, p, 1, c))
        y_out, x_out = torch.empty_like(gy), torch.empty_like(x)
        label = f"{net} [{batch},{c},{hw},{hw}] {k}x{k} s{stride}"
        yield label, "forward", {
            "ATen": lambda: F.conv2d(x, w, None, stride, p, 1, c),
            "numba": lambda: cpu_depthwise.forward(x, w, None, stride, p, y_out)}
        aten_dx = ((lambda: F.conv2d(gy, w.flip(2, 3), None, 1, p, 1, c)) if stride == 1
                   else (lambda: _aten_dx(gy, w, x.shape, stride, p, c)))
        yield label, "dX", {
            "ATen": aten_dx,
            "numba": lambda: cpu_depthwise.input_grad(x.shape, w, gy, stride, p, x_out)}


def print_depthwise(reps: int, threads: int) -> None:
    print(f"| depthwise conv ({threads} thread(s)) | op | ATen ms | numba ms | numba / ATen |")
    print("|---|---|---|---|---|")
    for label, op, cands in numba_depthwise_cases():
        ms = time_group(cands, reps)
        print(f"| {label} | {op} | {ms['ATen']:.2f} | {ms['numba']:.2f} | "
              f"{ms['numba'] / ms['ATen']:.2f} |", flush=True)


NETS = {"mbv2": "mbv2-w0.35", "lite0": "efficientnet-lite0", "mcunet": "mcunet-in1"}


def pointwise_shapes(net: str, resolution: int, batch: int) -> list:
    """(input shape, weight shape) of every 1x1 stride-1 conv of ``net``, in order."""
    import torch
    from trady_triton.models import build_model
    model = build_model(NETS[net], pretrained=False, num_classes=10).eval()
    shapes = []

    def record(module, inputs, _output):
        if module.kernel_size == (1, 1) and module.stride == (1, 1) and module.groups == 1:
            shapes.append((tuple(inputs[0].shape), tuple(module.weight.shape)))
    hooks = [m.register_forward_hook(record) for m in model.modules()
             if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(batch, 3, resolution, resolution))
    for hook in hooks:
        hook.remove()
    return shapes


def pointwise_forms() -> tuple:
    from trady_triton import cpu_pointwise
    return tuple(name for name in cpu_pointwise.PATHS if name != "timed")


def pointwise_form_cases(net: str, resolution: int, batch: int):
    import torch
    from trady_triton import cpu_pointwise
    forms = pointwise_forms()

    def pinned(form, fn):
        def run():
            with mock.patch.dict(os.environ, {"TRADY_CPU_POINTWISE": form}):
                return fn()
        return run
    for x_shape, w_shape in pointwise_shapes(net, resolution, batch):
        x = torch.randn(x_shape)
        w = torch.randn(w_shape)
        gy = torch.randn(x_shape[0], w_shape[0], *x_shape[2:])
        idx = torch.randperm(x_shape[1])[:max(1, x_shape[1] // 8)].sort().values
        xc = x[:, idx].contiguous()
        label = f"[{x_shape[0]},{x_shape[1]},{x_shape[2]},{x_shape[3]}] -> {w_shape[0]}"
        yield label, "forward", {f: pinned(f, lambda: cpu_pointwise.forward(x, w, None))
                                 for f in forms}
        yield label, "dX", {f: pinned(f, lambda: cpu_pointwise.input_grad(x.shape, w, gy))
                            for f in forms}
        yield label, "masked dW", {
            f: pinned(f, lambda: cpu_pointwise.weight_grad_masked(xc, gy, idx, w_shape))
            for f in forms}


def print_pointwise(net: str, resolution: int, batch: int, reps: int, threads: int) -> None:
    forms = pointwise_forms()
    print(f"| {net} {resolution}x{resolution}, batch {batch}, {threads} thread(s): 1x1 conv "
          f"| op | batched ms | flat ms | aten ms | fastest |")
    print("|---|---|---|---|---|---|")
    totals = {op: dict.fromkeys(forms + ("fastest",), 0.0) for op in ("forward", "dX", "masked dW")}
    for label, op, cands in pointwise_form_cases(net, resolution, batch):
        ms = time_group(cands, reps)
        best = min(ms, key=ms.get)
        for form in forms:
            totals[op][form] += ms[form]
        totals[op]["fastest"] += ms[best]
        print(f"| {label} | {op} | {ms['batched']:.3f} | {ms['flat']:.3f} | "
              f"{ms['aten']:.3f} | {best} |", flush=True)
    print()
    print("| op, summed over the shapes | batched ms | flat ms | aten ms | per-shape fastest ms |")
    print("|---|---|---|---|---|")
    for op, row in totals.items():
        print(f"| {op} | {row['batched']:.1f} | {row['flat']:.1f} | {row['aten']:.1f} | "
              f"{row['fastest']:.1f} |")


def time_group(cands: dict, reps: int) -> dict:
    import torch
    reference = next(iter(cands.values()))()
    # float32 sums over up to 10^5 products: allow rounding relative to the largest entry
    atol = max(1e-3, 1e-5 * reference.abs().max().item())
    for name, run in cands.items():
        torch.testing.assert_close(run(), reference, rtol=1e-4, atol=atol, msg=name)
    times = {name: [] for name in cands}
    for _ in range(reps):
        for name, run in cands.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--depthwise", action="store_true",
                   help="per depthwise shape of MbV2 / MCUNet / Lite0: ATen against numba")
    p.add_argument("--pointwise", choices=sorted(NETS), metavar="NET",
                   help=f"per 1x1 conv of NET ({', '.join(sorted(NETS))}): the three forms "
                        "of cpu_pointwise")
    p.add_argument("--resolution", type=int, default=128,
                   help="input side for --pointwise (default 128)")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    if args.pointwise:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _bench_env import ensure_repo_on_path
        ensure_repo_on_path()
        print_pointwise(args.pointwise, args.resolution, args.batch, args.reps, args.threads)
        return 0
    if args.depthwise:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _bench_env import ensure_repo_on_path
        ensure_repo_on_path()
        print_depthwise(args.reps, args.threads)
        return 0
    totals: dict = {}
    for cases in (pointwise_cases(args.batch), depthwise_cases(args.batch)):
        for kind, _, cands in cases:
            for name, ms in time_group(cands, args.reps).items():
                totals.setdefault(kind, {}).setdefault(name, 0.0)
                totals[kind][name] += ms
    print(f"| op ({args.batch}-image batch, {args.threads} thread(s)) | candidate | ms, summed over shapes |")
    print("|---|---|---|")
    for kind, row in totals.items():
        for name, ms in row.items():
            print(f"| {kind} | {name} | {ms:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
