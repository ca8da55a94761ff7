"""Kernel benchmark cases: inputs, the TraDy call and its torch baselines, and the metrics.

One *case* is (kind, shape, batch, dtype, keep fraction). ``build_case`` returns the
callables to time, keyed by implementation:

* weight gradients (kind ``wgrad``: conv kxk, pointwise, depthwise, linear)
    - ``trady``: ``conv2d_weight_grad_masked`` / ``linear_weight_grad_masked`` of the active
      backend (Triton kernels on CUDA, ``reference.py`` on CPU) on the compact input;
    - ``torch_full``: torch's full weight gradient (``torch.nn.grad.conv2d_weight`` ->
      cuDNN; ``dy.T @ x`` for Linear): what full fine-tuning computes;
    - ``torch_gather``: ``x.index_select`` of the full input, then torch's weight gradient on
      the compacted input, scattered into the dense gradient (reference.py on a gathered x);
    - ``torch_compact`` (GPU only): the same without the gather (the compact input given),
      i.e. exactly ``reference.py``; on CPU it *is* ``trady`` and is not repeated.
* ``compact``: ``compact_channels`` vs ``x.index_select`` vs a same-size device copy;
* ``fused``: ``affine_relu_compact`` (frozen BN -> ReLU6 -> mask -> compaction) vs the same
  in torch ops (reference.py) vs plain PyTorch's eval BN + ReLU6 (no mask, no compaction)
  vs a same-size copy;
* ``relu_fwd`` / ``relu_bwd``: the 1-bit-mask ReLU6 forward / backward vs torch's hardtanh
  forward / ``hardtanh_backward`` and reference.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from _shapes import ActShape, LayerShape, mask_bytes

# "float32-tf32": float32 tensors with the kernels' tl.dot in TF32 (what cuDNN does for
# float32 convolutions by default) instead of their default "tf32x3" (about float32 accuracy).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float32-tf32": torch.float32}
CHECK_TOL = {"float32": 5e-3, "bfloat16": 5e-2, "float16": 1e-2, "float32-tf32": 5e-3}
UPPER = 6.0


def trady_ops(device: str, backend: str = "auto"):
    """The kernel module the library itself would call for a tensor on ``device``."""
    from _bench_env import ensure_kernels
    from trady_triton import dispatch

    if device == "cuda" or backend == "triton":
        ensure_kernels()     # the repository's kernels/ as trady_triton.kernels if not installed
    probe = torch.empty(0, device=device)
    with dispatch.backend(backend):
        return dispatch.ops_for(probe)


def _randn(shape, dtype, device, gen_seed):
    torch.manual_seed(gen_seed)
    return torch.randn(shape, dtype=torch.float32, device=device).to(dtype)


def _index(c: int, k: int, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(c, generator=g)[:k].sort().values.to(device)   # int64, as the sampler


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    scale = float(b.abs().max()) or 1.0
    return float((a - b).abs().max()) / scale


class Case:
    """Inputs and callables of one case; ``impls`` maps implementation -> callable."""

    def __init__(self, meta: dict, impls: dict, bytes_moved: dict, flops: int = 0,
                 check=None):
        self.meta = meta
        self.impls = impls
        self.bytes = bytes_moved          # impl -> bytes it must move (for GB/s)
        self.flops = flops
        self.check = check                # () -> relative error of trady vs torch


def build_wgrad(shape: LayerShape, batch: int, keep: float, dtype_name: str, device: str,
                backend: str = "auto", seed: int = 0) -> Case:
    from trady_triton import reference

    dtype = DTYPES[dtype_name]
    k_sel = shape.selected(keep)
    idx = _index(shape.c_in, k_sel, device, seed)
    ops = trady_ops(device, backend)
    elt = torch.empty((), dtype=dtype).element_size()
    if shape.kind == "linear":
        x = _randn((batch, shape.c_in), dtype, device, seed)
        dy = _randn((batch, shape.c_out), dtype, device, seed + 1)
        xc = x.index_select(1, idx).contiguous()
        impls = {
            "trady": lambda: ops.linear_weight_grad_masked(xc, dy, idx, shape.c_in),
            "torch_full": lambda: dy.t() @ x,
            "torch_gather": lambda: reference.linear_weight_grad_masked(
                x.index_select(1, idx), dy, idx, shape.c_in),
            "torch_compact": lambda: reference.linear_weight_grad_masked(xc, dy, idx, shape.c_in),
        }
        dy_bytes = dy.numel() * elt
    else:
        oh, ow = shape.out_hw
        x = _randn((batch, shape.c_in, shape.h, shape.w), dtype, device, seed)
        dy = _randn((batch, shape.c_out, oh, ow), dtype, device, seed + 1)
        xc = x.index_select(1, idx).contiguous()
        conv = dict(stride=(shape.stride,) * 2, padding=(shape.padding,) * 2, dilation=(1, 1),
                    groups=shape.groups)
        wshape = shape.weight_shape

        impls = {
            "trady": lambda: ops.conv2d_weight_grad_masked(
                xc, dy, idx, wshape, conv["stride"], conv["padding"], conv["dilation"],
                conv["groups"]),
            "torch_full": lambda: torch.nn.grad.conv2d_weight(
                x, wshape, dy, stride=conv["stride"], padding=conv["padding"],
                dilation=conv["dilation"], groups=conv["groups"]),
            "torch_gather": lambda: reference.conv2d_weight_grad_masked(
                x.index_select(1, idx), dy, idx, wshape, conv["stride"], conv["padding"],
                conv["dilation"], conv["groups"]),
            "torch_compact": lambda: reference.conv2d_weight_grad_masked(
                xc, dy, idx, wshape, conv["stride"], conv["padding"], conv["dilation"],
                conv["groups"]),
        }
        # depthwise: only the selected channels' dy is needed
        dy_bytes = (batch * k_sel * oh * ow if shape.kind == "dw" else dy.numel()) * elt
    if ops is reference:     # CPU path: trady *is* reference.py on the compact input
        impls.pop("torch_compact")
    w_elems = math.prod(shape.weight_shape)
    trady_bytes = xc.numel() * elt + dy_bytes + w_elems * elt
    meta = {"kind": "wgrad", "layer": shape.kind, "shape": shape.label(), "net": shape.net,
            "batch": batch, "dtype": dtype_name, "keep": keep, "k_sel": k_sel,
            "c_in": shape.c_in, "r": k_sel / shape.c_in,
            "trady_impl": "reference" if ops is reference else "triton"}

    def check():
        return _rel_err(impls["trady"](), impls["torch_gather"]())

    return Case(meta, impls, {"trady": trady_bytes},
                flops=shape.weight_grad_flops(batch, k_sel), check=check)


def _bn_params(c: int, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.rand(c, generator=g) + 0.5).to(device)
    bias = (torch.rand(c, generator=g) - 0.5).to(device)
    mean = (torch.rand(c, generator=g) - 0.5).to(device)
    var = (torch.rand(c, generator=g) + 0.5).to(device)
    return weight, bias, mean, var


def build_act(kind: str, act: ActShape, batch: int, keep: float, dtype_name: str, device: str,
              backend: str = "auto", seed: int = 0) -> Case:
    from trady_triton import reference

    dtype = DTYPES[dtype_name]
    ops = trady_ops(device, backend)
    elt = torch.empty((), dtype=dtype).element_size()
    k_sel = act.c if keep is None else max(1, min(act.c, round(keep * act.c)))
    idx = _index(act.c, k_sel, device, seed)
    x = _randn((batch, act.c, act.h, act.w), dtype, device, seed) * 3
    numel = x.numel()
    compact = batch * k_sel * act.h * act.w * elt
    meta = {"kind": kind, "shape": act.label(), "net": act.net, "batch": batch,
            "dtype": dtype_name, "keep": keep if kind in ("compact", "fused") else None,
            "k_sel": k_sel if kind in ("compact", "fused") else None, "c_in": act.c,
            "trady_impl": "reference" if ops is reference else "triton"}
    if kind == "compact":
        moved = 2 * compact
        impls = {"trady": lambda: ops.compact_channels(x, idx, 1),
                 "torch_index_select": lambda: x.index_select(1, idx)}

        def check():
            return _rel_err(impls["trady"](), impls["torch_index_select"]())
    elif kind == "fused":
        weight, bias, mean, var = _bn_params(act.c, device, seed)
        eps = 1e-5
        scale = torch.rsqrt(var + eps) * weight
        shift = bias - mean * scale
        scale_x, shift_x = scale.to(dtype), shift.to(dtype)
        moved = 2 * numel * elt + mask_bytes(numel) + compact
        impls = {
            "trady": lambda: ops.affine_relu_compact(x, scale_x, shift_x, UPPER, idx),
            "torch_unfused": lambda: reference.affine_relu_compact(x, scale_x, shift_x, UPPER, idx),
            "torch_bn_relu6": lambda: F.relu6(F.batch_norm(x, mean, var, weight, bias, False,
                                                           0.0, eps)),
        }

        def check():
            a = impls["trady"]()
            b = reference.affine_relu_compact(x, scale_x, shift_x, UPPER, idx)
            errs = [_rel_err(a[0], b[0]), _rel_err(a[2], b[2])]
            same_mask = bool(torch.equal(a[1], b[1]))
            return max(errs) if same_mask or dtype != torch.float32 else float("inf")
    elif kind == "relu_fwd":
        moved = 2 * numel * elt + mask_bytes(numel)
        impls = {"trady": lambda: ops.relu_forward_mask(x, UPPER),
                 "torch_hardtanh": lambda: F.hardtanh(x, 0.0, UPPER),
                 "torch_reference": lambda: reference.relu_forward_mask(x, UPPER)}

        def check():
            a, b = impls["trady"](), reference.relu_forward_mask(x, UPPER)
            return _rel_err(a[0], b[0]) if torch.equal(a[1], b[1]) else float("inf")
    elif kind == "relu_bwd":
        g = _randn(x.shape, dtype, device, seed + 7)
        _, packed = reference.relu_forward_mask(x, UPPER)
        moved = 2 * numel * elt + mask_bytes(numel)
        impls = {"trady": lambda: ops.relu_backward_mask(g, packed),
                 "torch_hardtanh_backward": lambda: torch.ops.aten.hardtanh_backward(
                     g, x, 0.0, UPPER),
                 "torch_reference": lambda: reference.relu_backward_mask(g, packed)}

        def check():
            return _rel_err(impls["trady"](), reference.relu_backward_mask(g, packed))
    else:
        raise ValueError(f"kind={kind!r}")
    if ops is reference:
        impls.pop("torch_reference", None)
        impls.pop("torch_unfused", None)
    # the same number of bytes moved by a plain device copy (read + write = moved)
    n_copy = max(1, moved // 2 // elt)
    src = torch.empty(n_copy, dtype=dtype, device=device).fill_(1)
    dst = torch.empty_like(src)
    impls["copy_same_bytes"] = lambda: dst.copy_(src)
    return Case(meta, impls, {"trady": moved, "copy_same_bytes": 2 * n_copy * elt}, check=check)


def build(case: dict, device: str, backend: str = "auto") -> Case:
    """A case from its description (as made by ``case_list``)."""
    import _shapes

    if case["kind"] == "wgrad":
        shape = next(s for s in _shapes.ALL_LAYERS + _shapes.TINY_LAYERS if s.name == case["name"])
        return build_wgrad(shape, case["batch"], case["keep"], case["dtype"], device, backend)
    act = next(a for a in _shapes.ACTS + _shapes.TINY_ACTS if a.name == case["name"])
    return build_act(case["kind"], act, case["batch"], case["keep"], case["dtype"], device,
                     backend)


def case_key(case: dict) -> str:
    return "|".join(str(case[k]) for k in ("kind", "name", "batch", "dtype", "keep"))


def case_list(layers, acts, batches, keeps, dtypes, kinds=("wgrad", "compact", "fused")) -> list:
    """All cases of a sweep, ordered dtype -> kind -> shape -> batch -> keep."""
    out = []
    for dtype in dtypes:
        for kind in kinds:
            if kind == "wgrad":
                for s in layers:
                    for b in batches:
                        for keep in keeps:
                            out.append({"kind": kind, "name": s.name, "batch": b,
                                        "dtype": dtype, "keep": keep})
            else:
                for a in acts:
                    for b in batches:
                        for keep in (keeps if kind in ("compact", "fused") else (None,)):
                            out.append({"kind": kind, "name": a.name, "batch": b,
                                        "dtype": dtype, "keep": keep})
    return out


def finish_metrics(rec: dict, ceilings: dict) -> dict:
    """Ratios, GB/s, TFLOP/s, floors and pass/fail of one timed case, in place."""
    t = rec.get("times", {})

    def us(impl):
        v = t.get(impl)
        return v["median_us"] if isinstance(v, dict) and "median_us" in v else None

    trady = us("trady")
    copy_peak = ceilings.get("copy_gbps")
    dtype = rec.get("dtype")
    if rec["kind"] == "wgrad":
        full, gather, compact = us("torch_full"), us("torch_gather"), us("torch_compact")
        r = rec["r"]
        if full is not None:
            rec["target_us"] = 1.25 * r * full + 10.0
        if trady is not None:
            rec["tflops"] = rec["flops"] / (trady * 1e-6) / 1e12
            if full is not None:
                rec["vs_full"] = trady / full
                rec["pass_target"] = trady <= rec["target_us"]
            if gather is not None:
                rec["vs_gather"] = trady / gather
                rec["pass_gather"] = trady < gather
            if compact is not None:
                rec["vs_compact"] = trady / compact
        peaks = ceilings.get("matmul_tflops", {}) or {}
        peak = max([v for k, v in peaks.items() if v and (
            k == dtype or (dtype.startswith("float32") and k == "tf32"))] or [0]) or None
        floor = []
        if copy_peak:
            floor.append(rec["bytes"]["trady"] / (copy_peak * 1e9) * 1e6)
        if peak:
            floor.append(rec["flops"] / (peak * 1e12) * 1e6)
            if trady is not None:
                rec["pct_matmul_peak"] = 100 * rec["tflops"] / peak
        if floor:
            rec["floor_us"] = max(floor)
    else:
        moved = rec["bytes"]["trady"]
        copy_same = us("copy_same_bytes")
        if trady is not None:
            rec["gbps"] = moved / (trady * 1e-6) / 1e9
            if copy_peak:
                rec["pct_copy_peak"] = 100 * rec["gbps"] / copy_peak
                rec["pass_copy_peak"] = rec["pct_copy_peak"] >= 70
            if copy_same is not None:
                same_gbps = rec["bytes"]["copy_same_bytes"] / (copy_same * 1e-6) / 1e9
                rec["copy_same_gbps"] = same_gbps
                rec["pct_copy_same"] = 100 * rec["gbps"] / same_gbps
                rec["pass_copy_same"] = rec["pct_copy_same"] >= 70
            base = [k for k in t if k.startswith("torch_")]
            for k in base:
                if us(k):
                    rec[f"vs_{k}"] = trady / us(k)
        if copy_peak:
            rec["floor_us"] = moved / (copy_peak * 1e9) * 1e6
    _graph_metrics(rec)
    if "check_rel_err" in rec and rec["check_rel_err"] is not None:
        rec["check_ok"] = rec["check_rel_err"] <= CHECK_TOL.get(dtype, 1e-2)
    return rec


def _graph_metrics(rec: dict) -> None:
    """The same targets on device-only times (CUDA graph replay), when measured."""
    g = rec.get("graph_times") or {}

    def us(impl):
        v = g.get(impl)
        return v["median_us"] if isinstance(v, dict) and "median_us" in v else None

    trady = us("trady")
    if trady is None:
        return
    if rec["kind"] == "wgrad":
        full, gather = us("torch_full"), us("torch_gather")
        if full is not None:
            rec["target_graph_us"] = 1.25 * rec["r"] * full + 10.0
            rec["pass_target_graph"] = trady <= rec["target_graph_us"]
        if gather is not None:
            rec["pass_gather_graph"] = trady < gather
    else:
        copy_same = us("copy_same_bytes")
        if copy_same is not None:
            b = rec["bytes"]
            rec["pct_copy_same_graph"] = 100 * (b["trady"] / trady) / (
                b["copy_same_bytes"] / copy_same)
            rec["pass_copy_same_graph"] = rec["pct_copy_same_graph"] >= 70


import contextlib


@contextlib.contextmanager
def dot_precision(dtype_name: str):
    """For "float32-tf32": the kernels' float32 tl.dot in TF32 while the case runs."""
    checks = None
    if dtype_name == "float32-tf32":
        import sys
        checks = sys.modules.get("trady_triton.kernels._checks")
    if checks is None or not hasattr(checks, "FP32_DOT_PRECISION"):
        yield
        return
    previous = checks.FP32_DOT_PRECISION
    checks.FP32_DOT_PRECISION = "tf32"
    try:
        yield
    finally:
        checks.FP32_DOT_PRECISION = previous


