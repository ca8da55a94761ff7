"""``trady-experiments``: policy x budget x seed sweeps, learning-rate search, summary table.

    trady-experiments sweep --models mcunet-in1 efficientnet-lite0 \\
        --data digits fashion-mnist --out runs/sweep          # resumable: re-run to continue
    trady-experiments summarize runs/sweep --markdown docs/results/table.md \\
        --json docs/results/summary.json
    trady-experiments tune-lr --models mcunet-in1 efficientnet-lite0 \\
        --data digits fashion-mnist --out runs/lr-search --json docs/results/lr_search.json
    trady-experiments compressed --out runs/compressed      # compressed_experiment.py

Each run is one :func:`trady_triton.train.finetune` in this process, writing
``OUT/MODEL/DATA/POLICY_BUDGET_sSEED/record.json`` (one JSON per run). A run whose record
says "complete" is skipped; an interrupted one resumes from its checkpoint. The
budget-free policies (classifier-only, full) run once per seed, not once per budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import progress
from .presets import BUDGET_LEVELS, BUDGETLESS_POLICIES, DEFAULT_PRESET, PRESETS
from .records import RunRecord
from .tables import markdown_table, mib, pct
from .sampling import POLICIES, get_policy

PROG = "trady-experiments"
SWEEP_POLICIES = ("d-topk", "s-topk", "d-fullrandom", "s-fullrandom", "d-detrgn", "s-detrgn",
                  "classifier-only", "full")
NO_BUDGET = "none"
SUMMARY_FORMAT = "trady-sweep-summary"


@dataclass(frozen=True)
class Job:
    model: str
    data: str
    policy: str
    budget: str
    seed: int
    lr: float | None = None

    @property
    def budget_label(self) -> str:
        return NO_BUDGET if self.policy in BUDGETLESS_POLICIES else self.budget

    def path(self, root: Path) -> Path:
        data = self.data.replace(":", "_").replace("/", "_")
        lr = "" if self.lr is None else f"_lr{self.lr:g}"
        return root / self.model / data / f"{self.policy}_{self.budget_label}{lr}_s{self.seed}"


def plan(models, datasets, policies, budgets, seeds, lrs=(None,)) -> list[Job]:
    """Every run of a sweep, seed-major so that a partial sweep has whole seeds."""
    jobs, seen = [], set()
    for model in models:
        for data in datasets:
            for seed in seeds:
                for budget in budgets:
                    for policy in policies:
                        policy = get_policy(policy).name
                        for lr in lrs:
                            job = Job(model, data, policy,
                                      NO_BUDGET if policy in BUDGETLESS_POLICIES else budget,
                                      seed, lr)
                            if job not in seen:
                                seen.add(job)
                                jobs.append(job)
    return jobs


def _status(path: Path) -> str | None:
    record = path / "record.json"
    if not record.is_file():
        return None
    try:
        return json.loads(record.read_text()).get("status")
    except (OSError, json.JSONDecodeError):
        return None


def run_jobs(jobs: list[Job], root: Path, *, preset: str = DEFAULT_PRESET, threads: int | None = 1,
             eval_on: str = "test", extra: dict | None = None, log=print,
             command: str | None = None) -> dict:
    """Run (or skip, or resume) every job; returns counts of done / skipped / failed."""
    from .train import CHECKPOINT_FILE, RunConfig, finetune

    counts = {"run": 0, "skipped": 0, "failed": 0}
    started = time.perf_counter()
    for index, job in enumerate(jobs, 1):
        out = job.path(root)
        tag = (f"[{index}/{len(jobs)}] {job.model} {job.data} {job.policy} {job.budget_label}"
               f"{'' if job.lr is None else f' lr {job.lr:g}'} seed {job.seed}")
        if _status(out) == "complete":
            counts["skipped"] += 1
            continue
        config = RunConfig(model=job.model, data=job.data, policy=job.policy,
                           budget=job.budget if job.policy not in BUDGETLESS_POLICIES else "small",
                           seed=job.seed, preset=preset, lr=job.lr, eval_on=eval_on,
                           threads=threads, **(extra or {}))
        resume = (out / CHECKPOINT_FILE).is_file()
        tick = time.perf_counter()
        try:
            record = finetune(config, out, resume=resume, command=command,
                              keep_checkpoint=False)
        except KeyboardInterrupt:
            log(f"{tag}: interrupted; re-run the same command to continue")
            raise
        except Exception as error:   # one failed run must not stop a long sweep
            counts["failed"] += 1
            out.mkdir(parents=True, exist_ok=True)
            (out / "error.txt").write_text(f"{type(error).__name__}: {error}\n")
            log(f"{tag}: FAILED {type(error).__name__}: {error}")
            continue
        counts["run"] += 1
        final = RunRecord.from_dict(record).final
        log(f"{tag}: {final.eval_split} acc {100 * final.eval_accuracy:.2f}% "
            f"({time.perf_counter() - tick:.1f}s{', resumed' if resume else ''}; "
            f"elapsed {time.perf_counter() - started:.0f}s)")
    return counts


# ------------------------------------------------------------------------- reading results

def load_records(root: Path) -> list[dict]:
    records = []
    for path in sorted(Path(root).rglob("record.json")):
        if path.parent.name == "full-baseline":
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if record.get("status") == "complete":
            records.append(record)
    return records


def _budget_label(record: RunRecord) -> str:
    return NO_BUDGET if get_policy(record.config.policy).name in BUDGETLESS_POLICIES \
        else record.config.budget


def _spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def _summary_row(key: tuple, rs: list[RunRecord]) -> dict:
    """One (model, data, policy, budget) cell: accuracy spread over seeds and mean costs."""
    model, data, policy, budget = key
    rs = sorted(rs, key=lambda r: r.config.seed)
    first, last = rs[0], [r.epochs[-1] for r in rs]

    def mean_final(name: str):
        return _spread([getattr(r.final, name) for r in rs])["mean"]

    return {
        "model": model, "data": data, "policy": policy, "budget": budget,
        "seeds": [r.config.seed for r in rs],
        "accuracy": _spread([r.final.eval_accuracy for r in rs]),
        "accuracy_per_seed": [r.final.eval_accuracy for r in rs],
        "budget_units": first.model.budget_units,
        "full_units": first.model.full_units,
        "budget_fraction": first.model.budget_fraction,
        "selected_units": _spread([e.selected_units for e in last])["mean"],
        "channels_drawn": _spread([e.channels_drawn for r in rs for e in r.epochs])["mean"],
        "weight_sparsity": mean_final("mean_weight_sparsity"),
        "activation_sparsity": mean_final("mean_activation_sparsity"),
        "weight_grad_flops_saved": mean_final("mean_weight_grad_flops_saved"),
        "saved_bytes_measured": mean_final("saved_bytes_measured"),
        "saved_bytes_match": all(r.final.saved_bytes_match_all_epochs for r in rs),
        "plain_full_finetune_bytes": first.memory.plain_full_finetune_measured_bytes,
        "lr": first.settings.lr, "lr_source": first.settings.lr_source,
        "wall_s": mean_final("wall_s"),
        "diverged_seeds": sum(1 for r in rs if r.final.diverged),
        "preset": first.settings.preset, "resolution": first.settings.resolution,
        "train_size": first.data.train_size, "eval_size": first.data.eval_size,
        "epochs": first.settings.epochs,
        "top_k": first.model.ranking.get("top_k"),
        "ranking_key": first.model.ranking.get("key"),
        **_tracking_means(rs),
    }


def _tracking_means(rs: list[RunRecord]) -> dict:
    """Means over seeds of the update tracking (track_updates): the last epoch's coverage
    and cumulative cosine, and the per-epoch cosine averaged over epochs; {} when untracked."""
    tracked = [[e.update_tracking for e in r.epochs] for r in rs]
    if not all(t and all(t) for t in tracked):
        return {}
    return {"coverage_final": statistics.fmean(t[-1]["coverage"] for t in tracked),
            "cosine_cum_final": statistics.fmean(t[-1]["cosine_cum"] for t in tracked),
            "cosine_epoch_mean": statistics.fmean(
                statistics.fmean(e["cosine_epoch"] for e in t) for t in tracked)}


CONFIDENCE = 0.95


def paired_statistics(diffs: list[float], confidence: float = CONFIDENCE) -> dict:
    """Paired differences: mean, sample std, the t confidence interval of the mean, and the
    two-sided exact sign test (ties dropped; p = 1 when every pair ties)."""
    from scipy import stats

    n = len(diffs)
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    out = {"n": n, "mean": statistics.fmean(diffs) if n else None,
           "std": statistics.stdev(diffs) if n > 1 else None, "confidence": confidence,
           "ci_low": None, "ci_high": None, "wins": wins, "losses": losses,
           "ties": n - wins - losses,
           "sign_test_p": stats.binomtest(wins, wins + losses).pvalue if wins + losses else 1.0}
    if n > 1:
        half = stats.t.ppf(0.5 + confidence / 2, n - 1) * out["std"] / math.sqrt(n)
        out["ci_low"], out["ci_high"] = out["mean"] - half, out["mean"] + half
    return out


_PAIRS = (("d-topk", "s-topk"), ("d-topk", "d-fullrandom"), ("d-fullrandom", "s-fullrandom"),
          ("d-detrgn", "s-detrgn"), ("d-topk", "d-detrgn"))


def _budget_order(budget: str):
    return (BUDGET_LEVELS.index(budget), "") if budget in BUDGET_LEVELS else (99, budget)


def _paired_comparisons(by_key: dict) -> list[dict]:
    """Same-seed accuracy differences of the policy pairs, per (model, data, budget)."""
    comparisons = []
    keys = sorted({(m, d) for m, d, _, _ in by_key})
    budgets = sorted({b for _, _, _, b in by_key}, key=_budget_order)
    for (model, data), (a, b), budget in ((md, pair, bud) for md in keys for pair in _PAIRS
                                          for bud in budgets):
        if (model, data, a, budget) not in by_key or (model, data, b, budget) not in by_key:
            continue
        acc_a = dict(zip(by_key[(model, data, a, budget)]["seeds"],
                         by_key[(model, data, a, budget)]["accuracy_per_seed"]))
        acc_b = dict(zip(by_key[(model, data, b, budget)]["seeds"],
                         by_key[(model, data, b, budget)]["accuracy_per_seed"]))
        common = sorted(set(acc_a) & set(acc_b))
        diffs = [acc_a[s] - acc_b[s] for s in common]
        comparisons.append({"model": model, "data": data, "budget": budget, "a": a, "b": b,
                            "seeds": common, "diffs": diffs, "diff": _spread(diffs),
                            "wins": sum(d > 0 for d in diffs),
                            "ties": sum(d == 0 for d in diffs),
                            "stats": paired_statistics(diffs)})
    return comparisons


def summarize_records(records: list[RunRecord | dict]) -> dict:
    """Mean and spread over seeds per (model, data, policy, budget), plus paired differences."""
    groups: dict[tuple, list[RunRecord]] = {}
    for r in map(RunRecord.coerce, records):
        key = (r.config.model, r.config.data, get_policy(r.config.policy).name, _budget_label(r))
        groups.setdefault(key, []).append(r)
    rows = [_summary_row(key, rs) for key, rs in sorted(groups.items())]
    comparisons = _paired_comparisons({(r["model"], r["data"], r["policy"], r["budget"]): r
                                       for r in rows})
    return {"format": SUMMARY_FORMAT, "version": 1, "runs": len(records), "rows": rows,
            "comparisons": comparisons, "pooled": pool_comparisons(comparisons)}


def pool_comparisons(comparisons: list[dict]) -> list[dict]:
    """Paired differences pooled over data sets and budgets, per model and over all models."""
    pooled = []
    pairs = list(dict.fromkeys((c["a"], c["b"]) for c in comparisons))
    models = sorted({c["model"] for c in comparisons})
    for a, b in pairs:
        for model in models + (["all"] if len(models) > 1 else []):
            diffs = [d for c in comparisons if (c["a"], c["b"]) == (a, b)
                     and model in (c["model"], "all") for d in c["diffs"]]
            if diffs:
                pooled.append({"model": model, "a": a, "b": b, "diff": _spread(diffs),
                               "wins": sum(d > 0 for d in diffs),
                               "losses": sum(d < 0 for d in diffs),
                               "stats": paired_statistics(diffs)})
    return pooled


def compact_record(record: RunRecord | dict) -> dict:
    """One line per run for committing: settings, final figures, per-epoch curves."""
    r = RunRecord.coerce(record)
    epochs = r.epochs
    return {
        "model": r.config.model, "data": r.config.data,
        "policy": get_policy(r.config.policy).name, "budget": _budget_label(r),
        "seed": r.config.seed, "lr": r.settings.lr,
        "budget_units": r.model.budget_units, "full_units": r.model.full_units,
        "final": r.final.to_dict() if r.final is not None else None,
        "eval_accuracy": [e.eval_accuracy for e in epochs],
        "train_loss": [e.train_loss for e in epochs],
        "channels_drawn": [e.channels_drawn for e in epochs],
        "layers_trained": [e.layers_trained for e in epochs],
        "draw_digest": [e.draw_digest for e in epochs],
        "saved_bytes_measured": [e.saved_bytes_measured for e in epochs],
        "epoch_wall_s": [e.wall_s for e in epochs],
        **_tracking_curves(epochs),
    }


def _tracking_curves(epochs) -> dict:
    """Per-epoch coverage and cosines of a tracked run (track_updates); {} otherwise."""
    if not epochs or not all(e.update_tracking for e in epochs):
        return {}
    return {key: [e.update_tracking[key] for e in epochs]
            for key in ("coverage", "cosine_epoch", "cosine_cum")}


def mean_curves(lines: list[dict], key: str) -> dict[tuple, list[float]]:
    """Per (model, data, policy, budget): the per-epoch ``key`` curve of compact run lines
    (``summarize --runs-jsonl``), averaged over seeds; lines without the curve are left out."""
    groups: dict[tuple, list[list[float]]] = {}
    for line in lines:
        if line.get(key):
            groups.setdefault((line["model"], line["data"], line["policy"], line["budget"]),
                              []).append(line[key])
    return {k: [statistics.fmean(values) for values in zip(*curves)]
            for k, curves in sorted(groups.items())}


def _cell(spread: dict) -> str:
    if not spread.get("n"):
        return "-"
    if spread["n"] == 1:
        return f"{100 * spread['mean']:.1f}"
    return f"{100 * spread['mean']:.1f} ± {100 * spread['std']:.1f}"


def _accuracy_table(sub: list[dict], budgets: list[str], order: list[str]) -> str:
    """Policies x budgets: mean ± std top-1 % over seeds, n and the learning rate."""
    header = ["policy"]
    for b in budgets:
        units = next((r for r in sub if r["budget"] == b), None)
        header.append(f"{b} ({units['budget_units']:,} u = "
                      f"{100 * units['budget_fraction']:.2f}%)" if units else b)
    rows = []
    for policy in order:
        cells = [policy]
        for b in budgets:
            row = next((r for r in sub if r["policy"] == policy and
                        r["budget"] in (b, NO_BUDGET)), None)
            if row is None:
                cells.append("-")
                continue
            text = f"{_cell(row['accuracy'])} (n={row['accuracy']['n']}, lr {row['lr']:g})"
            if row["diverged_seeds"]:
                text += f", {row['diverged_seeds']} diverged"
            cells.append(text)
        rows.append(cells)
    return markdown_table(header, rows)


def _memory_table(sub: list[dict], order: list[str]) -> str:
    header = ["policy", "budget", "channels drawn", "act. sparsity %", "W sparsity %",
              "dW FLOPs saved %", "saved for backward MiB", "vs plain full FT"]
    rows = [[row["policy"], row["budget"], f"{row['channels_drawn']:.0f}",
             pct(row["activation_sparsity"]), pct(row["weight_sparsity"]),
             pct(row["weight_grad_flops_saved"]), mib(row["saved_bytes_measured"], 3),
             f"{100 * row['saved_bytes_measured'] / row['plain_full_finetune_bytes']:.1f}%"]
            for row in sorted(sub, key=lambda r: (order.index(r["policy"]), r["budget"]))]
    return markdown_table(header, rows)


def _model_data_section(sub: list[dict], model: str, data: str) -> list[str]:
    budgets = [b for b in BUDGET_LEVELS if any(r["budget"] == b for r in sub)]
    budgets += sorted({r["budget"] for r in sub} - set(budgets) - {NO_BUDGET})
    order = [p for p in SWEEP_POLICIES if any(r["policy"] == p for r in sub)]
    any_row = sub[0]
    checked = "(checked)" if all(r["saved_bytes_match"] for r in sub) \
        else "(NOT all equal: see JSON)"
    return [f"### {model} on {data}", "",
            f"{any_row['resolution']}x{any_row['resolution']}, {any_row['train_size']} "
            f"training / {any_row['eval_size']} test images, {any_row['epochs']} epochs, "
            f"preset {any_row['preset']}; top-1 test accuracy % after the last epoch, "
            f"mean ± sample std over seeds (n = number of seeds); in brackets the "
            f"learning rate.", "",
            _accuracy_table(sub, budgets, order), "",
            "Memory and compute per budget (mean over policies' seeds; classifier excluded "
            "from units and sparsities; saved bytes = measured bytes autograd keeps for "
            f"backward at batch 32, which equal the cost model's in every run {checked}):", "",
            _memory_table(sub, order), ""] + _tracking_section(sub, order)


def _tracking_section(sub: list[dict], order: list[str]) -> list[str]:
    """Coverage and the Eq. 9 cosines of tracked runs (track_updates), per policy and budget."""
    tracked = sorted((r for r in sub if "coverage_final" in r),
                     key=lambda r: (order.index(r["policy"]), r["budget"]))
    if not tracked:
        return []
    return ["Over the top-K pool's layers, mean over seeds: coverage = share of the pool's "
            "channels trained in at least one epoch by the end; cosine of the epoch-summed "
            "sparse update with the epoch-summed full gradient, averaged over epochs, and of the "
            "sums over the whole run:", "",
            markdown_table(["policy", "budget", "coverage %", "mean epoch cosine",
                            "whole-run cosine"],
                           [[r["policy"], r["budget"], pct(r["coverage_final"]),
                             f"{r['cosine_epoch_mean']:.3f}", f"{r['cosine_cum_final']:.3f}"]
                            for r in tracked]), ""]


def _diff(c: dict) -> str:
    return f"{100 * c['diff']['mean']:+.1f} ± {100 * c['diff']['std']:.1f}"


def _interval(c: dict) -> str:
    """The t interval and the sign test's p of a comparison (older summaries lack them)."""
    st = c.get("stats")
    if not st or st["ci_low"] is None:
        return "-"
    return (f"[{100 * st['ci_low']:+.1f}, {100 * st['ci_high']:+.1f}]; "
            f"p = {st['sign_test_p']:.3g}")


