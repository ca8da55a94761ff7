"""Kernel benchmarks: TraDy's kernels against the torch baselines (see _kernel_bench.py).

    pytest bench/test_bench_kernels.py --benchmark-disable     # smoke: tiny shapes, once
    pytest bench/test_bench_kernels.py --benchmark-only        # CPU (or GPU) suite

Each benchmark's ``extra_info`` holds the case (shape, batch, dtype, K/C), the bytes the
TraDy kernel must move and its FLOPs, so that ``--benchmark-json`` output can be turned
into GB/s and TFLOP/s. Before timing the TraDy call, its result is checked against torch.
"""

from __future__ import annotations

import pytest
import torch

import _shapes as S
from _bench_env import synced
from _kernel_bench import CHECK_TOL, build, case_key, case_list

IMPLS = {
    "wgrad": ("trady", "torch_full", "torch_gather", "torch_compact"),
    "compact": ("trady", "torch_index_select", "copy_same_bytes"),
    "fused": ("trady", "torch_unfused", "torch_bn_relu6", "copy_same_bytes"),
    "relu_fwd": ("trady", "torch_hardtanh", "torch_reference", "copy_same_bytes"),
    "relu_bwd": ("trady", "torch_hardtanh_backward", "torch_reference", "copy_same_bytes"),
}
# On CPU the TraDy call *is* reference.py: these baselines would repeat it.
GPU_ONLY = {"torch_compact", "torch_unfused", "torch_reference"}
KINDS = ("wgrad", "compact", "fused", "relu_fwd", "relu_bwd")


def _cases(size: str) -> list[dict]:
    sz = S.sizes(size)
    return case_list(sz["layers"], sz["acts"], sz["batches"], sz["keeps"], sz["dtypes"],
                     kinds=KINDS)


def pytest_generate_tests(metafunc):
    if "kcase" not in metafunc.fixturenames:
        return
    size = metafunc.config._trady_bench_size
    on_gpu = size == "gpu" and torch.cuda.is_available()
    params, ids = [], []
    for case in _cases(size):
        for impl in IMPLS[case["kind"]]:
            if impl in GPU_ONLY and not on_gpu:
                continue
            params.append((case, impl))
            ids.append(f"{case_key(case).replace('|', '-')}-{impl}")
    metafunc.parametrize(("kcase", "impl"), params, ids=ids)


_last: dict = {}


def _built(case, device):
    """The inputs of the last case, reused by its other implementations."""
    key = (case_key(case), device)
    if _last.get("key") != key:
        _last.clear()
        _last["key"], _last["case"] = key, build(case, device)
    return _last["case"]


def test_kernel(benchmark, kcase, impl, bench_device):
    built = _built(kcase, bench_device)
    if impl not in built.impls:
        pytest.skip(f"{impl} is not a separate implementation on {bench_device}")
    if impl == "trady" and built.check is not None:
        err = built.check()
        assert err <= CHECK_TOL[kcase["dtype"]], f"TraDy result differs from torch: {err:.2e}"
    benchmark.group = " ".join(f"{k}={kcase[k]}" for k in ("kind", "name", "batch", "dtype",
                                                          "keep"))
    benchmark.extra_info.update(built.meta)
    benchmark.extra_info["bytes_trady"] = built.bytes.get("trady")
    benchmark.extra_info["flops"] = built.flops
    benchmark.extra_info["impl"] = impl
    benchmark(synced(built.impls[impl], bench_device))


def test_shapes_match_the_model_zoo():
    """The hard-coded MbV2 / Lite0 layer shapes are those of trady_triton.models."""
    from trady_triton.models import build_model
    from trady_triton.profile import profile_model

    torch.manual_seed(0)
    for net, name, res in (("mbv2", "mbv2-w0.35-arch", 128), ("lite0", "efficientnet-lite0", 224)):
        kwargs = {"pretrained": False} if name == "efficientnet-lite0" else {}
        model = build_model(name, **kwargs)
        with torch.no_grad():
            layers = {l.name: l for l in profile_model(model, torch.zeros(1, 3, res, res)).layers}
        for s in (s for s in S.ALL_LAYERS if s.net == net):
            layer = layers[s.zoo_layer]
            assert (layer.in_channels, layer.out_channels) == (s.c_in, s.c_out), s.name
            if s.kind == "linear":
                continue
            assert layer.groups == s.groups, s.name
            assert layer.kernel_size == (s.k, s.k), s.name
            assert tuple(layer.input_spatial) == (s.h, s.w), s.name
            assert tuple(layer.output_spatial) == s.out_hw, s.name


