#!/usr/bin/env python
"""CPU training-step table: TraDy against full fine-tuning, the plain-PyTorch baselines and
a no-grad forward of the same batch, with peaks above the idle process and profiles.

    python bench/train_step_table.py --threads 1 2      # bench/results/cpu/train_step.{md,json}
                                                        # and bench/RESULTS.md (cpu-train-step)
    python bench/train_step_table.py --models mbv2 --levels small --steps 7 --out /tmp/ts --no-update

Per model and thread count, two child processes build every row (_step_rows.py):

* a *memory* child under ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc otherwise keeps freed
  blocks and the resident size follows the allocator, not live memory): the bytes saved
  for backward and the cost model's figure, then per row the high-water mark of one
  steady-state step (two warm-ups, gradients freed, /proc/self/clear_refs) above the idle
  process;
* a *time* child (default allocator): two warm-ups per row, then ``--steps`` rounds in
  which every row runs once (interleaved, so load changes hit all rows alike), medians of
  wall and process CPU time; then torch.profiler's ``--top`` ops of each row.

BatchNorm has frozen statistics in every row. The table checks issue 11's targets (TraDy
at the smallest budget: step time against full fine-tuning, peak against the no-grad
forward's peak plus the saved floor) and the saved-bytes requirement at MobileNetV2-w0.35.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from _bench_env import REPO_ROOT, machine_info, replace_section, write_json  # noqa: E402

MIB = 2**20
MMAP_THRESHOLD = "65536"
DEFAULT_BATCH = {"mbv2": 32, "lite0": 8, "mcunet": 32, "tiny": 4}
STEP_TARGETS = {"mbv2": 0.70, "lite0": 0.45, "mcunet": 0.70}   # TraDy (small) / full
PEAK_TARGET = 1.10                                             # / (forward peak + floor)
RESULT_TAG = "@@RESULT@@"


# ---------------------------------------------------------------------- measuring
def model_configs(model: str, batch: int, levels, methods) -> list[dict]:
    from _step_rows import forward_config
    from _train_bench import configs

    return configs(model, (batch,), levels=levels, methods=methods) + [forward_config(model,
                                                                                      batch)]


def child_env(kind: str, threads: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(BENCH)]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = str(threads)
    if kind == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    return env


def run_child(kind: str, cfgs: list[dict], threads: int, steps: int = 7, top: int = 8,
              timeout: float | None = None) -> list[dict]:
    """The records of ``kind`` ("memory" or "time") for ``cfgs``, from a fresh process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--configs",
           json.dumps(cfgs), "--threads", str(threads), "--steps", str(steps), "--top", str(top)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(kind, threads),
                          timeout=timeout)
    line = next((l for l in proc.stdout.splitlines() if l.startswith(RESULT_TAG)), None)
    if line is None:
        raise RuntimeError(f"{kind} child: rc {proc.returncode}: {proc.stderr[-1500:]}")
    return json.loads(line[len(RESULT_TAG):])


def child_main(kind: str, cfgs: list[dict], threads: int, steps: int, top: int) -> int:
    from _bench_env import ensure_repo_on_path
    ensure_repo_on_path()
    import torch
    import _step_rows

    torch.set_num_threads(threads)
    if kind == "memory":
        records = _step_rows.memory_records(cfgs)
    else:
        records = _step_rows.time_records(cfgs, steps, top)
    print(RESULT_TAG + json.dumps(records, default=str))
    return 0


def measure_model(cfgs: list[dict], threads: int, steps: int, top: int) -> list[dict]:
    """Memory and time records of one model's rows, merged; error rows if a child fails."""
    from _train_bench import config_key

    try:
        memory = run_child("memory", cfgs, threads)
        times = {config_key(r): r for r in run_child("time", cfgs, threads, steps, top)}
    except (RuntimeError, subprocess.SubprocessError) as e:
        return [dict(c, threads=threads, error=str(e)) for c in cfgs]
    return [dict(r, **times[config_key(r)], threads=threads) for r in memory]


