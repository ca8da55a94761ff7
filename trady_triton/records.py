"""Typed run records: one fine-tuning run and its epochs, as written to ``record.json``.

``RunRecord.to_dict()`` gives the JSON layout the committed results were made with (the
same keys in the same order; optional keys only when set) and ``RunRecord.from_dict``
reads it back, so train.py, experiments.py and the summaries share one definition of
what a record holds instead of string keys spread over three modules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .config import RunConfig, Settings

RECORD_FORMAT = "trady-finetune-record"
RECORD_VERSION = 1


class _Section:
    """A record part written as its dataclass fields, in declaration order."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class EpochRecord(_Section):
    """One finished epoch: learning rate, loss and accuracy, the draw, sparsities, bytes, time."""

    epoch: int
    lr_start: float
    lr_end: float
    train_loss: float | None        # None: not finite (diverged)
    train_accuracy: float
    eval_loss: float | None
    eval_accuracy: float | None     # None: not evaluated this epoch (eval_every)
    eval_split: str
    channels_drawn: int
    layers_trained: int
    channels_per_layer: dict
    draw_digest: str
    selected_units: int
    budget_units: int | None
    weight_sparsity: float
    activation_sparsity: float
    weight_grad_flops_saved: float
    saved_bytes_measured: int | None
    saved_bytes_model: dict         # the cost model's figures: total, activations, masks ...
    saved_bytes_batch: int
    saved_bytes_match: bool
    train_samples: int
    train_steps: int
    score_s: float
    train_s: float
    eval_s: float
    wall_s: float
    update_tracking: dict | None = None     # track_updates: coverage and the Eq. 9 cosine

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if out["update_tracking"] is None:      # absent from records that never tracked
            del out["update_tracking"]
        return out


@dataclass
class ModelFacts(_Section):
    """The converted backbone: its layers, memory units, budget and the ranking it used."""

    name: str
    weights: str | None
    num_classes: int
    convertible_layers: int
    full_units: int
    budget_units: int | None
    budget_fraction: float | None
    pool_layers: int
    ranking: dict                   # source, key, steps, meta, coverage, top_k


@dataclass
class DataFacts(_Section):
    """The data set as the run saw it: sizes, split, normalisation, load time."""

    name: str
    resolution: int
    train_size: int
    eval_split: str
    eval_size: int
    num_classes: int
    mean: list
    std: list
    data_seed: int
    load_s: float


@dataclass
class MemoryFacts(_Section):
    """Bytes saved for backward by full fine-tuning, measured in plain PyTorch and modelled."""

    batch: int
    plain_full_finetune_measured_bytes: int
    trady_full_analytic_bytes: int


@dataclass
class RunSummary:
    """The final figures of a run (only ``epochs_done`` when no epoch finished)."""

    epochs_done: int
    eval_accuracy: float | None = None
    eval_split: str | None = None
    best_eval_accuracy: float | None = None
    train_loss: float | None = None
    saved_bytes_measured: int | None = None
    saved_bytes_model: int | None = None
    saved_bytes_match_all_epochs: bool | None = None
    plain_full_finetune_measured_bytes: int | None = None
    mean_weight_sparsity: float | None = None
    mean_activation_sparsity: float | None = None
    mean_weight_grad_flops_saved: float | None = None
    wall_s: float | None = None
    diverged: bool | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) if self.epochs_done else {"epochs_done": 0}


# keys written only when set (absent from records that never needed them)
_OPTIONAL = ("resumed_from_epoch", "previous_wall_s", "wall_s")


@dataclass
class RunRecord:
    """One run: what was asked, what it resolved to, the model/data/memory facts, the epochs."""

    status: str                     # running, stopped, interrupted, complete
    command: str | None
    config: RunConfig
    settings: Settings
    model: ModelFacts
    data: DataFacts
    memory: MemoryFacts
    environment: dict               # versions, platform, threads
    epochs: list[EpochRecord] = field(default_factory=list)
    final: RunSummary | None = None     # summarize(record) once the run stops
    resumed_from_epoch: int | None = None
    previous_wall_s: float | None = None
    wall_s: float | None = None
    format: str = RECORD_FORMAT
    version: int = RECORD_VERSION

    def to_dict(self) -> dict:
        out = {"format": self.format, "version": self.version, "status": self.status,
               "command": self.command, "config": self.config.as_dict(),
               "settings": self.settings.as_dict(), "model": self.model.to_dict(),
               "data": self.data.to_dict(), "memory": self.memory.to_dict(),
               "environment": self.environment, "epochs": [e.to_dict() for e in self.epochs],
               "final": None if self.final is None else self.final.to_dict()}
        out.update({k: getattr(self, k) for k in _OPTIONAL if getattr(self, k) is not None})
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RunRecord":
        if data.get("format") != RECORD_FORMAT:
            raise ValueError(f"not a {RECORD_FORMAT} (format={data.get('format')!r})")
        values = _known(cls, data, "record")
        values["config"] = RunConfig(**_known(RunConfig, data["config"], "config"))
        values["settings"] = Settings(**_known(Settings, data["settings"], "settings"))
        for name, kind in (("model", ModelFacts), ("data", DataFacts), ("memory", MemoryFacts)):
            values[name] = kind(**_known(kind, data[name], name))
        values["epochs"] = [EpochRecord(**_known(EpochRecord, e, "epoch")) for e in data["epochs"]]
        if data.get("final") is not None:
            values["final"] = RunSummary(**_known(RunSummary, data["final"], "final"))
        return cls(**values)

    @classmethod
    def coerce(cls, record: "RunRecord | dict") -> "RunRecord":
        """The typed record, from a typed one or from its JSON dict."""
        return record if isinstance(record, cls) else cls.from_dict(record)

    @property
    def total_wall_s(self) -> float:
        """Wall time over every call that ran this record (resumptions included)."""
        return (self.wall_s or 0.0) + (self.previous_wall_s or 0.0)


def _known(cls, data: dict, what: str) -> dict:
    """``data`` as keyword arguments of dataclass ``cls``; a clear error for unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{what} of a {RECORD_FORMAT} has unknown keys {unknown}; known: "
                         f"{', '.join(sorted(names))}")
    return dict(data)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def summarize(record: RunRecord) -> RunSummary:
    """The final figures of a run: last and best accuracy, bytes, mean sparsities, time."""
    epochs = record.epochs
    if not epochs:
        return RunSummary(epochs_done=0)
    last = epochs[-1]
    return RunSummary(
        epochs_done=len(epochs),
        eval_accuracy=last.eval_accuracy, eval_split=last.eval_split,
        best_eval_accuracy=max((e.eval_accuracy for e in epochs if e.eval_accuracy is not None),
                               default=None),
        train_loss=last.train_loss,
        saved_bytes_measured=last.saved_bytes_measured,
        saved_bytes_model=last.saved_bytes_model.get("total"),
        saved_bytes_match_all_epochs=all(e.saved_bytes_match for e in epochs),
        plain_full_finetune_measured_bytes=record.memory.plain_full_finetune_measured_bytes,
        mean_weight_sparsity=_mean(e.weight_sparsity for e in epochs),
        mean_activation_sparsity=_mean(e.activation_sparsity for e in epochs),
        mean_weight_grad_flops_saved=_mean(e.weight_grad_flops_saved for e in epochs),
        wall_s=round(record.total_wall_s, 3),
        diverged=any(e.train_loss is None for e in epochs),
    )
