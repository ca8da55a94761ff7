#!/usr/bin/env python
"""Run the kernel and training-step benchmarks, write JSON + markdown, print the table last.

    python bench/run_gpu.py --out DIR            # everything, one H100, < 8 minutes
    python bench/run_gpu.py --out DIR --quick    # a one-minute sanity pass
    python bench/run_bench.py --device cpu --mode cpu --out DIR   # CPU kernel tables
    python bench/run_bench.py --device cpu --mode tiny --out DIR  # dry run of the GPU logic

Robustness: the measurements run in a worker subprocess that appends one JSON line per
case to ``DIR/cases.jsonl`` (flushed and fsynced) and marks each case as started before
running it. Each case is wrapped in try/except (the error is recorded and the run goes
on); a poisoned CUDA context (illegal address ...) or a hard crash ends the worker, and
the orchestrator restarts it, skipping the cases already recorded and marking the one
in flight as crashed. A global time guard ends every section at a fixed time, so the
whole run, Triton compilation and autotuning included, stays within ``--budget-s``.
``DIR/results.json`` and ``DIR/results.md`` are rewritten after every worker exit.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_env import (REPO_ROOT, append_jsonl, read_jsonl, replace_section,  # noqa: E402
                        write_json)

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
JSONL = "cases.jsonl"

# (section, seconds from the start at which it must end) per mode. A section that ends
# early leaves its time to the next ones, since the ends are absolute.
PLANS = {
    "full": [("env", 20), ("ceilings", 35), ("kernels_core", 180), ("train_step", 320),
             ("max_batch", 380), ("kernels_sweep", 425)],
    "quick": [("env", 15), ("ceilings", 22), ("kernels_core", 45), ("train_step", 68),
              ("max_batch", 82)],
    "tiny": [("env", 30), ("ceilings", 40), ("kernels_core", 80), ("train_step", 110),
             ("max_batch", 125)],
    "cpu": [("env", 30), ("ceilings", 60), ("kernels_core", 560)],
}
DEFAULT_BUDGET = {"full": 430, "quick": 90, "tiny": 130, "cpu": 600}
TIMING = {   # (kernel warmup ms, kernel rep ms, train-step warmup ms, train-step rep ms)
    "full": (5, 30, 20, 150), "quick": (5, 20, 10, 60), "tiny": (1, 5, 1, 5),
    "cpu": (50, 300, 100, 1000),
}
MAX_BATCH_CONFIG_S = {"full": 8, "quick": 6, "tiny": 5, "cpu": 5}


# =============================================================================== plans
def plan_items(section: str, mode: str, device: str) -> list[dict]:
    """The work items of one section (each has a unique ``key``)."""
    import _shapes as S
    from _kernel_bench import case_key, case_list
    from _train_bench import config_key, configs

    if section in ("env", "ceilings"):
        return [{"key": section}]
    if section in ("kernels_core", "kernels_sweep"):
        if mode == "tiny":
            cases = case_list(S.TINY_LAYERS, S.TINY_ACTS, (2,), (0.3,), ("float32",),
                              kinds=("wgrad", "compact", "fused", "relu_fwd", "relu_bwd"))
        elif mode == "cpu":
            cases = case_list(S.CPU_LAYERS, S.CPU_ACTS, (S.CPU_BATCH,), S.CPU_KEEPS,
                              ("float32",),
                              kinds=("wgrad", "compact", "fused", "relu_fwd", "relu_bwd"))
        elif mode == "quick":
            layers = [s for s in S.ALL_LAYERS if s.name in ("mbv2.pw_96_16", "mbv2.dw_48_s2",
                                                            "r18.l3_3x3_256")]
            acts = [a for a in S.ACTS if a.name == "mbv2.a48_64"]
            cases = case_list(layers, acts, (64,), (0.05,), ("float32", "bfloat16"))
        else:
            core = (case_list(S.CORE_LAYERS, (), S.GPU_BATCHES, S.CORE_KEEPS,
                              ("float32", "bfloat16"), kinds=("wgrad",))
                    + case_list((), S.CORE_ACTS, (256,), S.CORE_KEEPS, ("float32", "bfloat16"),
                                kinds=("compact", "fused")))
            if section == "kernels_core":
                cases = core
            else:
                done = {case_key(c) for c in core}
                sweep = (case_list(S.ALL_LAYERS, (), S.GPU_BATCHES, S.KEEPS,
                                   ("float32", "bfloat16"), kinds=("wgrad",))
                         + case_list((), S.ACTS, S.GPU_BATCHES, S.CORE_KEEPS,
                                     ("float32", "bfloat16"), kinds=("compact", "fused"))
                         + case_list((), S.ACTS, (256,), (None,), ("float32", "bfloat16"),
                                     kinds=("relu_fwd", "relu_bwd")))
                # most informative first: the paper's small keep fractions, then the rest
                sweep = [c for c in sweep if case_key(c) not in done]
                sweep.sort(key=lambda c: (c["kind"] in ("relu_fwd", "relu_bwd"),
                                          c["kind"] != "wgrad",
                                          (c["keep"] or 0) > 0.1, c["dtype"] != "float32"))
                # first of all: the core weight-gradient cases with the kernels' float32
                # dot in TF32, cuDNN's default for float32 convolutions
                tf32 = case_list(S.CORE_LAYERS, (), S.GPU_BATCHES, S.CORE_KEEPS,
                                 ("float32-tf32",), kinds=("wgrad",))
                cases = tf32 + sweep
        if mode in ("tiny", "cpu", "quick") and section == "kernels_sweep":
            return []
        return [dict(c, key=f"{section}|{case_key(c)}") for c in cases]
    if section == "train_step":
        backends = ("auto", "reference") if device == "cuda" else ("auto",)
        if mode == "tiny":
            cfgs = configs("tiny", (2,), levels=("small",), trady_backends=backends)
        elif mode == "quick":
            cfgs = configs("mbv2", (32,), levels=("small",), trady_backends=("auto",))
        elif mode == "cpu":
            cfgs = []
        else:
            cfgs = (configs("mbv2", (32,), trady_backends=backends)
                    + configs("lite0", (32,), trady_backends=backends)
                    + configs("mbv2", (256,), trady_backends=("auto",))
                    + configs("lite0", (128,), trady_backends=("auto",)))
        return [dict(c, key=f"train_step|{config_key(c)}") for c in cfgs]
    if section == "max_batch":
        if device != "cuda":
            return []
        if mode == "tiny":
            specs, levels = ("tiny",), ("small",)
        elif mode == "quick":
            specs, levels = ("mbv2",), ("small",)
        else:
            specs, levels = ("mbv2", "lite0"), ("small", "medium", "large")
        items = []
        for spec in specs:     # most telling first: full fine-tuning against TraDy
            items += [{"model": spec, "method": "full", "budget": None},
                      {"model": spec, "method": "trady", "budget": "small"}]
            if mode != "quick":
                items += [{"model": spec, "method": m, "budget": "small"}
                          for m in ("frozen", "simulation")]
                items += [{"model": spec, "method": "classifier", "budget": None}]
                items += [{"model": spec, "method": "trady", "budget": lvl} for lvl in levels
                          if lvl != "small"]
        return [dict(i, batch=8, backend="auto",
                     key=f"max_batch|{i['model']}|{i['method']}|{i['budget']}") for i in items]
    raise ValueError(section)


# =============================================================================== worker
def _latest(records: list[dict], key: str) -> dict | None:
    found = None
    for r in records:
        if r.get("key") == key and r.get("status") == "done":
            found = r
    return found


def worker(args) -> int:
    from _bench_env import ensure_repo_on_path

    out = Path(args.out)
    jsonl = out / JSONL
    ensure_repo_on_path()
    from _bench_env import ensure_kernels
    ensure_kernels()       # trady_triton.kernels importable even without an install
    import torch

    device = args.device
    if device == "cpu":
        torch.set_num_threads(args.threads)
    elif not torch.cuda.is_available():
        append_jsonl(jsonl, {"key": "env", "section": "env", "status": "done",
                             "error": "CUDA not available (torch.cuda.is_available() is False)"})
        return 2
    ends = json.loads(args.ends)
    records = read_jsonl(jsonl)
    finished = {r["key"] for r in records if r.get("status") in ("done", "crashed")}
    ceilings = (_latest(records, "ceilings") or {}).get("result", {})
    k_warm, k_rep, t_warm, t_rep = TIMING[args.mode]
    full_cache: dict = {}
    pin = contextlib.nullcontext(0)
    if args.mode == "quick" and device == "cuda":
        # a sanity pass: one tile config per kernel, no autotuning benchmarks
        from _bench_env import ensure_kernels
        from _train_bench import pinned_autotune
        ensure_kernels()
        pin = pinned_autotune()
    with pin as pinned:
        if pinned:
            emit_note = {"key": "autotune|pinned", "section": "env", "status": "note",
                         "note": f"--quick: {pinned} Triton autotuners pinned to one config "
                                 "(times are not tuned)"}
            append_jsonl(jsonl, emit_note)
        return _worker_sections(args, device, jsonl, ends, finished, ceilings, k_warm, k_rep,
                                t_warm, t_rep, full_cache)


def _worker_sections(args, device, jsonl, ends, finished, ceilings, k_warm, k_rep, t_warm,
                     t_rep, full_cache) -> int:
    import torch

    from _bench_env import cuda_healthy, kernel_status, machine_info

    def emit(rec):
        append_jsonl(jsonl, rec)

    for section, end in ends:
        items = plan_items(section, args.mode, device)
        # device-only (CUDA graph) times for the core kernel cases at their largest batch
        # (about 0.5 s a case; the sweep's time goes to more shapes)
        graph_batch = max((i["batch"] for i in items), default=None) \
            if section == "kernels_core" else None
        skipped = 0
        cap_set = False
        try:
            for item in items:
                key = item["key"]
                if key in finished:
                    continue
                if time.time() > end:
                    skipped += 1
                    continue
                emit({"key": key, "section": section, "status": "start", "t": time.time()})
                _test_hooks(key)
                rec = {"key": key, "section": section, "status": "done", "item": item}
                t0 = time.perf_counter()
                try:
                    if section == "env":
                        rec["result"] = {"machine": machine_info(device),
                                         "kernels": kernel_status(),
                                         "mode": args.mode, "backend": args.backend,
                                         "argv": args.orig_argv}
                    elif section == "ceilings":
                        rec["result"] = ceilings = __import__("_kernel_bench").measure_ceilings(
                            device, quick=args.mode in ("quick", "tiny"))
                    elif section.startswith("kernels"):
                        from _kernel_bench import finish_metrics, run_case
                        case = {k: item[k] for k in ("kind", "name", "batch", "dtype", "keep")}
                        res = run_case(case, device, ceilings, args.backend, k_warm, k_rep,
                                       full_cache, graph_times=item["batch"] == graph_batch)
                        rec["result"] = finish_metrics(res, ceilings)
                    elif section == "train_step":
                        if args.backend != "auto" and item.get("backend") == "auto":
                            item = dict(item, backend=args.backend)   # e.g. a dry run
                        rec["result"] = run_train(item, device, t_warm, t_rep)
                    elif section == "max_batch":
                        if not cap_set:
                            _set_cap(args.cap_gib)
                            cap_set = True
                        limit_s = MAX_BATCH_CONFIG_S[args.mode]   # per configuration
                        rec["result"] = run_max_batch(item, device, args.cap_gib,
                                                      min(end, time.time() + limit_s),
                                                      args.mode)
                except Exception as e:   # noqa: BLE001 - recorded, the run goes on
                    import traceback
                    rec["error"] = f"{type(e).__name__}: {e}"[:800]
                    rec["traceback"] = traceback.format_exc()[-3000:]
                rec["wall_s"] = time.perf_counter() - t0
                emit(rec)
                gc.collect()
                if device == "cuda":
                    poisoned = (rec.get("result") or {}).get("cuda_poisoned")
                    if (poisoned or "error" in rec) and not cuda_healthy():
                        emit({"key": f"{section}|restart", "section": section,
                              "status": "note", "note": f"CUDA context unusable after {key}"})
                        return 3
                    torch.cuda.empty_cache()
        finally:
            if cap_set:
                _set_cap(None)
        if skipped:
            emit({"key": f"{section}|skipped", "section": section, "status": "skipped",
                  "n": skipped, "reason": "time guard"})
    return 0


def _test_hooks(key: str) -> None:
    """Fault injection for bench's own tests: a hard crash or a hang at a given case."""
    crash, hang = os.environ.get("TRADY_BENCH_CRASH_ON"), os.environ.get("TRADY_BENCH_HANG_ON")
    if crash and crash in key:
        os._exit(134)
    if hang and hang in key:
        time.sleep(3600)


