"""The sweep runner: the plan, one JSON per run, resumability, the summary, the lr choice."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:no layer ranking")

try:
    from ._requirements import require_module
except ImportError:  # tests/ is not a package
    from _requirements import require_module

from trady_triton import experiments as E
from trady_triton import train as T

TINY = ["--models", "mbv2-w0.35-arch", "--data", "digits", "--resolution", "32",
        "--train-subset", "32", "--test-subset", "16", "--val-subset", "16", "--epochs", "1",
        "--max-batches", "1", "--quiet"]


def test_plan_runs_budget_free_policies_once_per_seed():
    jobs = E.plan(["m"], ["d"], E.SWEEP_POLICIES, ["small", "medium", "large"], [0, 1, 2])
    assert len(jobs) == 6 * 3 * 3 + 2 * 3
    assert len(set(jobs)) == len(jobs)
    budgetless = [j for j in jobs if j.policy in ("classifier-only", "full")]
    assert {j.budget for j in budgetless} == {E.NO_BUDGET}
    # seed-major: every run of seed 0 comes before any of seed 1
    seeds = [j.seed for j in jobs]
    assert seeds == sorted(seeds)
    full = E.plan(["a", "b"], ["x", "y"], E.SWEEP_POLICIES, ["small", "medium", "large"],
                  [0, 1, 2])
    assert len(full) == 4 * 60
    assert E.plan(["m"], ["d"], ["trady"], ["small"], [0])[0].policy == "d-topk"


def test_sweep_writes_one_json_per_run_resumes_and_summarizes(tmp_path, capsys):
    require_module("sklearn", "pip install scikit-learn")
    root = tmp_path / "sweep"
    args = ["sweep", *TINY, "--policies", "d-topk", "s-topk", "full", "--budgets", "0.05",
            "--seeds", "0", "1", "--out", str(root)]
    assert E.main(args) == 0
    records = sorted(root.rglob("record.json"))
    assert len(records) == 2 * 2 + 2
    assert not list(root.rglob("checkpoint.pt"))          # removed when a run completes
    out = capsys.readouterr().out
    assert "6 run, 0 already done, 0 failed" in out

    # resumable: a second call runs nothing
    assert E.main(args) == 0
    assert "0 run, 6 already done" in capsys.readouterr().out

    # an interrupted run (checkpoint after its first epoch) is resumed, not restarted
    job = E.Job("mbv2-w0.35-arch", "digits", "d-topk", "0.05", 2)
    T.finetune(T.RunConfig(model=job.model, data=job.data, policy=job.policy, budget="0.05",
                           seed=2, resolution=32, train_subset=32, test_subset=16, epochs=2,
                           warmup_epochs=0, max_batches=1, threads=1, max_epochs_this_call=1),
               job.path(root))
    counts = E.run_jobs([job], root, threads=1, log=lambda m: None,
                        extra=dict(resolution=32, train_subset=32, test_subset=16, epochs=2,
                                   warmup_epochs=0, max_batches=1))
    assert counts == {"run": 1, "skipped": 0, "failed": 0}
    record = json.loads((job.path(root) / "record.json").read_text())
    assert record["status"] == "complete" and record["resumed_from_epoch"] == 0

    md, js, jl = tmp_path / "table.md", tmp_path / "summary.json", tmp_path / "runs.jsonl"
    assert E.main(["summarize", str(root), "--markdown", str(md), "--json", str(js),
                   "--runs-jsonl", str(jl)]) == 0
    lines = [json.loads(line) for line in jl.read_text().splitlines()]
    assert len(lines) == 7 and all(len(line["eval_accuracy"]) >= 1 for line in lines)
    summary = json.loads(js.read_text())
    rows = {(r["policy"], r["budget"]): r for r in summary["rows"]}
    assert rows[("d-topk", "0.05")]["accuracy"]["n"] == 3
    assert rows[("s-topk", "0.05")]["accuracy"]["n"] == 2
    assert rows[("full", E.NO_BUDGET)]["budget_units"] is None
    for row in summary["rows"]:
        assert row["saved_bytes_match"]
        assert set(row["accuracy"]) == {"n", "mean", "std", "min", "max"}
    comparison = next(c for c in summary["comparisons"] if (c["a"], c["b"]) == ("d-topk", "s-topk"))
    assert comparison["seeds"] == [0, 1]
    pooled = next(c for c in summary["pooled"] if (c["a"], c["b"]) == ("d-topk", "s-topk"))
    assert pooled["diff"]["n"] == 2 and pooled["model"] == "mbv2-w0.35-arch"
    text = md.read_text()
    assert "| d-topk |" in text and "±" in text and "d-topk − s-topk" in text


def test_tune_lr_uses_the_validation_split_and_picks_per_policy(tmp_path, capsys):
    require_module("sklearn", "pip install scikit-learn")
    out = tmp_path / "lr.json"
    code = E.main(["tune-lr", *TINY, "--policies", "d-topk", "classifier-only", "--grid",
                   "0.01", "0.05", "--budget", "0.05", "--out", str(tmp_path / "runs"),
                   "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result["chosen"]["mbv2-w0.35-arch"]) == {"d-topk", "classifier-only"}
    assert all(lr in (0.01, 0.05) for lr in result["chosen"]["mbv2-w0.35-arch"].values())
    for record in E.load_records(tmp_path / "runs"):
        assert record["data"]["eval_split"] == "val"


def _fake(model, data, policy, lr, acc):
    return {"config": {"model": model, "data": data, "policy": policy},
            "settings": {"lr": lr, "lr_source": "given (--lr)"},
            "data": {"eval_split": "val"}, "final": {"eval_accuracy": acc}}


def test_choose_lrs_averages_over_data_sets_and_breaks_ties_low():
    records = [_fake("m", "a", "d-topk", 0.01, 0.8), _fake("m", "b", "d-topk", 0.01, 0.6),
               _fake("m", "a", "d-topk", 0.05, 0.9), _fake("m", "b", "d-topk", 0.05, 0.4),
               _fake("m", "a", "full", 0.01, 0.5), _fake("m", "a", "full", 0.05, 0.5)]
    chosen = E.choose_lrs(records)["chosen"]
    assert chosen == {"m": {"d-topk": 0.01, "full": 0.01}}
    # test-split records never choose a rate
    test_record = _fake("m", "a", "s-topk", 0.01, 1.0)
    test_record["data"]["eval_split"] = "test"
    assert "s-topk" not in E.choose_lrs([test_record]).get("chosen", {}).get("m", {})


def test_bad_sweep_options_are_rejected(capsys):
    assert E.main(["sweep", "--data", "imagenet-99", "--quiet"]) == 2
    assert "unknown data set" in capsys.readouterr().err
    assert E.main(["sweep", "--budgets", "7", "--quiet"]) == 2
    assert "allowed values" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        E.main(["sweep", "--policies", "magic"])


def test_pooled_paired_differences_per_model_and_over_models():
    def comp(model, data, budget, diffs):
        return {"model": model, "data": data, "budget": budget, "a": "d-topk", "b": "s-topk",
                "diffs": diffs}

    comps = [comp("m1", "digits", "small", [0.02, -0.01]), comp("m1", "fmnist", "large", [0.0]),
             comp("m2", "digits", "small", [0.03, 0.01, -0.02])]
    pooled = {c["model"]: c for c in E.pool_comparisons(comps)}
    assert set(pooled) == {"m1", "m2", "all"}
    assert pooled["m1"]["diff"]["n"] == 3 and pooled["m1"]["wins"] == 1
    assert pooled["m1"]["losses"] == 1                       # the 0.0 is a tie
    assert pooled["m2"]["diff"]["mean"] == pytest.approx(0.02 / 3)
    assert pooled["all"]["diff"]["n"] == 6 and pooled["all"]["wins"] == 3


def test_fast_preset_rates_are_the_committed_search_choices():
    """presets.FAST_LRS must be what docs/results/lr_search.json chose (edit both together)."""
    from pathlib import Path

    from trady_triton.presets import FAST_LRS

    search = Path(__file__).resolve().parents[1] / "docs" / "results" / "lr_search.json"
    chosen = json.loads(search.read_text())["chosen"]
    assert chosen, "no choices in lr_search.json"
    for model, rates in chosen.items():
        assert FAST_LRS[model] == rates, model
