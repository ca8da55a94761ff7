#!/usr/bin/env python
"""CPU training-step table: TraDy against full fine-tuning and the plain-PyTorch baselines.

    python bench/train_step_table.py                 # writes bench/RESULTS.md (cpu-train-step)
    python bench/train_step_table.py --no-lite0 --steps 3 --out /tmp/ts

Two fresh processes per configuration (``--one``), because the process peak RSS
(``ru_maxrss``) only grows: a *memory* child builds the model (and converts it for
TraDy), records its RSS, measures the bytes saved for backward over one forward +
backward, runs one step and reports its peak RSS, under ``MALLOC_MMAP_THRESHOLD_=65536``
(glibc otherwise keeps freed blocks and the peak follows the allocator); a *time* child
(default allocator) runs one warm-up step and ``--steps`` timed steps.

The table checks the issue's requirement at MobileNetV2-w0.35 128x128 batch 32, smallest
budget: TraDy's measured saved bytes within 5 % of the cost model's floor and at least
40x below full fine-tuning's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from _bench_env import REPO_ROOT, machine_info, replace_section, write_json  # noqa: E402

MIB = 2**20
MMAP_THRESHOLD = 65536


def _rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def run_one(cfg: dict, steps: int, threads: int, what: str) -> dict:
    """``what="memory"``: RSS and saved bytes around one step; ``"time"``: step times."""
    from _bench_env import ensure_repo_on_path
    ensure_repo_on_path()
    import torch

    torch.set_num_threads(threads)
    from _train_bench import make_setup

    t0 = time.perf_counter()
    setup = make_setup(cfg, "cpu")
    rec = setup.describe()
    rec["build_s"] = time.perf_counter() - t0
    if what == "memory":
        rec["rss_before_bytes"] = _rss_bytes()
        rec["maxrss_before_bytes"] = _maxrss_bytes()
        rec["saved_bytes"] = setup.measure_saved()     # forward + backward: the step's peak
        rec.update(setup.analytic())
        setup.step()
        rec["peak_rss_bytes"] = _maxrss_bytes()
        return rec
    setup.step()                                  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        setup.step()
        times.append(time.perf_counter() - t)
    rec["step_s"] = times
    rec["step_median_s"] = statistics.median(times)
    return rec


def configs_for(args) -> list[dict]:
    from _train_bench import configs
    out = configs("mbv2", (args.batch,))
    if args.lite0:
        out += configs("lite0", (args.lite0_batch,))
    return out


def _fmt(v, spec=".2f"):
    return "–" if v is None else format(v, spec)


def render(rows: list[dict], meta: dict, command: str) -> str:
    L = []
    m = meta
    L.append(f"Measured {m.get('date_utc')} on {m.get('cpu')} ({m.get('cpu_count')} logical cores, "
             f"shared; torch threads {meta.get('threads')}), torch {m.get('torch')}, "
             f"Python {m.get('python')}, git {m.get('git')}. Command: `{command}`. "
             f"Step time: median of {meta.get('steps')} steps after one warm-up "
             "in a fresh process (a shared machine: expect ±20 %). Peak RSS: `ru_maxrss` of another "
             "fresh process per row that builds the model, measures the saved bytes over one "
             "forward + backward and runs one step, with `MALLOC_MMAP_THRESHOLD_=65536` so that "
             "freed tensors go back to the OS (glibc's default keeps them and the peak then "
             "follows the allocator, not live memory). torch itself is ~{:.0f} MiB of it; "
             "Δ = peak minus the RSS after building (and converting) the model.\n".format(
                 min(r.get("rss_before_bytes", 0) for r in rows) / MIB if rows else 0))
    L.append("| model | N | method | budget | step s | × full | saved MiB (measured) | "
             "cost model MiB | measured / model | full ÷ measured | peak RSS MiB | Δ peak MiB "
             "| params with grad | units (budget), pool layers |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    fulls = {(r["model"], r["batch"]): r for r in rows if r.get("method") == "full" and "error" not in r}
    for r in rows:
        if "error" in r:
            L.append(f"| {r.get('model')} | {r.get('batch')} | {r.get('method')} | "
                     f"{r.get('budget') or '–'} | error: {r['error'][:120]} |" + " |" * 9)
            continue
        f = fulls.get((r["model"], r["batch"]))
        units = (f"{r['selected_units']:,} ({r['budget_units']:,}), pool {r.get('pool_layers')}"
                 if r.get("selected_units") is not None else "–")
        L.append(
            f"| {r['model']} {r['res']}² | {r['batch']} | {r['method']} | {r['budget'] or '–'} | "
            f"{r['step_median_s']:.3f} | {_fmt(r['step_median_s'] / f['step_median_s'] if f else None)} | "
            f"{r['saved_bytes'] / MIB:.2f} | {r['cost_model_bytes'] / MIB:.2f} | "
            f"{r['saved_bytes'] / r['cost_model_bytes']:.3f} | "
            f"{_fmt(f['saved_bytes'] / r['saved_bytes'] if f and r['saved_bytes'] else None, '.1f')} | "
            f"{r['peak_rss_bytes'] / MIB:.0f} | "
            f"{(r['peak_rss_bytes'] - r['rss_before_bytes']) / MIB:.0f} | "
            f"{r['trained_params']:,} | {units} |")
    L.append("")
    # the check
    t = next((r for r in rows if r.get("model") == "mbv2" and r.get("method") == "trady"
              and r.get("budget") == "small" and "error" not in r), None)
    f = fulls.get(("mbv2", t["batch"])) if t else None
    if t and f:
        within = abs(t["saved_bytes"] - t["cost_model_bytes"]) / t["cost_model_bytes"]
        ratio = f["saved_bytes"] / t["saved_bytes"]
        ok1, ok2 = within <= 0.05, ratio >= 40
        parts = t["cost_model_parts"]
        L.append(f"**Check (MobileNetV2-w0.35 128x128, batch {t['batch']}, smallest budget):** "
                 f"TraDy keeps {t['saved_bytes'] / MIB:.3f} MiB for backward, the cost model's "
                 f"floor is {t['cost_model_bytes'] / MIB:.3f} MiB "
                 f"(compact activations {parts['activations'] / MIB:.3f} + classifier input "
                 f"{parts['classifier'] / MIB:.3f} + 1-bit masks {parts['masks'] / MIB:.3f}): "
                 f"{within:.2%} apart ({'PASS' if ok1 else 'FAIL'}, <= 5 %); full fine-tuning keeps "
                 f"{f['saved_bytes'] / MIB:.1f} MiB, {ratio:.1f}x more ({'PASS' if ok2 else 'FAIL'}, "
                 f">= 40x). Full fine-tuning's own floor (all channels, 1-bit masks) would be "
                 f"{f['full_floor_bytes'] / MIB:.1f} MiB; plain PyTorch keeps "
                 f"{f['saved_bytes'] / f['full_floor_bytes']:.2f}x that.\n")
    return "\n".join(L)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32, help="MobileNetV2 batch (default 32)")
    p.add_argument("--lite0", dest="lite0", action="store_true", default=True)
    p.add_argument("--no-lite0", dest="lite0", action="store_false")
    p.add_argument("--lite0-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(BENCH / "results" / "cpu"),
                   help="folder for train_step.json / train_step.md")
    p.add_argument("--no-update", action="store_true", help="do not write bench/RESULTS.md")
    p.add_argument("--render-only", action="store_true",
                   help="re-render OUT/train_step.json (no measurement)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--what", default="time", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.render_only:
        saved = json.loads((Path(args.out) / "train_step.json").read_text())
        md = render(saved["rows"], saved["machine"], saved["command"])
        if not args.no_update:
            results = BENCH / "RESULTS.md"
            results.write_text(replace_section(results.read_text(), "cpu-train-step", md))
        print(md)
        return 0
    if args.one:
        cfg = json.loads(args.one)
        try:
            rec = run_one(cfg, args.steps, args.threads, args.what)
        except Exception as e:   # noqa: BLE001
            rec = dict(cfg, error=f"{type(e).__name__}: {e}")
        print("@@RESULT@@" + json.dumps(rec, default=str))
        return 0

    command = "python bench/train_step_table.py" + (" " + " ".join(argv if argv is not None
                                                                   else sys.argv[1:])).rstrip()
    import torch
    torch.set_num_threads(args.threads)
    meta = machine_info("cpu")
    meta.update({"threads": args.threads, "steps": args.steps})
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(BENCH)]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = str(args.threads)
    rows = []
    for cfg in configs_for(args):
        t0 = time.time()
        rec = dict(cfg)
        for what in ("memory", "time"):
            child_env = dict(env)
            if what == "memory":
                # glibc keeps freed large blocks in its heap (dynamic mmap threshold), so
                # ru_maxrss would follow the allocator, not live memory: force mmap.
                child_env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one",
                                   json.dumps(cfg), "--what", what, "--steps", str(args.steps),
                                   "--threads", str(args.threads)],
                                  capture_output=True, text=True, env=child_env)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("@@RESULT@@")),
                        None)
            part = json.loads(line[len("@@RESULT@@"):]) if line else dict(
                cfg, error=f"{what}: rc {proc.returncode}: {proc.stderr[-500:]}")
            rec.update(part)
            if "error" in part:
                break
        rows.append(rec)
        print(f"{cfg['model']:6s} {cfg['method']:10s} {str(cfg['budget']):6s} "
              f"{time.time() - t0:5.1f}s  saved {rec.get('saved_bytes', 0) / MIB:8.2f} MiB  "
              f"step {rec.get('step_median_s', float('nan')):.3f}s  "
              f"{rec.get('error', '')[:200]}", flush=True)
    md = render(rows, meta, command)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "train_step.json", {"machine": meta, "command": command, "rows": rows})
    (out / "train_step.md").write_text(md + "\n")
    if not args.no_update:
        results = BENCH / "RESULTS.md"
        results.write_text(replace_section(results.read_text(), "cpu-train-step", md))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
