"""trady-experiments summarize: paired differences with t intervals and sign tests, per data
set and pooled; sweeps with chosen rates, update tracking and evaluation only at the end."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore:no layer ranking")

try:
    from ._requirements import require_module
except ImportError:  # tests/ is not a package
    from _requirements import require_module

from trady_triton import experiments as E

stats = pytest.importorskip("scipy.stats")

TINY = ["--models", "mbv2-w0.35-arch", "--data", "digits", "--resolution", "32",
        "--train-subset", "32", "--test-subset", "16", "--epochs", "3", "--warmup-epochs", "1",
        "--max-batches", "1", "--quiet"]


def _sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test by enumeration (ties already dropped)."""
    n = wins + losses
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def test_paired_statistics_match_scipy_and_an_enumerated_sign_test():
    rng = np.random.default_rng(0)
    for n in (2, 5, 9):
        diffs = list(rng.normal(0.01, 0.02, n))
        got = E.paired_statistics(diffs)
        interval = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
        assert got["mean"] == pytest.approx(np.mean(diffs))
        assert got["std"] == pytest.approx(np.std(diffs, ddof=1))
        assert (got["ci_low"], got["ci_high"]) == pytest.approx((interval.low, interval.high))
        wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
        assert got["sign_test_p"] == pytest.approx(_sign_test_p(wins, losses))
    tied = E.paired_statistics([0.02, 0.0, 0.0, 0.03, -0.01])
    assert (tied["wins"], tied["losses"], tied["ties"]) == (2, 1, 2)
    assert tied["sign_test_p"] == pytest.approx(_sign_test_p(2, 1)) == 1.0
    assert E.paired_statistics([0.0, 0.0])["sign_test_p"] == 1.0
    one = E.paired_statistics([0.05])
    assert one["ci_low"] is None and one["std"] is None


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One real record of a tiny tracked sweep run (its per-epoch tracking included)."""
    require_module("sklearn", "pip install scikit-learn")
    root = tmp_path_factory.mktemp("tiny")
    lrs = root / "lrs.json"
    lrs.write_text(json.dumps({"chosen": {"mbv2-w0.35-arch": {"d-topk": 0.03}}}))
    assert E.main(["sweep", *TINY, "--policies", "d-topk", "--budgets", "0.05", "--seeds", "0",
                   "--eval-every", "2", "--track-updates", "--lrs-from", str(lrs),
                   "--out", str(root / "sweep")]) == 0
    (record,) = E.load_records(root / "sweep")
    return record


def test_sweep_tracks_updates_evaluates_at_the_chosen_epochs_and_uses_chosen_rates(template):
    assert template["settings"]["lr"] == 0.03
    assert template["config"]["track_updates"] and template["config"]["eval_every"] == 2
    accuracy = [e["eval_accuracy"] for e in template["epochs"]]
    assert accuracy[0] is None and accuracy[1] is not None and accuracy[2] is not None
    assert template["final"]["best_eval_accuracy"] == max(accuracy[1:])
    coverage = [e["update_tracking"]["coverage"] for e in template["epochs"]]
    assert coverage == sorted(coverage) and 0 < coverage[0] < coverage[-1] <= 1
    assert all(e["saved_bytes_match"] for e in template["epochs"])
    compact = E.compact_record(template)
    assert compact["coverage"] == coverage
    assert compact["eval_accuracy"] == accuracy


def test_chosen_rates_must_cover_every_model_and_policy(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"chosen": {"m": {"d-topk": 0.01, "s-topk": 0.02}}}))
    second.write_text(json.dumps({"chosen": {"m": {"s-topk": 0.05}}}))
    chosen = E.load_chosen_lrs([str(first), str(second)])
    assert chosen == {"m": {"d-topk": 0.01, "s-topk": 0.05}}
    jobs = E.with_chosen_lrs(E.plan(["m"], ["d"], ["d-topk", "s-topk"], ["small"], [0]), chosen)
    assert [j.lr for j in jobs] == [0.01, 0.05]
    with pytest.raises(ValueError, match="'m', 'd-fullrandom'"):
        E.with_chosen_lrs(E.plan(["m"], ["d"], ["d-fullrandom"], ["small"], [0]), chosen)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tune-lr"):
        E.load_chosen_lrs([str(tmp_path / "bad.json")])


def _synthetic(template: dict, accuracy: dict) -> list[dict]:
    """Copies of the template, one per (data, policy, seed), with the given final accuracy."""
    records = []
    for (data, policy, seed), acc in accuracy.items():
        r = copy.deepcopy(template)
        r["config"].update(data=data, policy=policy, seed=seed)
        r["final"]["eval_accuracy"] = acc
        for e in r["epochs"]:
            e["update_tracking"]["coverage"] = 0.5 if policy.startswith("s-") else 0.9
        records.append(r)
    return records


def test_summary_pairs_seeds_per_data_set_and_pooled(template):
    rng = np.random.default_rng(1)
    accuracy = {}
    for data, shift in (("fmnist", 0.02), ("mnist", -0.005)):
        for seed in range(6):
            base = rng.uniform(0.6, 0.8)
            accuracy[(data, "d-topk", seed)] = base + shift + rng.normal(0, 0.01)
            if seed != 5:                    # seed 5 of s-topk missing: it cannot be paired
                accuracy[(data, "s-topk", seed)] = base
    summary = E.summarize_records(_synthetic(template, accuracy))
    comps = {c["data"]: c for c in summary["comparisons"] if (c["a"], c["b"]) == ("d-topk", "s-topk")}
    pooled_diffs = []
    for data in ("fmnist", "mnist"):
        diffs = [accuracy[(data, "d-topk", s)] - accuracy[(data, "s-topk", s)] for s in range(5)]
        pooled_diffs += diffs
        got = comps[data]["stats"]
        interval = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
        assert got["n"] == 5 and comps[data]["seeds"] == list(range(5))
        assert got["mean"] == pytest.approx(np.mean(diffs))
        assert (got["ci_low"], got["ci_high"]) == pytest.approx((interval.low, interval.high))
        wins = sum(d > 0 for d in diffs)
        assert got["sign_test_p"] == pytest.approx(stats.binomtest(wins, 5).pvalue)
    (pooled,) = [p for p in summary["pooled"] if (p["a"], p["b"]) == ("d-topk", "s-topk")]
    interval = stats.ttest_1samp(pooled_diffs, 0.0).confidence_interval(0.95)
    assert pooled["stats"]["n"] == 10
    assert (pooled["stats"]["ci_low"], pooled["stats"]["ci_high"]) == pytest.approx(
        (interval.low, interval.high))
    rows = {(r["data"], r["policy"]): r for r in summary["rows"]}
    assert rows[("mnist", "s-topk")]["coverage_final"] == 0.5
    assert rows[("mnist", "d-topk")]["coverage_final"] == 0.9
    text = E.format_markdown(summary)
    low, high = comps["fmnist"]["stats"]["ci_low"], comps["fmnist"]["stats"]["ci_high"]
    assert f"[{100 * low:+.1f}, {100 * high:+.1f}]" in text
    assert "whole-run cosine" in text


def test_mean_curves_average_seeds_per_policy_and_skip_untracked_runs():
    lines = [{"model": "m", "data": "d", "policy": "d-topk", "budget": "b", "coverage": c}
             for c in ([0.1, 0.3, 0.5], [0.2, 0.4, 0.9])]
    lines.append({"model": "m", "data": "d", "policy": "s-topk", "budget": "b"})
    curves = E.mean_curves(lines, "coverage")
    assert list(curves) == [("m", "d", "d-topk", "b")]
    assert curves[("m", "d", "d-topk", "b")] == pytest.approx([0.15, 0.35, 0.7])