def add_ratios(rows: list[dict]) -> None:
    """x full (wall, CPU) and peak / (no-grad forward peak + cost-model floor), in place."""
    groups = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["model"], r["batch"]), {})[r["method"]] = r
    for r in rows:
        g = groups.get((r["model"], r["batch"]), {})
        full, fwd = g.get("full"), g.get("no-grad forward")
        if "error" in r:
            continue
        if full:
            r["x_full"] = r["step_median_s"] / full["step_median_s"]
            r["x_full_cpu"] = r["cpu_median_s"] / full["cpu_median_s"]
        if fwd and "cost_model_bytes" in r:
            r["peak_vs_inference"] = r["peak_above_idle_bytes"] / (
                fwd["peak_above_idle_bytes"] + r["cost_model_bytes"])


# ---------------------------------------------------------------------- rendering
def _fmt(v, spec=".2f"):
    return "–" if v is None else format(v, spec)


def _mib(v, spec=".2f"):
    return "–" if v is None else format(v / MIB, spec)


def intro(meta: dict, command: str, runs: list[dict]) -> str:
    loads = "; ".join(f"{r['threads']} thread(s) {r['started_utc']}, load average "
                      f"{r['load_before']:.1f} -> {r['load_after']:.1f}" for r in runs)
    return (f"Measured on {meta.get('cpu')} ({meta.get('cpu_count')} logical cores, shared with "
            f"other processes), torch {meta.get('torch')}, Python {meta.get('python')}, git "
            f"{meta.get('git')}. Command: `{command}`. Runs: {loads}. Per model and thread count, "
            "two fresh processes build every row (one measures memory, one time); BatchNorm is "
            "frozen in all rows. *Step*: two "
            "warm-up steps per row, then rounds in which every row runs once (interleaved), "
            "medians of the wall clock and of the process CPU time (the CPU time is less "
            "sensitive to the other processes); on this shared machine expect ±20 % on times, "
            "less on ratios. *Peak above idle*: in a process with `MALLOC_MMAP_THRESHOLD_=65536` "
            "(freed tensors go back to the OS), after two warm-up steps and with the gradients "
            "freed, the high-water mark of one step (reset through `/proc/self/clear_refs`) "
            "minus the resident size just before it. *÷ (fwd + floor)*: that peak over the "
            "no-grad forward's peak plus the row's cost-model floor of saved bytes (issue 11's "
            f"target for TraDy: <= {PEAK_TARGET:.2f}). *Saved*: bytes autograd keeps for "
            "backward over one forward (`saved_tensor_bytes`), next to the cost model's floor.\n")


TABLE_HEAD = ("| model | N | method | budget | step ms | × full | CPU ms | × full (CPU) | "
              "peak above idle MiB | ÷ (fwd + floor) | saved MiB (measured) | cost model MiB | "
              "measured / model | full ÷ measured | params with grad | units (budget), pool |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(r: dict, full: dict | None) -> str:
    head = f"| {r['model']} {r['res']}² | {r['batch']} | {r['method']} | {r['budget'] or '–'} | "
    saved, floor = r.get("saved_bytes"), r.get("cost_model_bytes")
    units = (f"{r['selected_units']:,} ({r['budget_units']:,}), {r.get('pool_layers')}"
             if r.get("selected_units") is not None else "–")
    params = f"{r['trained_params']:,}" if "trained_params" in r else "–"
    return head + " | ".join([
        f"{r['step_median_s'] * 1e3:.0f}", _fmt(r.get("x_full")),
        f"{r['cpu_median_s'] * 1e3:.0f}", _fmt(r.get("x_full_cpu")),
        _mib(r["peak_above_idle_bytes"], ".1f"), _fmt(r.get("peak_vs_inference")),
        _mib(saved), _mib(floor), _fmt(saved / floor if saved and floor else None, ".3f"),
        _fmt(full["saved_bytes"] / saved if full and saved else None, ".1f"),
        params, units]) + " |"


def main_table(rows: list[dict]) -> str:
    fulls = {(r["model"], r["batch"]): r for r in rows
             if r["method"] == "full" and "error" not in r}
    lines = [TABLE_HEAD]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['method']} | {r['budget'] or '–'} "
                         f"| error: {r['error'][:160]} |" + " |" * 11)
        else:
            lines.append(table_row(r, fulls.get((r["model"], r["batch"]))))
    return "\n".join(lines) + "\n"


