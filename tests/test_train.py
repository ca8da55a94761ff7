"""The fine-tuning loop: schedule, records, measured bytes, checkpoints, resume, Ctrl-C.

Runs use the random-init "mbv2-w0.35-arch" (no weight file needed) on scikit-learn's digits
at 32x32, one or two epochs of a few batches; the paper's MCUNet-in1 is used where the
shared weights are present (skipped locally without them, failing under CI=true).
"""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:no layer ranking")
import torch

try:
    from ._requirements import require_file, require_module
except ImportError:  # tests/ is not a package
    from _requirements import require_file, require_module

from trady_triton import train as T
from trady_triton.presets import KEEP_RATIOS, budget_for_level, parse_budget

TINY = dict(model="mbv2-w0.35-arch", data="digits", resolution=32, batch_size=8,
            train_subset=48, test_subset=24, max_batches=3, epochs=1, warmup_epochs=0)


@pytest.fixture(autouse=True)
def _needs_sklearn():
    require_module("sklearn", "pip install scikit-learn")


def tiny(**changes) -> T.RunConfig:
    return T.RunConfig(**{**TINY, **changes})


# ----------------------------------------------------------------------- pure functions

def test_lr_schedule_warmup_then_cosine_to_zero():
    base, total, warm = 0.1, 100, 10
    lrs = [T.lr_at(s, total, warm, base) for s in range(total)]
    assert lrs[0] == pytest.approx(base / warm)
    assert lrs[warm - 1] == pytest.approx(base)
    assert lrs[warm] == pytest.approx(base)                     # cosine starts at the peak
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))   # then decays
    assert lrs[-1] < base * 1e-3
    assert T.lr_at(total, total, warm, base) == pytest.approx(0.0, abs=1e-12)
    assert T.lr_at(0, 10, 0, base) == pytest.approx(base)      # no warm-up