def _set_cap(cap_gib):
    import torch

    torch.cuda.empty_cache()
    if cap_gib is None:
        torch.cuda.set_per_process_memory_fraction(1.0)
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total))


def run_train(item: dict, device: str, warm_ms: float, rep_ms: float) -> dict:
    import torch

    from _bench_env import bench_fn, synchronize
    from _train_bench import make_setup

    t0 = time.perf_counter()
    setup = make_setup(item, device)
    rec = setup.describe()
    rec["build_s"] = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        setup.step()                      # compiles / autotunes the Triton kernels
        synchronize(device)
        rec["first_step_s"] = time.perf_counter() - t1
        rec["saved_bytes"] = setup.measure_saved()
        rec.update(setup.analytic())
        if device == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats()
            rec["resident_bytes"] = torch.cuda.memory_allocated()
            setup.step()
            synchronize(device)
            rec["peak_bytes"] = torch.cuda.max_memory_allocated()
        rec["time"] = bench_fn(setup.step, device, warm_ms, rep_ms)
    finally:
        setup.free()
        del setup
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return rec


def run_max_batch(item: dict, device: str, cap_gib: float, deadline: float, mode: str) -> dict:
    import torch

    from _train_bench import cuda_fits, find_max_batch, make_setup, pinned_autotune

    setup = make_setup(item, device)
    try:
        limit = 1 << 9 if mode == "tiny" else 1 << 15
        tol = 1 / 4 if mode in ("quick", "tiny") else 1 / 16
        with pinned_autotune() as pinned:
            res = find_max_batch(cuda_fits(setup), start=8, limit=limit, rel_tol=tol,
                                 deadline=deadline, clock=time.time)
        res["autotuners_pinned"] = pinned
        res.update(setup.describe())
        res["cap_gib"] = cap_gib
        res["batch"] = None
        return res
    finally:
        setup.free()
        del setup
        gc.collect()
        torch.cuda.empty_cache()


