"""Typed run records: a real run's JSON reads back into RunRecord and writes out unchanged."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:no layer ranking")

try:
    from ._requirements import require_module
except ImportError:  # tests/ is not a package
    from _requirements import require_module

from trady_triton import train as T
from trady_triton.records import EpochRecord, RunRecord, summarize

TINY = dict(model="mbv2-w0.35-arch", data="digits", resolution=32, batch_size=8,
            train_subset=40, test_subset=16, max_batches=2, epochs=2, warmup_epochs=1)


@pytest.fixture(scope="module")
def record_on_disk(tmp_path_factory):
    require_module("sklearn", "pip install scikit-learn")
    out = tmp_path_factory.mktemp("run")
    T.finetune(T.RunConfig(policy="d-fullrandom", budget="0.05", seed=3, **TINY), out)
    return json.loads((out / T.RECORD_FILE).read_text())


def test_record_round_trips_through_the_dataclasses(record_on_disk):
    typed = RunRecord.from_dict(record_on_disk)
    assert isinstance(typed.config, T.RunConfig) and isinstance(typed.settings, T.Settings)
    assert all(isinstance(e, EpochRecord) for e in typed.epochs) and len(typed.epochs) == 2
    assert typed.config.seed == 3 and typed.epochs[1].epoch == 1
    again = typed.to_dict()
    assert again == record_on_disk
    assert list(again) == list(record_on_disk)            # the same key order on disk
    assert "resumed_from_epoch" not in again              # optional keys only when set


def test_summarize_of_the_typed_record_is_the_written_final(record_on_disk):
    typed = RunRecord.from_dict(record_on_disk)
    assert summarize(typed).to_dict() == record_on_disk["final"]
    assert summarize(typed) == typed.final
    accuracies = [e["eval_accuracy"] for e in record_on_disk["epochs"]]
    assert summarize(typed).best_eval_accuracy == max(accuracies)
    typed.epochs = []
    assert summarize(typed).to_dict() == {"epochs_done": 0}


def test_unknown_or_foreign_records_are_refused_with_the_reason(record_on_disk):
    with pytest.raises(ValueError, match="not a trady-finetune-record"):
        RunRecord.from_dict({**record_on_disk, "format": "something-else"})
    bad_epoch = {**record_on_disk["epochs"][0], "mystery": 1}
    with pytest.raises(ValueError, match=r"epoch of a trady-finetune-record has unknown keys "
                                         r"\['mystery'\]"):
        RunRecord.from_dict({**record_on_disk, "epochs": [bad_epoch]})
    with pytest.raises(ValueError, match=r"config .* unknown keys \['colour'\]"):
        RunRecord.from_dict({**record_on_disk,
                             "config": {**record_on_disk["config"], "colour": "red"}})


def test_the_table_reads_the_typed_and_the_dict_record_alike(record_on_disk):
    text = T.format_record(record_on_disk)
    assert text == T.format_record(RunRecord.from_dict(record_on_disk))
    assert "policy d-fullrandom" in text and text.count("\n    2 ") == 1