def test_case_lists_are_unique_and_cover_every_kind():
    for size in ("tiny", "cpu", "gpu"):
        cases = _cases(size)
        keys = [case_key(c) for c in cases]
        assert len(keys) == len(set(keys))
        assert {c["kind"] for c in cases} == set(KINDS)


def test_device_time_targets_from_graph_replay():
    """The issue-3 targets recomputed on CUDA-graph (device-only) times when measured."""
    from _kernel_bench import finish_metrics

    def wgrad(trady_us):
        return finish_metrics({
            "kind": "wgrad", "r": 0.1, "dtype": "float32", "flops": 10,
            "bytes": {"trady": 1000}, "times": {"trady": {"median_us": 100.0}},
            "graph_times": {"trady": {"median_us": trady_us},
                            "torch_full": {"median_us": 20.0},
                            "torch_gather": {"median_us": 12.6}}}, {})

    rec = wgrad(12.5)                     # target 1.25 * 0.1 * 20 + 10 = 12.5
    assert rec["target_graph_us"] == pytest.approx(12.5)
    assert rec["pass_target_graph"] is True and rec["pass_gather_graph"] is True
    rec = wgrad(12.7)
    assert rec["pass_target_graph"] is False and rec["pass_gather_graph"] is False
    fused = finish_metrics({
        "kind": "fused", "dtype": "float32", "bytes": {"trady": 3000, "copy_same_bytes": 2000},
        "times": {"trady": {"median_us": 50.0}},
        "graph_times": {"trady": {"median_us": 10.0}, "copy_same_bytes": {"median_us": 5.0}}}, {})
    assert fused["pct_copy_same_graph"] == pytest.approx(75.0)      # 300 of 400 B/us
    assert fused["pass_copy_same_graph"] is True
    # no graph times (CPU, or an error): no device-time verdicts
    rec = finish_metrics({"kind": "wgrad", "r": 0.1, "dtype": "float32", "flops": 10,
                          "bytes": {"trady": 1000}, "times": {},
                          "graph_times": {"trady": {"error": "RuntimeError: capture"}}}, {})
    assert "pass_target_graph" not in rec


def test_graph_timing_records_times_and_errors(monkeypatch):
    """_time_graphs (CUDA only) with the graph timer replaced: what it times, what it skips."""
    import types

    import _bench_env
    import _kernel_bench

    def fake_graph(fn, rep_ms):
        fn()
        return {"median_us": 2.0, "p20_us": 1.0, "p80_us": 3.0}

    def failing(fn, rep_ms):
        raise RuntimeError("operation not permitted when stream is capturing")

    calls = []
    built = types.SimpleNamespace(impls={
        "trady": lambda: calls.append("trady"), "torch_full": lambda: calls.append("full"),
        "torch_gather": lambda: calls.append("gather"), "torch_compact": lambda: None})
    monkeypatch.setattr(_bench_env, "bench_graph", fake_graph)
    monkeypatch.setattr(_bench_env, "cuda_healthy", lambda: True)
    rec = {"times": {"torch_gather": {"error": "RuntimeError: x"}}}
    _kernel_bench._time_graphs(rec, built, None)
    assert calls == ["trady", "full"]                        # gather failed before: skipped
    assert set(rec["graph_times"]) == {"trady", "torch_full"}  # compact is not a target's
    monkeypatch.setattr(_bench_env, "bench_graph", failing)
    rec = {"times": {}}
    _kernel_bench._time_graphs(rec, built, None)
    assert "capturing" in rec["graph_times"]["trady"]["error"]
    assert not rec.get("cuda_poisoned")