# =============================================================================== render
def _fmt(v, spec=".1f", none="–"):
    if v is None:
        return none
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def _t(rec, impl, field="times"):
    t = (rec.get(field) or {}).get(impl)
    if not isinstance(t, dict):
        return None
    return t.get("median_us")


def _t_range(rec, impl):
    t = (rec.get("times") or {}).get(impl)
    if not isinstance(t, dict):
        return "–"
    if "error" in t:
        return "error"
    return f"{t['median_us']:.1f} [{t['p20_us']:.1f}–{t['p80_us']:.1f}]"


def collect(out: Path) -> dict:
    records = read_jsonl(out / JSONL)
    done: dict[str, dict] = {}
    started: dict[str, dict] = {}
    notes, skipped = [], {}
    for r in records:
        st = r.get("status")
        if st == "start":
            started[r["key"]] = r
        elif st in ("done", "crashed"):
            done[r["key"]] = r
        elif st == "skipped":
            skipped[r["section"]] = r
        elif st == "note":
            notes.append(r)
    return {"records": records, "done": done, "started": started, "notes": notes,
            "skipped": skipped}


def render(out: Path, run_meta: dict) -> tuple[dict, str]:
    c = collect(out)
    done = c["done"]
    env = (done.get("env") or {}).get("result") or {}
    machine = env.get("machine", {})
    ceil = (done.get("ceilings") or {}).get("result") or {}
    by_section: dict[str, list] = {}
    for key, r in done.items():
        by_section.setdefault(r.get("section", key.split("|")[0]), []).append(r)
    L = []
    dev = run_meta.get("device", "cuda")
    L.append(f"### Machine ({'GPU' if dev == 'cuda' else 'CPU'} run)\n")
    if dev == "cuda":
        L.append(f"- card: {machine.get('gpu', '?')} ({machine.get('gpu_memory_gib', '?')} GiB, "
                 f"{machine.get('gpu_sms', '?')} SMs); nvidia-smi: {machine.get('nvidia_smi', '?')}")
        L.append(f"- CUDA {machine.get('cuda', '?')}, cuDNN {machine.get('cudnn', '?')}, "
                 f"cudnn.allow_tf32={machine.get('cudnn.allow_tf32')}, "
                 f"matmul.allow_tf32={machine.get('matmul.allow_tf32')}, "
                 f"cudnn.benchmark={machine.get('cudnn.benchmark')}")
    L.append(f"- CPU: {machine.get('cpu', '?')} ({machine.get('cpu_count', '?')} logical cores, "
             f"torch threads {machine.get('torch_threads', '?')})")
    L.append(f"- torch {machine.get('torch', '?')}, triton {machine.get('triton', '?')}, "
             f"Python {machine.get('python', '?')}, git {machine.get('git', '?')}, "
             f"TRADY_FP32_DOT_PRECISION={machine.get('TRADY_FP32_DOT_PRECISION', '?')}")
    L.append(f"- date: {machine.get('date_utc', '?')}; mode `{run_meta.get('mode')}`, backend "
             f"`{run_meta.get('backend')}`, wall time {run_meta.get('wall_s', 0):.0f} s of a "
             f"{run_meta.get('budget_s')} s budget; command: `{run_meta.get('command')}`")
    ks = env.get("kernels") or {}
    if ks:
        missing = [k for k, v in (ks.get("functions") or {}).items() if not v]
        L.append(f"- Triton kernels: {'all 6 functions found' if not missing else 'MISSING ' + ', '.join(missing)}"
                 + (f" (import error: {ks.get('error')})" if ks.get("error") else ""))
    if ceil:
        mm = ceil.get("matmul_tflops", {})
        L.append(f"- ceilings measured in this run: device copy **{ceil.get('copy_gbps', 0):.0f} GB/s** "
                 f"(read+write of {ceil.get('copy_bytes', 0) / 2**20:.0f} MiB); matmul "
                 f"{ceil.get('matmul_n')}^3: " + ", ".join(
                     f"{k} {_fmt(v)} TFLOP/s" for k, v in mm.items()))
    L.append("")

    # ---------------------------------------------------------------- kernels
    krecs = [r for s in ("kernels_core", "kernels_sweep") for r in by_section.get(s, [])]
    ok = [r for r in krecs if "result" in r]
    wg = [r["result"] for r in ok if r["result"].get("kind") == "wgrad"]
    ac = [r["result"] for r in ok if r["result"].get("kind") in ("compact", "fused")]
    rl = [r["result"] for r in ok if r["result"].get("kind") in ("relu_fwd", "relu_bwd")]
    if wg or ac:
        L.append("### Summary of the issue-3 targets (stated for the GPU)\n")
        L.append("| check | dtype | pass / measured |")
        L.append("|---|---|---|")
        dtypes = sorted({r.get("dtype") for r in wg + ac})

        def row(label, recs, field):
            for dt in dtypes:
                vals = [r.get(field) for r in recs if r.get("dtype") == dt
                        and r.get(field) is not None]
                if vals:
                    L.append(f"| {label} | {dt} | {sum(vals)} / {len(vals)} |")

        core_mr = [r for r in wg if r.get("net") in ("mbv2", "resnet18")
                   and r.get("layer") != "linear" and 64 <= r.get("batch", 0) <= 256]
        row("weight grad <= 1.25 r x full + 10 us, MbV2 + ResNet convs, N 64-256", core_mr,
            "pass_target")
        row("weight grad faster than gather + torch, MbV2 + ResNet convs, N 64-256", core_mr,
            "pass_gather")
        row("weight grad <= 1.25 r x full + 10 us, every shape", wg, "pass_target")
        row("weight grad faster than gather + torch, every shape", wg, "pass_gather")
        row("compaction / fused >= 70 % of same-size copy GB/s", ac, "pass_copy_same")
        row("compaction / fused >= 70 % of peak copy GB/s", ac, "pass_copy_peak")
        # the same on device-only times (CUDA graph replay: no host / launch overhead)
        row("device time: weight grad <= 1.25 r x full + 10 us, MbV2 + ResNet convs, N 64-256",
            core_mr, "pass_target_graph")
        row("device time: weight grad faster than gather + torch, MbV2 + ResNet convs, N 64-256",
            core_mr, "pass_gather_graph")
        row("device time: compaction / fused >= 70 % of same-size copy GB/s", ac,
            "pass_copy_same_graph")
        L.append(f"| TraDy output matches torch (rel. err within dtype tolerance) | all | "
                 f"{len([r for r in wg + ac + rl if r.get('check_ok')])} / "
                 f"{len([r for r in wg + ac + rl if r.get('check_ok') is not None])} |")
        L.append("")
    def table(header: list[str], rows: list[list[str]]) -> None:
        L.append("| " + " | ".join(header) + " |")
        L.append("|" + "---|" * len(header))
        L.extend("| " + " | ".join(row) + " |" for row in rows)
        L.append("")

    def graph_pair(r, a, b):
        return f"{_fmt(_t(r, a, 'graph_times'))} / {_fmt(_t(r, b, 'graph_times'))}"

    if wg:
        # device-only (CUDA graph) columns only where some case has them
        graph = any(r.get("graph_times") for r in wg)
        L.append("### Masked weight gradient (times in µs: median [p20–p80])\n")
        L.append("TraDy = `conv2d_weight_grad_masked` / `linear_weight_grad_masked` on the compact "
                 "input; full = torch's full weight gradient (cuDNN / matmul); gather = "
                 "`index_select` + torch on the compacted input + scatter; compact = the same "
                 "without the gather (reference.py). target = 1.25 r full + 10 µs. floor = "
                 "max(bytes / copy ceiling, FLOPs / matmul ceiling of the dtype)."
                 + (" graph = device time alone (calls replayed from a CUDA graph: no Python or "
                    "launch overhead, warm L2), TraDy / full; measured at the core cases' "
                    "largest batch." if graph else "") + "\n")
        header = ["layer", "N", "dtype", "K/C", "full", "TraDy", "gather", "compact", "target",
                  "≤ target", "< gather"]
        header += ["graph TraDy / full", "graph ≤ target"] if graph else []
        header += ["TFLOP/s", "% mm peak", "floor", "rel. err"]
        rows = []
        for r in wg:
            row = [r["shape"], str(r["batch"]), r["dtype"], f"{r['k_sel']}/{r['c_in']}",
                   _fmt(_t(r, "torch_full")), _t_range(r, "trady"), _fmt(_t(r, "torch_gather")),
                   _fmt(_t(r, "torch_compact")), _fmt(r.get("target_us")),
                   _fmt(r.get("pass_target")), _fmt(r.get("pass_gather"))]
            if graph:
                row += [graph_pair(r, "trady", "torch_full"), _fmt(r.get("pass_target_graph"))]
            row += [_fmt(r.get("tflops"), ".3g"), _fmt(r.get("pct_matmul_peak")),
                    _fmt(r.get("floor_us"), ".2f"), _fmt(r.get("check_rel_err"), ".1e")]
            rows.append(row)
        table(header, rows)
    if ac:
        graph = any(r.get("graph_times") for r in ac)
        L.append("### Compaction and fused BN -> ReLU6 -> mask -> compaction (µs: median [p20–p80])\n")
        L.append("GB/s counts the bytes the TraDy kernel must move (compaction: read + write of "
                 "the K kept channels; fused: read x, write y, the 1-bit mask and the compact "
                 "copy). torch = `index_select` (compact) / the same ops in torch "
                 "(reference.py, fused); BN+ReLU6 = plain PyTorch's eval BN + ReLU6 "
                 "(no mask, no compaction). copy = device copy of the same byte count. "
                 "floor = bytes / peak copy bandwidth."
                 + (" graph = device time alone (CUDA graph replay), TraDy / copy, and TraDy's "
                    "GB/s as % of the copy's." if graph else "") + "\n")
        header = ["kind", "activation", "N", "dtype", "K/C", "TraDy", "torch", "BN+ReLU6",
                  "copy same size", "GB/s", "% copy same", "% copy peak", "≥ 70 % same",
                  "≥ 70 % peak"]
        header += ["graph TraDy / copy", "graph % copy same"] if graph else []
        header += ["floor", "rel. err"]
        rows = []
        for r in ac:
            torch_impl = "torch_index_select" if r["kind"] == "compact" else "torch_unfused"
            row = [r["kind"], r["shape"], str(r["batch"]), r["dtype"],
                   f"{r.get('k_sel')}/{r['c_in']}", _t_range(r, "trady"),
                   _fmt(_t(r, torch_impl)), _fmt(_t(r, "torch_bn_relu6")),
                   _fmt(_t(r, "copy_same_bytes")), _fmt(r.get("gbps"), ".0f"),
                   _fmt(r.get("pct_copy_same"), ".0f"), _fmt(r.get("pct_copy_peak"), ".0f"),
                   _fmt(r.get("pass_copy_same")), _fmt(r.get("pass_copy_peak"))]
            if graph:
                row += [graph_pair(r, "trady", "copy_same_bytes"),
                        _fmt(r.get("pct_copy_same_graph"), ".0f")]
            row += [_fmt(r.get("floor_us"), ".2f"), _fmt(r.get("check_rel_err"), ".1e")]
            rows.append(row)
        table(header, rows)
    if rl:
        L.append("### ReLU6 with a 1-bit mask (µs: median [p20–p80])\n")
        L.append("| kind | activation | N | dtype | TraDy | torch hardtanh (fwd) / hardtanh_backward (bwd) "
                 "| reference.py | copy same size | GB/s | % copy peak | floor | rel. err |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rl:
            base = "torch_hardtanh" if r["kind"] == "relu_fwd" else "torch_hardtanh_backward"
            L.append(f"| {r['kind']} | {r['shape']} | {r['batch']} | {r['dtype']} | "
                     f"{_t_range(r, 'trady')} | {_fmt(_t(r, base))} | "
                     f"{_fmt(_t(r, 'torch_reference'))} | {_fmt(_t(r, 'copy_same_bytes'))} | "
                     f"{_fmt(r.get('gbps'), '.0f')} | {_fmt(r.get('pct_copy_peak'), '.0f')} | "
                     f"{_fmt(r.get('floor_us'), '.2f')} | {_fmt(r.get('check_rel_err'), '.1e')} |")
        L.append("")

    # ---------------------------------------------------------------- training step
    ts = [r["result"] for r in by_section.get("train_step", []) if "result" in r]
    mb = {}
    for r in by_section.get("max_batch", []):
        if "result" in r:
            x = r["result"]
            mb[(x["model"], x["method"], x["budget"])] = x
    if ts:
        L.append("### Training step (forward + backward + SGD step), float32\n")
        L.append("saved = bytes autograd keeps for backward during the forward, measured with "
                 "`saved_tensor_bytes` (parameters excluded); cost model = `saved_bytes_for_backward` "
                 "of what the row trains (TraDy: `controller.saved_bytes(batch)['total']`, the "
                 "floor: compact activations + classifier input + 1-bit masks); peak = "
                 "`torch.cuda.max_memory_allocated` during a step (all tensors, parameters "
                 "included); max batch = largest batch whose step fits under "
                 f"`set_per_process_memory_fraction` = {run_meta.get('cap_gib')} GiB. "
                 "frozen / simulation train the whole layers in which TraDy drew channels.\n")
        L.append("| model | N | method | budget | backend | step ms [p20–p80] | × full | saved MiB "
                 "| cost model MiB | saved / model | full ÷ saved | peak MiB | max batch | first step s |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        fulls = {(r["model"], r["batch"]): r for r in ts if r["method"] == "full"}
        for r in ts:
            f = fulls.get((r["model"], r["batch"]))
            tm = (r.get("time") or {}).get("median_us")
            ft = ((f or {}).get("time") or {}).get("median_us")
            m = mb.get((r["model"], r["method"], r["budget"])) if r["backend"] == "auto" else None
            mbs = "–"
            if m:
                mbs = f"{m['max_batch']}" + ("" if not m.get("limited_by") else
                                             f" ({m['limited_by'][:40]})")
            t = r.get("time") or {}
            L.append(
                f"| {r['model']} {r['res']}² | {r['batch']} | {r['method']} | {r['budget'] or '–'} | "
                f"{r['backend']} | "
                + (f"{t['median_us'] / 1e3:.2f} [{t['p20_us'] / 1e3:.2f}–{t['p80_us'] / 1e3:.2f}]"
                   if tm else "–")
                + f" | {_fmt(tm / ft if tm and ft else None, '.2f')} | "
                f"{r.get('saved_bytes', 0) / 2**20:.2f} | {r.get('cost_model_bytes', 0) / 2**20:.2f} | "
                f"{_fmt(r['saved_bytes'] / r['cost_model_bytes'] if r.get('cost_model_bytes') else None, '.3f')} | "
                f"{_fmt(f['saved_bytes'] / r['saved_bytes'] if f and r.get('saved_bytes') else None, '.1f')} | "
                f"{_fmt(r['peak_bytes'] / 2**20 if r.get('peak_bytes') else None)} | {mbs} | "
                f"{_fmt(r.get('first_step_s'), '.2f')} |")
        L.append("")
    if mb:
        L.append("### Largest batch under the memory cap\n")
        L.append("| model | method | budget | max batch | first failing batch | probes | limited by |")
        L.append("|---|---|---|---|---|---|---|")
        for (model, method, budget), m in mb.items():
            L.append(f"| {model} | {method} | {budget or '–'} | {m['max_batch']} | "
                     f"{_fmt(m.get('first_fail'))} | {len(m.get('probes', []))} | "
                     f"{m.get('limited_by') or '–'} |")
        L.append("")

    # ---------------------------------------------------------------- problems
    errs = []
    for key, r in done.items():
        if r.get("status") == "crashed":
            errs.append(f"- `{key}`: worker crashed (rc {r.get('rc')})")
        elif "error" in r:
            errs.append(f"- `{key}`: {r['error'][:300]}")
        else:
            res = r.get("result") or {}
            if res.get("check_ok") is False:
                errs.append(f"- `{key}`: TraDy's result differs from torch's: relative error "
                            f"{res.get('check_rel_err'):.2e}")
            for impl, t in (res.get("times") or {}).items():
                if isinstance(t, dict) and "error" in t:
                    errs.append(f"- `{key}` [{impl}]: {t['error'][:300]}")
    for sec, s in c["skipped"].items():
        errs.append(f"- section `{sec}`: {s['n']} items skipped by the time guard")
    for n in c["notes"]:
        errs.append(f"- {n.get('note')}")
    if errs:
        L.append(f"### Errors, crashes, skips and notes ({len(errs)})\n")
        L += errs[:60]
        if len(errs) > 60:
            L.append(f"- ... {len(errs) - 60} more in results.json")
        L.append("")
    md = "\n".join(L)
    results = {"run": run_meta, "machine": machine, "kernels_import": env.get("kernels"),
               "ceilings": ceil,
               "kernels": [r["result"] for r in krecs if "result" in r],
               "train_step": ts, "max_batch": list(mb.values()),
               "errors": [r for r in done.values() if "error" in r or r.get("status") == "crashed"],
               "skipped": c["skipped"]}
    return results, md


# =============================================================================== orchestrator
def orchestrate(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / JSONL
    if jsonl.exists() and not args.resume:
        jsonl.unlink()
    t0 = time.time()
    budget = args.budget_s or DEFAULT_BUDGET[args.mode]
    scale = budget / DEFAULT_BUDGET[args.mode]
    ends = [(name, t0 + end * scale) for name, end in PLANS[args.mode]]
    global_end = t0 + budget
    run_meta = {"mode": args.mode, "device": args.device, "backend": args.backend,
                "budget_s": budget, "cap_gib": args.cap_gib,
                "command": " ".join([Path(sys.executable).name] + args.orig_argv),
                "restarts": 0}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(BENCH_DIR)]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--out", str(out),
           "--mode", args.mode, "--device", args.device, "--backend", args.backend,
           "--cap-gib", str(args.cap_gib), "--threads", str(args.threads),
           "--ends", json.dumps(ends), "--orig-argv", json.dumps(args.orig_argv)]
    rc = None
    for attempt in range(args.max_restarts + 1):
        if time.time() > global_end - 5:
            break
        log = open(out / f"worker{attempt}.log", "w")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(5.0, global_end + args.grace_s - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            rc = "killed (global time guard)"
        log.close()
        # the case in flight, if any, is marked crashed so that a restart skips it
        c = collect(out)
        for key, r in c["started"].items():
            if key not in c["done"]:
                append_jsonl(jsonl, {"key": key, "section": r.get("section"),
                                     "status": "crashed", "rc": rc,
                                     "log_tail": _tail(out / f"worker{attempt}.log")})
        run_meta["wall_s"] = time.time() - t0
        run_meta["worker_rc"] = rc
        _write_outputs(out, run_meta)
        if rc == 0 or rc == 2 or isinstance(rc, str):
            break
        run_meta["restarts"] = attempt + 1
        print(f"[run_bench] worker exited with {rc}; restarting (attempt {attempt + 1})",
              file=sys.stderr, flush=True)
    run_meta["wall_s"] = time.time() - t0
    md = _write_outputs(out, run_meta)
    if args.update_results:
        update_results_md(md, args.device)
    print(md)
    return 0 if rc == 0 else 1


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _write_outputs(out: Path, run_meta: dict) -> str:
    results, md = render(out, run_meta)
    write_json(out / "results.json", results)
    (out / "results.md").write_text(md + "\n")
    return md


def update_results_md(md: str, device: str) -> None:
    section = "gpu" if device == "cuda" else "cpu-kernels"
    text = RESULTS_MD.read_text()
    RESULTS_MD.write_text(replace_section(text, section, md))
    print(f"[run_bench] wrote the tables into {RESULTS_MD} (section {section})", file=sys.stderr)


def parse(argv=None, default_device="cuda", default_mode=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for cases.jsonl, results.json, results.md")
    p.add_argument("--device", choices=("cuda", "cpu"), default=default_device)
    p.add_argument("--mode", choices=tuple(PLANS), default=default_mode,
                   help="full (GPU default), quick, tiny (dry run), cpu (CPU kernel tables)")
    p.add_argument("--quick", action="store_true", help="same as --mode quick")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                   help="trady_triton backend for the TraDy kernels (default auto)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="global time guard in seconds (default: 430 full, 90 quick); the "
                        "worker is killed at this + --grace-s")
    p.add_argument("--cap-gib", type=float, default=2.0,
                   help="memory cap for the largest-batch search (GiB)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--max-restarts", type=int, default=4)
    p.add_argument("--grace-s", type=float, default=20.0)
    p.add_argument("--resume", action="store_true", help="keep cases.jsonl and continue")
    p.add_argument("--update-results", action="store_true",
                   help="also write the tables into bench/RESULTS.md")
    p.add_argument("--render", metavar="DIR",
                   help="only re-render DIR/results.{json,md} from DIR/cases.jsonl "
                        "(with --update-results: into bench/RESULTS.md); no torch needed")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ends", help=argparse.SUPPRESS)
    p.add_argument("--orig-argv", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.mode = "quick"
    if args.mode is None:
        args.mode = "full" if args.device == "cuda" else "cpu"
    if args.orig_argv is None:
        args.orig_argv = [Path(sys.argv[0]).as_posix()] + list(sys.argv[1:] if argv is None else argv)
    else:
        args.orig_argv = json.loads(args.orig_argv)
    return args


def main(argv=None, default_device="cuda") -> int:
    args = parse(argv, default_device)
    if args.render:
        out = Path(args.render)
        meta_path = out / "results.json"
        run_meta = json.loads(meta_path.read_text()).get("run", {}) if meta_path.exists() else {}
        _, md = render(out, run_meta or {"device": args.device})   # DIR may be read-only
        if args.update_results:
            update_results_md(md, (run_meta or {}).get("device", args.device))
        print(md)
        return 0
    if not args.out:
        print("--out DIR is required", file=sys.stderr)
        return 2
    if args.worker:
        return worker(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main(default_device="cpu"))