_CI_NOTE = ("Interval: mean ± t(0.975, n − 1) · std / √n over the n paired differences; "
            "sign test: two-sided exact binomial test of wins against losses (ties dropped).")


def format_markdown(summary: dict) -> str:
    """Tables per (model, data): policies x budgets, mean ± std (over seeds) top-1 %."""
    rows = summary["rows"]
    lines = []
    for model, data in sorted({(r["model"], r["data"]) for r in rows}):
        sub = [r for r in rows if r["model"] == model and r["data"] == data]
        lines += _model_data_section(sub, model, data)
    comps = [c for c in summary["comparisons"] if c["diff"].get("n")]
    if summary["comparisons"]:
        lines += ["### Paired differences (same seed), accuracy points", "",
                  f"{_CI_NOTE}", "", markdown_table(
            ["model", "data", "budget", "comparison", "mean diff ± std", "95% t interval; sign test",
             "wins / seeds"],
            [[c["model"], c["data"], c["budget"], f"{c['a']} − {c['b']}", _diff(c),
              _interval(c), f"{c['wins']} / {c['diff']['n']}"] for c in comps]), ""]
    pooled = summary.get("pooled") or []
    if pooled:
        lines += ["### Paired differences pooled over data sets and budgets, accuracy points",
                  "", markdown_table(
                      ["comparison", "model", "mean diff ± std", "95% t interval; sign test",
                       "wins / losses / pairs"],
                      [[f"{c['a']} − {c['b']}", c["model"], _diff(c), _interval(c),
                        f"{c['wins']} / {c['losses']} / {c['diff']['n']}"] for c in pooled]), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------- learning rates

def choose_lrs(records: list[dict]) -> dict:
    """Per (model, policy): the grid rate with the best validation accuracy, averaged over
    data sets (and seeds); ties go to the smaller rate. Reads only the config, settings,
    data and final parts of the record dicts (so partial records do)."""
    table: dict[tuple, dict[float, list[float]]] = {}
    per_data: dict[tuple, dict] = {}
    for r in records:
        if r["settings"]["lr_source"] != "given (--lr)" or r["data"]["eval_split"] != "val":
            continue
        model, policy = r["config"]["model"], get_policy(r["config"]["policy"]).name
        lr = r["settings"]["lr"]
        table.setdefault((model, policy), {}).setdefault(lr, []).append(r["final"]["eval_accuracy"])
        per_data.setdefault((model, policy), {}).setdefault(r["config"]["data"], {})[str(lr)] = \
            r["final"]["eval_accuracy"]
    chosen: dict[str, dict[str, float]] = {}
    detail = []
    for (model, policy), by_lr in sorted(table.items()):
        means = {lr: statistics.fmean(v) for lr, v in by_lr.items()}
        best = max(sorted(means), key=lambda lr: (round(means[lr], 12), -lr))
        chosen.setdefault(model, {})[policy] = best
        detail.append({"model": model, "policy": policy, "chosen": best,
                       "mean_val_accuracy": {str(k): v for k, v in sorted(means.items())},
                       "val_accuracy_per_data": per_data[(model, policy)]})
    return {"chosen": chosen, "detail": detail}


# ------------------------------------------------------------------------- command line

def _common(parser: argparse.ArgumentParser) -> None:
    from .models import MODEL_NAMES
    parser.add_argument("--models", nargs="+", default=["mcunet-in1", "efficientnet-lite0"],
                        choices=MODEL_NAMES, metavar="NAME",
                        help=f"backbones (default mcunet-in1 efficientnet-lite0; allowed: "
                        f"{', '.join(MODEL_NAMES)})")
    parser.add_argument("--data", nargs="+", default=["digits", "fashion-mnist"], metavar="NAME",
                        help="data sets (default digits fashion-mnist; any name trady-finetune "
                        "accepts)")
    parser.add_argument("--policies", nargs="+", default=list(SWEEP_POLICIES),
                        choices=tuple(POLICIES) + ("trady",), metavar="NAME",
                        help="policies (default: all 8: " + " ".join(SWEEP_POLICIES) + ")")
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=tuple(PRESETS),
                        help=f"training preset (default {DEFAULT_PRESET})")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per run (default 1: steadier on a shared CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    over = parser.add_argument_group("overrides of the preset (smoke runs)")
    for flag, what in (("--epochs", "epochs"), ("--resolution", "input size"),
                       ("--train-subset", "training images"), ("--test-subset", "test images"),
                       ("--val-subset", "validation images (tune-lr)"),
                       ("--max-batches", "batches per epoch"),
                       ("--score-batches", "batches the DetRGN oracles score on"),
                       ("--warmup-epochs", "warm-up epochs (default: the preset's, at most "
                        "epochs - 1)")):
        over.add_argument(flag, type=int, help=f"{what} (default: the preset's)")
    over.add_argument("--eval-every", type=int, metavar="N",
                      help="evaluate every N epochs and after the last (default: every epoch)")
    over.add_argument("--track-updates", action="store_true",
                      help="record per epoch the top-K pool's coverage and the cosine of the "
                      "epoch-summed sparse update with the epoch-summed full gradient (Eq. 9; "
                      "one extra forward and backward per step, docs/EXPERIMENTS.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sweeps of trady-finetune runs: policies x budgets x seeds (sweep), a "
        "learning-rate search on a validation split (tune-lr), and the summary table "
        "(summarize). Sweeps are resumable: re-running the same command skips finished runs "
        "and resumes interrupted ones from their checkpoints.",
        epilog=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="command", required=True)

    sweep = sub.add_parser("sweep", help="run policies x budgets x seeds (one JSON per run)",
                           description="Run every (model, data, policy, budget, seed); "
                           "classifier-only and full once per seed.")
    _common(sweep)
    sweep.add_argument("--budgets", nargs="+", default=list(BUDGET_LEVELS),
                       help="budgets as trady-finetune --budget takes them (default small medium "
                       "large: the paper's keep ratios 2.23%% / 5.32%% / 7.48%% at the fast "
                       "preset's resolution)")
    sweep.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                       help="seeds (default 0 1 2)")
    sweep.add_argument("--lr", type=float,
                       help="one learning rate for every policy (a control run; default: the "
                       "preset's per-policy rates)")
    sweep.add_argument("--lrs-from", nargs="+", metavar="JSON",
                       help="per-policy learning rates from tune-lr --json files (their "
                       "'chosen' {model: {policy: lr}}; later files win); default: the preset's")
    sweep.add_argument("--out", default="runs/sweep", help="root folder of the runs")
    sweep.add_argument("--summary", action="store_true",
                       help="print the summary table when done")

    tune = sub.add_parser("tune-lr", help="choose per-policy learning rates on a validation split",
                          description="Run each (model, data, policy, lr) once on a validation "
                          "split held out of the training split (never the test split) and pick "
                          "per (model, policy) the rate with the best mean validation accuracy "
                          "over the data sets.")
    _common(tune)
    tune.add_argument("--grid", nargs="+", type=float, default=[0.005, 0.01, 0.02, 0.05],
                      help="learning rates tried (default 0.005 0.01 0.02 0.05)")
    tune.add_argument("--budget", default="medium", help="budget of the search (default medium)")
    tune.add_argument("--seed", type=int, default=0, help="seed of the search (default 0)")
    tune.add_argument("--out", default="runs/lr-search", help="root folder of the runs")
    tune.add_argument("--json", help="write the chosen rates and the search's figures here")

    summ = sub.add_parser("summarize", help="mean and spread over seeds, as Markdown and JSON")
    summ.add_argument("root", help="a sweep's --out folder")
    summ.add_argument("--markdown", help="write the Markdown tables here (default: print)")
    summ.add_argument("--json", help="write the summary JSON here")
    summ.add_argument("--runs-jsonl", help="write one compact JSON line per run here")
    return parser