def _find(rows, model, method, budget=None):
    return next((r for r in rows if r["model"] == model and r["method"] == method
                 and r["budget"] == budget and "error" not in r), None)


def target_checks(rows: list[dict], threads: int) -> str:
    """Issue 11's targets for TraDy at the smallest budget, per model in the run."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        t, fwd = _find(rows, model, "trady", "small"), _find(rows, model, "no-grad forward")
        if not (t and fwd and "x_full" in t):
            continue
        step_target = STEP_TARGETS.get(model)
        step_verdict = ("" if step_target is None else
                        f" (target <= {step_target:.2f}: "
                        f"{'PASS' if t['x_full'] <= step_target else 'FAIL'})")
        peak = t["peak_vs_inference"]
        lines.append(
            f"* {model} {t['res']}² batch {t['batch']}, {threads} thread(s): TraDy step "
            f"{t['step_median_s'] * 1e3:.0f} ms = **{t['x_full']:.2f}x** full fine-tuning"
            f"{step_verdict}, {t['x_full_cpu']:.2f}x in CPU time; no-grad forward "
            f"{fwd['step_median_s'] * 1e3:.0f} ms ({fwd['x_full']:.2f}x). Peak above idle "
            f"{_mib(t['peak_above_idle_bytes'], '.1f')} MiB / ({_mib(fwd['peak_above_idle_bytes'], '.1f')} "
            f"no-grad forward + {_mib(t['cost_model_bytes'])} floor) = **{peak:.2f}x** "
            f"(target <= {PEAK_TARGET:.2f}: {'PASS' if peak <= PEAK_TARGET else 'FAIL'}).")
    return "\n".join(lines) + ("\n" if lines else "")


def saved_check(rows: list[dict]) -> str:
    """The saved-bytes requirement at MobileNetV2-w0.35 128x128, smallest budget."""
    t = _find(rows, "mbv2", "trady", "small")
    f = _find(rows, "mbv2", "full") if t else None
    if not (t and f):
        return ""
    within = abs(t["saved_bytes"] - t["cost_model_bytes"]) / t["cost_model_bytes"]
    ratio = f["saved_bytes"] / t["saved_bytes"]
    parts = t["cost_model_parts"]
    return (f"**Check (MobileNetV2-w0.35 128x128, batch {t['batch']}, smallest budget):** "
            f"TraDy keeps {t['saved_bytes'] / MIB:.3f} MiB for backward, the cost model's floor "
            f"is {t['cost_model_bytes'] / MIB:.3f} MiB (compact activations "
            f"{parts['activations'] / MIB:.3f} + classifier input {parts['classifier'] / MIB:.3f}"
            f" + 1-bit masks {parts['masks'] / MIB:.3f}): {within:.2%} apart "
            f"({'PASS' if within <= 0.05 else 'FAIL'}, <= 5 %); full fine-tuning keeps "
            f"{f['saved_bytes'] / MIB:.1f} MiB, {ratio:.1f}x more "
            f"({'PASS' if ratio >= 40 else 'FAIL'}, >= 40x). Full fine-tuning's own floor (all "
            f"channels, 1-bit masks) would be {f['full_floor_bytes'] / MIB:.1f} MiB; plain "
            f"PyTorch keeps {f['saved_bytes'] / f['full_floor_bytes']:.2f}x that.\n")


def profile_table(rows: list[dict]) -> str:
    lines = ["| row | profiled ms / step | top ops: self CPU ms per step (calls) |",
             "|---|---|---|"]
    for r in rows:
        if "error" in r:
            continue
        ops = "; ".join(f"`{name.removeprefix('aten::')}` {ms:.1f} ({calls})"
                        for name, ms, calls in r["top_ops"])
        label = f"{r['model']} {r['method']} {r['budget'] or ''}".strip()
        lines.append(f"| {label} | "
                     f"{r['profiled_ms']:.0f} | {ops} |")
    return "\n".join(lines) + "\n"


def render(runs: list[dict], meta: dict, command: str) -> str:
    parts = [intro(meta, command, runs)]
    for run in runs:
        rows = run["rows"]
        parts += [f"#### {run['threads']} torch thread(s)\n", main_table(rows),
                  target_checks(rows, run["threads"]),
                  "torch.profiler, per row (after the timed rounds, "
                  f"{run.get('profile_steps', 2)} steps each; the profiled step is the sum of "
                  "all ops' self CPU time):\n", profile_table(rows)]
    if runs:
        parts.append(saved_check(runs[0]["rows"]))
    return "\n".join(p for p in parts if p)


# ---------------------------------------------------------------------- command line
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["mbv2", "lite0"],
                   choices=sorted(DEFAULT_BATCH), help="models (default: mbv2 lite0)")
    p.add_argument("--batch", type=int, default=None,
                   help=f"batch for every model (default per model: {DEFAULT_BATCH})")
    p.add_argument("--levels", nargs="+", default=["small", "medium", "large"],
                   choices=["small", "medium", "large"], help="budgets (default: all three)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="methods of _train_bench.METHODS (default: all)")
    p.add_argument("--steps", type=int, default=7, help="timed rounds, medians (default 7)")
    p.add_argument("--threads", type=int, nargs="+", default=[1],
                   help="torch thread counts, one run each (default 1)")
    p.add_argument("--top", type=int, default=8, help="profile ops per row (default 8)")
    p.add_argument("--out", default=str(BENCH / "results" / "cpu"),
                   help="folder for train_step.json / train_step.md")
    p.add_argument("--no-update", action="store_true", help="do not write bench/RESULTS.md")
    p.add_argument("--render-only", action="store_true",
                   help="re-render OUT/train_step.json (no measurement)")
    p.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                   help="with --render-only: append the runs of these train_step.json files")
    p.add_argument("--child", choices=["memory", "time"], help=argparse.SUPPRESS)
    p.add_argument("--configs", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from _train_bench import METHODS
    bad = [m for m in (args.methods or []) if m not in METHODS]
    if bad:
        p.error(f"--methods {bad}: allowed values are {METHODS}")
    if args.steps < 1:
        p.error(f"--steps {args.steps}: must be >= 1")
    return args


def measure(args, checkpoint) -> list[dict]:
    """One run per thread count; ``checkpoint(runs)`` after every model, so that a long
    run that is stopped keeps what it measured."""
    from _train_bench import METHODS

    runs = []
    for threads in args.threads:
        run = {"threads": threads, "load_before": os.getloadavg()[0], "profile_steps": 2,
               "started_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "rows": []}
        runs.append(run)
        for model in args.models:
            t0 = time.time()
            cfgs = model_configs(model, args.batch or DEFAULT_BATCH[model], args.levels,
                                 tuple(args.methods or METHODS))
            run["rows"] += measure_model(cfgs, threads, args.steps, args.top)
            add_ratios(run["rows"])
            run["load_after"] = os.getloadavg()[0]
            checkpoint(runs)
            print(f"[train_step_table] {model}, {threads} thread(s): {time.time() - t0:.0f} s",
                  flush=True)
    return runs


def write_outputs(md: str, saved: dict, out: Path, update_results: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "train_step.json", saved)
    (out / "train_step.md").write_text(md + "\n")
    if update_results:
        results = BENCH / "RESULTS.md"
        results.write_text(replace_section(results.read_text(), "cpu-train-step", md))


def load_saved(out: Path, merge: list[str]) -> dict:
    """OUT/train_step.json, with the runs of each ``--merge`` JSON appended."""
    saved = json.loads((out / "train_step.json").read_text())
    for path in merge:
        other = json.loads(Path(path).read_text())
        saved["runs"] += other["runs"]
        saved["command"] += f"`, then `{other['command']}"
    return saved


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, json.loads(args.configs), args.threads[0], args.steps,
                          args.top)
    out = Path(args.out)
    if args.render_only:
        saved = load_saved(out, args.merge)
    else:
        argv_text = " ".join(sys.argv[1:] if argv is None else argv)
        saved = {"machine": machine_info("cpu"), "runs": [],
                 "command": f"python bench/train_step_table.py {argv_text}".rstrip()}

        def checkpoint(runs):
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "train_step.json", dict(saved, runs=runs))
        saved["runs"] = measure(args, checkpoint)
    md = render(saved["runs"], saved["machine"], saved["command"])
    write_outputs(md, saved, out, not args.no_update)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
