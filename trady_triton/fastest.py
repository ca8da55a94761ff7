"""The fastest correct path per weight-gradient shape on a GPU: Triton kernel or vendor.

For a conv (``groups == 1``) or Linear weight gradient of a partly trained layer, two
exact paths exist: the Triton kernel of ``trady_triton.kernels``, which writes straight
into the dense gradient's selected slices, and the vendor library (cuDNN / cuBLAS) on the
compact copy ``x[:, idx]`` (already gathered by the forward, so no gather is needed)
followed by one ``index_copy_`` into the zero gradient. Which wins depends on the shape:
:class:`PathChooser` times both once per (shape, strides, dtype, device) and caches the
winner. Depthwise and other grouped convs always run Triton (a vendor path would first
gather dY per channel).

``TRADY_WGRAD_PATH`` pins the choice: ``timed`` (default), ``triton`` or ``vendor``. The
timing runs at the first step that meets a shape (it synchronises, like autotuning), so
warm up before capturing a CUDA graph; later steps only look the choice up.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch
from torch import Tensor

PATHS = ("timed", "triton", "vendor")


def path_setting(variable: str, paths: tuple[str, ...]) -> str:
    """The path the environment variable ``variable`` pins (``"timed"``, its default:
    none); any value outside ``paths`` is an error naming the variable."""
    path = os.environ.get(variable, "timed")
    if path not in paths:
        raise ValueError(f"{variable}={path!r}: allowed values are {paths}")
    return path


def vendor_conv2d_weight_grad_masked(x_compact: Tensor, grad_output: Tensor, idx: Tensor,
                                     weight_shape, stride, padding, dilation) -> Tensor:
    """``groups == 1``: cuDNN's weight gradient of the compact input, scattered into dW."""
    out_channels, in_channels, kh, kw = weight_shape
    partial = torch.nn.grad.conv2d_weight(x_compact, (out_channels, idx.numel(), kh, kw),
                                          grad_output, stride, padding, dilation, 1)
    grad = grad_output.new_zeros(tuple(weight_shape))
    return grad.index_copy_(1, idx.long(), partial.to(grad.dtype))


def vendor_linear_weight_grad_masked(x_compact: Tensor, grad_output: Tensor, idx: Tensor,
                                     in_features: int) -> Tensor:
    """cuBLAS's ``dY^T @ Xc``, scattered into the columns ``idx`` of dW."""
    dy = grad_output.reshape(-1, grad_output.shape[-1])
    partial = dy.t() @ x_compact.reshape(-1, idx.numel())
    grad = grad_output.new_zeros((grad_output.shape[-1], in_features))
    return grad.index_copy_(1, idx.long(), partial.to(grad.dtype))


def wall_time_ms(fn: Callable[[], object], reps: int = 3) -> float:
    """Median wall time of ``fn`` in ms, after one untimed call (numba's first call loads
    the compiled loop, oneDNN's builds its primitive): the timer of the CPU choosers."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def cuda_time_ms(fn: Callable[[], object]) -> float:
    """Median device time of ``fn`` in ms (Triton's do_bench: CUDA events, cache flushed)."""
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))


class PathChooser:
    """Time each candidate once per key, keep the fastest; ``timer(fn) -> ms``."""

    def __init__(self, timer: Callable[[Callable[[], object]], float] = cuda_time_ms):
        self.timer = timer
        self.choices: dict[tuple, str] = {}
        self.timings: dict[tuple, dict[str, float]] = {}

    def choose(self, key: tuple, candidates: dict[str, Callable[[], Tensor]]) -> str:
        if key not in self.choices:
            times = {name: self.timer(fn) for name, fn in candidates.items()}
            self.timings[key] = times
            self.choices[key] = min(times, key=times.get)
        return self.choices[key]

    def run(self, key: tuple, candidates: dict[str, Callable[[], Tensor]],
            variable: str = "TRADY_WGRAD_PATH", paths: tuple[str, ...] = PATHS) -> Tensor:
        """The result of the path the environment variable ``variable`` pins, else of the
        cached winner for ``key`` (timed at its first call)."""
        pinned = path_setting(variable, paths)
        name = pinned if pinned != "timed" else self.choose(key, candidates)
        return candidates[name]()

    def table(self) -> str:
        """One line per timed shape: which path won, and both times."""
        lines = ["| op | shapes | dtype | triton us | vendor us | winner |",
                 "|---|---|---|---:|---:|---|"]
        for key, times in self.timings.items():
            op, shapes, dtype = key[0], key[1], key[-2]
            lines.append(f"| {op} | {shapes} | {str(dtype).replace('torch.', '')} | "
                         f"{times.get('triton', float('nan')) * 1e3:.1f} | "
                         f"{times.get('vendor', float('nan')) * 1e3:.1f} | {self.choices[key]} |")
        return "\n".join(lines)


CHOOSER = PathChooser()


def _layout(t: Tensor) -> tuple:
    return tuple(t.shape), t.stride()


def conv2d_weight_grad_masked(x_compact, grad_output, idx, weight_shape, stride, padding,
                              dilation, groups, kernels, chooser: PathChooser = CHOOSER):
    """The masked conv weight gradient by the fastest path for this shape."""
    def triton_path():
        return kernels.conv2d_weight_grad_masked(x_compact, grad_output, idx, weight_shape,
                                                 stride, padding, dilation, groups)
    if groups != 1:
        return triton_path()
    key = ("conv2d", (_layout(x_compact), _layout(grad_output), tuple(weight_shape)),
           (stride, padding, dilation), x_compact.dtype, x_compact.device)
    return chooser.run(key, {"triton": triton_path, "vendor": lambda: (
        vendor_conv2d_weight_grad_masked(x_compact, grad_output, idx, weight_shape, stride,
                                         padding, dilation))})


def linear_weight_grad_masked(x_compact, grad_output, idx, in_features, kernels,
                              chooser: PathChooser = CHOOSER):
    """The masked Linear weight gradient by the fastest path for this shape."""
    key = ("linear", (_layout(x_compact), _layout(grad_output), in_features), (),
           x_compact.dtype, x_compact.device)
    return chooser.run(key, {
        "triton": lambda: kernels.linear_weight_grad_masked(x_compact, grad_output, idx,
                                                            in_features),
        "vendor": lambda: vendor_linear_weight_grad_masked(x_compact, grad_output, idx,
                                                           in_features)})