def run_case(case: dict, device: str, ceilings: dict, backend: str = "auto",
             warmup_ms: float = 10, rep_ms: float = 40, full_cache: dict | None = None,
             impl_filter=None, graph_times: bool = True) -> dict:
    """Build, check and time one case; returns its record (errors recorded, not raised).
    ``graph_times``: on CUDA, also the device-only times (:func:`_time_graphs`)."""
    with dot_precision(case["dtype"]):
        return _run_case(case, device, ceilings, backend, warmup_ms, rep_ms, full_cache,
                         impl_filter, graph_times)


def _run_case(case, device, ceilings, backend, warmup_ms, rep_ms, full_cache, impl_filter,
              graph_times=True):
    import time

    from _bench_env import bench_fn, synchronize

    rec = dict(case)
    t0 = time.perf_counter()
    built = build(case, device, backend)
    rec.update(built.meta)
    rec["bytes"] = built.bytes
    rec["flops"] = built.flops
    rec["times"] = {}
    # correctness first (also compiles / autotunes the Triton kernel; timed separately)
    try:
        t1 = time.perf_counter()
        rec["check_rel_err"] = built.check() if built.check else None
        synchronize(device)
        rec["first_call_s"] = time.perf_counter() - t1
    except Exception as e:   # noqa: BLE001
        rec["times"]["trady"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        rec["check_rel_err"] = None
    full_key = (case["kind"], case["name"], case["batch"], str(DTYPES[case["dtype"]]))
    for impl, fn in built.impls.items():
        if impl_filter and impl not in impl_filter:
            continue
        if impl in rec["times"]:
            continue
        if impl == "torch_full" and full_cache is not None and full_key in full_cache:
            rec["times"][impl] = full_cache[full_key]
            continue
        try:
            rec["times"][impl] = bench_fn(fn, device, warmup_ms, rep_ms)
            if impl == "torch_full" and full_cache is not None:
                full_cache[full_key] = rec["times"][impl]
        except Exception as e:   # noqa: BLE001
            rec["times"][impl] = {"error": f"{type(e).__name__}: {e}"[:500]}
            if device == "cuda":
                from _bench_env import cuda_healthy
                if not cuda_healthy():
                    rec["cuda_poisoned"] = True
                    break
    if graph_times and device == "cuda" and not rec.get("cuda_poisoned"):
        _time_graphs(rec, built, impl_filter)
    rec["wall_s"] = time.perf_counter() - t0
    return rec


# The impls whose device-only time (CUDA graph replay) is measured beside the event time:
# TraDy and the baselines its targets compare against.
GRAPH_IMPLS = ("trady", "torch_full", "torch_gather", "copy_same_bytes")
GRAPH_REP_MS = 10      # per replay of the captured calls; 10 replays are timed


def _time_graphs(rec: dict, built, impl_filter) -> None:
    from _bench_env import bench_graph, cuda_healthy
    rec["graph_times"] = {}
    for impl in GRAPH_IMPLS:
        fn = built.impls.get(impl)
        if fn is None or (impl_filter and impl not in impl_filter):
            continue
        if "error" in (rec["times"].get(impl) or {}):
            continue
        try:
            rec["graph_times"][impl] = bench_graph(fn, GRAPH_REP_MS)
        except Exception as e:   # noqa: BLE001
            rec["graph_times"][impl] = {"error": f"{type(e).__name__}: {e}"[:500]}
            if not cuda_healthy():
                rec["cuda_poisoned"] = True
                return


def measure_ceilings(device: str, quick: bool = False) -> dict:
    """Device-to-device copy bandwidth and large-matmul throughput, measured now."""
    from _bench_env import bench_fn

    out: dict = {"matmul_tflops": {}}
    if device == "cuda":
        n_bytes = (256 if quick else 512) * 2**20
        mm_n = 8192
        mm_dtypes = ("float32", "tf32", "bfloat16")
        rep = 100
    else:
        n_bytes = 64 * 2**20
        mm_n = 1024
        mm_dtypes = ("float32",)
        rep = 300
    src = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = bench_fn(lambda: dst.copy_(src), device, 10, rep)
    out["copy_bytes"] = 2 * n_bytes
    out["copy_gbps"] = 2 * n_bytes / (t["median_us"] * 1e-6) / 1e9
    out["copy_time"] = t
    del src, dst
    for name in mm_dtypes:
        try:
            dtype = torch.float32 if name in ("float32", "tf32") else DTYPES[name]
            a = torch.randn(mm_n, mm_n, device=device).to(dtype)
            b = torch.randn(mm_n, mm_n, device=device).to(dtype)
            previous = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high" if name == "tf32" else "highest")
            try:
                t = bench_fn(lambda: a @ b, device, 10, rep)
            finally:
                torch.set_float32_matmul_precision(previous)
            out["matmul_tflops"][name] = 2 * mm_n**3 / (t["median_us"] * 1e-6) / 1e12
        except Exception as e:   # noqa: BLE001
            out["matmul_tflops"][name] = None
            out.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:300]
    out["matmul_n"] = mm_n
    return out