def test_epoch_batches_depend_only_on_seed_and_epoch():
    a = T.epoch_batches(50, 8, seed=3, epoch=2)
    b = T.epoch_batches(50, 8, seed=3, epoch=2)
    c = T.epoch_batches(50, 8, seed=3, epoch=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert sorted(torch.cat(a).tolist()) == list(range(50))
    assert len(T.epoch_batches(50, 8, 0, 0, max_batches=2)) == 2


def test_budget_parsing_and_levels():
    assert parse_budget("small") == {"level": "small"}
    assert parse_budget("0.05") == {"keep_ratio": 0.05}
    assert parse_budget("5%") == {"keep_ratio": pytest.approx(0.05)}
    assert parse_budget("15936u") == {"budget_units": 15936}
    assert parse_budget("15,936 units") == {"budget_units": 15936}
    for bad in ("0", "-1", "1.5", "abc", "0%", "150%", "nan", "1.5u", ""):
        with pytest.raises(ValueError, match="allowed values"):
            parse_budget(bad)
    # the paper's absolute budgets for MCUNet-in1 at 128x128, its keep ratios elsewhere
    assert budget_for_level("small", "mcunet-in1", 128) == {"budget_units": 15936}
    assert budget_for_level("large", "mcunet-in1", 128) == {"budget_units": 112640}
    assert budget_for_level("medium", "mcunet-in1", 40) == {"keep_ratio": KEEP_RATIOS[1]}
    assert [round(100 * r, 2) for r in KEEP_RATIOS] == [2.23, 5.32, 7.48]


@pytest.mark.parametrize("field,value,match", [
    ("policy", "topk-please", "allowed values"),
    ("data", "cifar-1000", "unknown data set"),
    ("budget", "2.0", "allowed values"),
    ("budget", "-3%", "allowed values"),
    ("model", "resnet-9000", "unknown model"),
    ("preset", "slow", "allowed values"),
    ("eval_on", "train", "allowed values"),
])
def test_resolve_rejects_bad_values(field, value, match):
    with pytest.raises(T.UsageError, match=match):
        T.resolve(tiny(**{field: value}))


def test_fast_preset_has_per_policy_rates_and_paper_preset_the_papers():
    fast = T.resolve(T.RunConfig(model="mcunet-in1", policy="full"))
    assert fast.preset == "fast" and "per-policy" in fast.lr_source
    paper = T.resolve(T.RunConfig(model="mcunet-in1", preset="paper", budget="small"))
    assert (paper.lr, paper.epochs, paper.warmup_epochs, paper.batch_size, paper.resolution) == \
        (0.125, 50, 5, 32, 128)
    assert paper.budget == {"budget_units": 15936} and paper.momentum == 0.0
    assert T.resolve(tiny(lr=0.3)).lr_source == "given (--lr)"


# ----------------------------------------------------------------------- whole runs

def _check_record(record: dict, epochs: int) -> None:
    assert record["format"] == T.RECORD_FORMAT and record["status"] == "complete"
    assert len(record["epochs"]) == epochs
    for key in ("config", "settings", "model", "data", "memory", "environment", "final"):
        assert key in record
    for entry in record["epochs"]:
        for key in ("train_loss", "eval_accuracy", "channels_drawn", "layers_trained",
                    "activation_sparsity", "weight_sparsity", "weight_grad_flops_saved",
                    "saved_bytes_measured", "saved_bytes_model", "wall_s", "lr_start",
                    "draw_digest", "channels_per_layer", "selected_units"):
            assert key in entry, key
        assert 0.0 <= entry["eval_accuracy"] <= 1.0
        assert math.isfinite(entry["train_loss"])
        # what autograd really kept for backward == the cost model, byte for byte
        assert entry["saved_bytes_measured"] == entry["saved_bytes_model"]["total"] > 0
        assert entry["saved_bytes_match"] is True
        assert entry["saved_bytes_measured"] < record["memory"]["plain_full_finetune_measured_bytes"]
    json.dumps(record, allow_nan=False)   # strict JSON


def test_trady_run_record_fields_and_measured_bytes(tmp_path):
    record = T.finetune(tiny(policy="d-topk", budget="0.05", epochs=2), tmp_path)
    _check_record(record, 2)
    on_disk = json.loads((tmp_path / "record.json").read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert "policy d-topk" in (tmp_path / "table.txt").read_text()
    e = record["epochs"][0]
    assert e["selected_units"] <= record["model"]["budget_units"]
    assert e["activation_sparsity"] > 0.8 and e["weight_sparsity"] > 0.8
    assert e["weight_grad_flops_saved"] > 0.8
    # dynamic: re-drawn each epoch
    assert record["epochs"][0]["draw_digest"] != record["epochs"][1]["draw_digest"]
    assert record["final"]["saved_bytes_match_all_epochs"]


def test_measured_bytes_equal_controller_saved_bytes(tmp_path, monkeypatch):
    """The record's figure is controller.saved_bytes(batch)['total'] for the measured batch."""
    seen = []
    original = T.train_one_epoch

    def spy(model, controller, *args, **kwargs):
        result = original(model, controller, *args, **kwargs)
        seen.append((result["measured_bytes"], controller.saved_bytes(result["measured_batch"])))
        return result

    monkeypatch.setattr(T, "train_one_epoch", spy)
    record = T.finetune(tiny(policy="s-fullrandom", budget="medium"), tmp_path)
    measured, analytic = seen[0]
    assert measured == analytic["total"] == record["epochs"][0]["saved_bytes_measured"]
    assert record["epochs"][0]["saved_bytes_batch"] == TINY["batch_size"]


@pytest.mark.parametrize("policy", ["s-topk", "s-detrgn", "d-detrgn", "classifier-only", "full"])
def test_other_policies_run(tmp_path, policy):
    record = T.finetune(tiny(policy=policy, budget="0.05", epochs=2, score_batches=1), tmp_path)
    _check_record(record, 2)
    digests = [e["draw_digest"] for e in record["epochs"]]
    if policy in ("s-topk", "s-detrgn", "classifier-only", "full"):
        assert digests[0] == digests[1]           # static: drawn once
    if policy.endswith("detrgn"):
        scored = [e["score_s"] > 0 for e in record["epochs"]]
        assert scored == ([True, True] if policy == "d-detrgn" else [True, False])
    if policy == "classifier-only":
        assert record["epochs"][0]["channels_drawn"] == 0
        assert record["epochs"][0]["activation_sparsity"] == 1.0
    if policy == "full":
        assert record["epochs"][0]["activation_sparsity"] == 0.0
        assert record["model"]["budget_units"] is None


def test_checkpoint_loads_with_weights_only(tmp_path):
    T.finetune(tiny(policy="d-topk", budget="0.05", epochs=2, max_epochs_this_call=1), tmp_path)
    state = torch.load(tmp_path / T.CHECKPOINT_FILE, weights_only=True)
    assert state["epoch"] == 0
    for key in ("model", "optimizer", "controller", "rng", "config_json", "record_json"):
        assert key in state
    assert state["controller"]["policy"] == "d-topk"
    assert isinstance(state["rng"]["torch"], torch.Tensor)


@pytest.mark.parametrize("policy", ["d-topk", pytest.param("d-detrgn", marks=pytest.mark.slow)])
def test_resume_continues_with_the_same_draws(tmp_path, policy):
    config = tiny(policy=policy, budget="0.05", epochs=3, score_batches=1)
    straight = T.finetune(config, tmp_path / "straight")

    stopped = T.finetune(tiny(policy=policy, budget="0.05", epochs=3, score_batches=1,
                              max_epochs_this_call=1), tmp_path / "split")
    assert stopped["status"] == "stopped" and len(stopped["epochs"]) == 1
    resumed = T.finetune(config, tmp_path / "split", resume=True)
    assert resumed["status"] == "complete" and resumed["resumed_from_epoch"] == 0
    assert [e["draw_digest"] for e in resumed["epochs"]] == \
        [e["draw_digest"] for e in straight["epochs"]]
    for a, b in zip(resumed["epochs"], straight["epochs"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4, abs=1e-6)
        assert a["eval_accuracy"] == pytest.approx(b["eval_accuracy"], abs=1 / 24 + 1e-9)


def test_resume_refuses_other_settings_and_missing_checkpoint(tmp_path):
    with pytest.raises(T.UsageError, match="no checkpoint"):
        T.finetune(tiny(), tmp_path / "nothing", resume=True)
    T.finetune(tiny(epochs=2, max_epochs_this_call=1, budget="0.05"), tmp_path / "a")
    with pytest.raises(T.UsageError, match="other settings"):
        T.finetune(tiny(epochs=2, budget="0.06"), tmp_path / "a", resume=True)


def test_ctrl_c_leaves_a_complete_record_of_finished_epochs(tmp_path):
    def interrupt(entry):
        if entry["epoch"] == 0:
            raise KeyboardInterrupt

    config = tiny(policy="d-topk", budget="0.05", epochs=2)
    with pytest.raises(KeyboardInterrupt):
        T.finetune(config, tmp_path, on_epoch_end=interrupt)
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["status"] == "interrupted"
    assert len(record["epochs"]) == 1 and record["final"]["epochs_done"] == 1
    assert (tmp_path / T.CHECKPOINT_FILE).is_file()
    resumed = T.finetune(config, tmp_path, resume=True)
    assert [e["epoch"] for e in resumed["epochs"]] == [0, 1]
    assert resumed["epochs"][0] == record["epochs"][0]


def test_budget_below_the_cheapest_channel_is_a_usage_error(tmp_path):
    with pytest.raises(T.UsageError, match="cheapest channel"):
        T.finetune(tiny(budget="1u"), tmp_path)


def test_validation_split_is_held_out_of_train(tmp_path):
    record = T.finetune(tiny(eval_on="val", val_subset=20), tmp_path)
    assert record["data"]["eval_split"] == "val"
    assert record["data"]["eval_size"] == pytest.approx(20, abs=5)
    assert record["data"]["train_size"] + record["data"]["eval_size"] == 48 + 20


def test_mcunet_in1_with_the_papers_weights(tmp_path):
    from trady_triton.models import tinyml_weights_path
    require_file(tinyml_weights_path("mcunet-in1"),
                 "the paper's MCUNet-in1 weights (mit-han-lab/tiny-training mcunet-5fps.pkl)")
    record = T.finetune(tiny(model="mcunet-in1", policy="d-topk", budget="small"), tmp_path)
    _check_record(record, 1)
    assert record["model"]["convertible_layers"] == 42
    assert record["model"]["ranking"]["source"] == "shipped"
    assert record["model"]["ranking"]["key"] == "mcunet-in1@32" or \
        record["model"]["ranking"]["key"] == "mcunet-in1"
