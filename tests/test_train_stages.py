"""finetune's stages: a resumed run continues the LambdaLR schedule where it stopped, also
from a checkpoint written before the schedule was a LambdaLR (no ``initial_lr`` saved)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore:no layer ranking")

try:
    from ._requirements import require_module
except ImportError:  # tests/ is not a package
    from _requirements import require_module

from trady_triton import train as T

TINY = dict(model="mbv2-w0.35-arch", data="digits", resolution=32, batch_size=8,
            train_subset=40, test_subset=16, max_batches=3, epochs=3, warmup_epochs=1,
            policy="d-topk", budget="0.05", lr=0.04)


@pytest.fixture(autouse=True)
def _needs_sklearn():
    require_module("sklearn", "pip install scikit-learn")


def _schedule(record: dict) -> list[tuple[float, float]]:
    return [(e["lr_start"], e["lr_end"]) for e in record["epochs"]]


def _drop_initial_lr(path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group.pop("initial_lr", None)
    torch.save(state, path)


@pytest.mark.parametrize("old_checkpoint", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["checkpoint", "pre-lambdalr"])
def test_resumed_schedule_equals_the_uninterrupted_one(tmp_path, old_checkpoint):
    straight = T.finetune(T.RunConfig(**TINY), tmp_path / "straight")
    T.finetune(T.RunConfig(**TINY, max_epochs_this_call=1), tmp_path / "split")
    if old_checkpoint:
        _drop_initial_lr(tmp_path / "split" / T.CHECKPOINT_FILE)
    resumed = T.finetune(T.RunConfig(**TINY), tmp_path / "split", resume=True)
    assert _schedule(resumed) == _schedule(straight)
    steps = straight["epochs"][0]["train_steps"]
    assert straight["epochs"][0]["lr_start"] == pytest.approx(0.04 / steps)   # warm-up
    assert straight["epochs"][1]["lr_start"] == pytest.approx(0.04)          # its peak
    assert [e["train_loss"] for e in resumed["epochs"]] == \
        pytest.approx([e["train_loss"] for e in straight["epochs"]], rel=1e-4, abs=1e-6)


def test_evaluation_runs_in_training_sized_batches(tmp_path, monkeypatch):
    """Evaluating in bigger batches would raise the run's peak above training's and meet
    conv shapes whose fastest CPU form is not timed yet."""
    sizes = []
    real_evaluate = T.evaluate

    def recording_evaluate(model, images, labels, batch_size=256, desc="evaluate"):
        sizes.append(batch_size)
        return real_evaluate(model, images, labels, batch_size=batch_size, desc=desc)
    monkeypatch.setattr(T, "evaluate", recording_evaluate)
    record = T.finetune(T.RunConfig(**{**TINY, "epochs": 1, "warmup_epochs": 0}),
                        tmp_path / "run")
    assert sizes == [TINY["batch_size"]]
    assert 0.0 <= record["epochs"][0]["eval_accuracy"] <= 1.0