def load_chosen_lrs(paths: list[str]) -> dict[str, dict[str, float]]:
    """The ``chosen`` rates of tune-lr JSON files, merged (later files win)."""
    chosen: dict[str, dict[str, float]] = {}
    for path in paths:
        try:
            table = json.loads(Path(path).read_text())["chosen"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"--lrs-from {path}: not a tune-lr --json file ({error})") from None
        for model, rates in table.items():
            chosen.setdefault(model, {}).update(rates)
    return chosen


def with_chosen_lrs(jobs: list[Job], chosen: dict[str, dict[str, float]]) -> list[Job]:
    """Each job with its (model, policy)'s chosen rate; ValueError naming a missing one."""
    missing = sorted({(j.model, j.policy) for j in jobs
                      if j.policy not in chosen.get(j.model, {})})
    if missing:
        raise ValueError(f"--lrs-from: no chosen rate for (model, policy) {missing}; the files "
                         f"have {({m: sorted(r) for m, r in chosen.items()})}")
    return [dataclasses.replace(j, lr=chosen[j.model][j.policy]) for j in jobs]


def _write(path: str, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def _summarize(args) -> int:
    """The summarize command: Markdown tables, the summary JSON and one line per run."""
    records = load_records(Path(args.root))
    if not records:
        print(f"{PROG}: error: no complete run records under {args.root}", file=sys.stderr)
        return 1
    summary = summarize_records(records)
    summary["source"] = str(args.root)
    text = format_markdown(summary)
    if args.json:
        _write(args.json, json.dumps(summary, indent=1) + "\n")
    if args.runs_jsonl:
        _write(args.runs_jsonl, "".join(json.dumps(compact_record(r), sort_keys=True) + "\n"
                                        for r in records))
    if args.markdown:
        _write(args.markdown, text + "\n")
    else:
        print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compressed"]:      # its own options: compressed_experiment.build_parser
        from .compressed_experiment import main as compressed_main
        return compressed_main(argv[1:])
    args = build_parser().parse_args(argv)
    command = f"{PROG} " + shlex.join(argv)
    if args.command == "summarize":
        return _summarize(args)
    progress.set_quiet(args.quiet)
    from .config import RunConfig, UsageError, resolve
    try:       # every (model, data, budget) through the runs' own check, before the first run
        budgets = args.budgets if args.command == "sweep" else [args.budget]
        for model in args.models:
            for data in args.data:
                for budget in budgets:
                    resolve(RunConfig(model=model, data=data, budget=budget, preset=args.preset))
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2

    def log(message: str) -> None:
        print(message, flush=True)

    extra = {key: getattr(args, key) for key in ("epochs", "resolution", "train_subset",
                                                 "test_subset", "val_subset", "max_batches",
                                                 "score_batches", "warmup_epochs", "eval_every")
             if getattr(args, key) is not None}
    if args.track_updates:
        extra["track_updates"] = True
    if "epochs" in extra and "warmup_epochs" not in extra:
        extra["warmup_epochs"] = min(PRESETS[args.preset].warmup_epochs, extra["epochs"] - 1)

    started = time.perf_counter()
    try:
        if args.command == "sweep":
            jobs = plan(args.models, args.data, args.policies, args.budgets, args.seeds,
                        lrs=(args.lr,))
            if args.lrs_from:
                try:
                    jobs = with_chosen_lrs(jobs, load_chosen_lrs(args.lrs_from))
                except ValueError as error:
                    print(f"{PROG}: error: {error}", file=sys.stderr)
                    return 2
            log(f"{PROG}: {len(jobs)} runs into {args.out} ({command})")
            counts = run_jobs(jobs, Path(args.out), preset=args.preset, threads=args.threads,
                              extra=extra, log=log, command=command)
        else:
            jobs = plan(args.models, args.data, args.policies, [args.budget], [args.seed],
                        lrs=args.grid)
            log(f"{PROG}: {len(jobs)} runs into {args.out} ({command})")
            counts = run_jobs(jobs, Path(args.out), preset=args.preset, threads=args.threads,
                              eval_on="val", extra=extra, log=log, command=command)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; re-run the same command to continue", file=sys.stderr)
        return 130
    log(f"{PROG}: {counts['run']} run, {counts['skipped']} already done, {counts['failed']} "
        f"failed, {time.perf_counter() - started:.0f}s")
    if args.command == "tune-lr":
        chosen = choose_lrs(load_records(Path(args.out)))
        chosen.update({"command": command, "grid": args.grid, "budget": args.budget,
                       "seed": args.seed, "preset": args.preset})
        text = json.dumps(chosen, indent=1)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(text + "\n")
        log(json.dumps(chosen["chosen"], indent=1))
    elif args.summary:
        print(format_markdown(summarize_records(load_records(Path(args.out)))))
    return 1 if counts["failed"] else 0


if __name__ == "__main__":   # pragma: no cover
    sys.exit(main())
