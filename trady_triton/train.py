"""The fine-tuning loop behind ``trady-finetune`` and ``trady-experiments``.

One run = one backbone, one data set, one policy, one budget, one seed:

    record = finetune(RunConfig(model="mcunet-in1", data="digits", policy="d-topk",
                                budget="small", seed=0), out_dir="runs/x")

Per epoch: the DetRGN oracles score channels on a few batches of full gradient (dynamic:
every epoch; static: once), ``controller.resample(epoch)`` draws the channels, one epoch of
plain SGD with a warm-up + cosine learning rate runs, the bytes that autograd saves for
backward are measured on the epoch's first batch (``saved_tensor_bytes``) next to the cost
model's figure (``controller.saved_bytes``), and the model is evaluated. After each epoch
the JSON record and a checkpoint (model, optimizer, controller state, epoch, RNG states;
loadable with ``torch.load(weights_only=True)``) are written, so Ctrl-C leaves a complete
record of the finished epochs and ``resume=True`` continues from the last one with the
same channel draws (draws depend only on ``(seed, epoch)``; DetRGN scores are checkpointed).

Stages, one job each: ``prepare_run`` (data, backbone, memory probe, ranking, convert,
optimizer, LambdaLR, a fresh ``RunRecord``), ``restore`` (resume), ``run_epoch`` (score,
draw, train, evaluate: one ``EpochRecord``), ``persist_epoch`` / ``persist_final`` (files).
Options and their checks are in config.py, the record types in records.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from . import cost as C
from .api import convert
from .config import (DATA_FORMS, RunConfig, Settings, UsageError, auto_run_name,  # noqa: F401
                     check_data_name, resolve)
from .measure import saved_tensor_bytes
from .presets import get_preset
from .progress import progress_bar
from .ranking import LayerRanking, load_ranking, shipped_rankings_path
from .records import (RECORD_FORMAT, RECORD_VERSION, DataFacts, EpochRecord,  # noqa: F401
                      MemoryFacts, ModelFacts, RunRecord, RunSummary, summarize)
from .sampling import get_policy
from .tables import mib, pct, text_table
from .update_tracking import UpdateTracker

CHECKPOINT_FORMAT = "trady-finetune-checkpoint"
RECORD_FILE = "record.json"
TABLE_FILE = "table.txt"
CHECKPOINT_FILE = "checkpoint.pt"
TRACKER_KEY = "update_tracker"      # the UpdateTracker's sums in a checkpoint (track_updates)

# config fields that may differ between a run and its resumption
_RESUME_FREE = ("threads", "quiet", "max_epochs_this_call")


# ------------------------------------------------------------------------- data and model

@functools.lru_cache(maxsize=16)
def _dataset(name: str, split: str, resolution: int, subset: int | None, seed: int,
             mean: tuple, std: tuple):
    from .data import load_dataset
    return load_dataset(name, split, resolution, subset=subset, seed=seed, mean=mean, std=std)


def load_data(config: RunConfig, settings: Settings, mean=(0.5,) * 3, std=(0.5,) * 3):
    """(train images, train labels, eval images, eval labels, num_classes, eval split name)."""
    from .data import stratified_split

    mean, std = tuple(mean), tuple(std)
    if config.eval_on == "val":
        n_val = settings.val_subset
        total = None if settings.train_subset is None else settings.train_subset + n_val
        ds = _dataset(config.data, "train", settings.resolution, total, config.data_seed, mean, std)
        labels = ds.labels.numpy()
        val_idx = stratified_split(labels, "test", test_fraction=n_val / len(ds),
                                   seed=config.data_seed)
        train_mask = torch.ones(len(ds), dtype=torch.bool)
        train_mask[torch.as_tensor(val_idx)] = False
        val_idx = torch.as_tensor(val_idx)
        return (ds.images[train_mask], ds.labels[train_mask], ds.images[val_idx],
                ds.labels[val_idx], ds.num_classes, "val")
    train = _dataset(config.data, "train", settings.resolution, settings.train_subset,
                     config.data_seed, mean, std)
    test = _dataset(config.data, "test", settings.resolution, settings.test_subset,
                    config.data_seed, mean, std)
    return train.images, train.labels, test.images, test.labels, train.num_classes, "test"


def build_backbone(config: RunConfig, num_classes: int) -> nn.Module:
    """The pretrained backbone with a fresh ``num_classes`` classifier (seeded)."""
    from .models import build_model
    model = build_model(config.model, weights=config.weights)
    torch.manual_seed(config.seed)
    head = model.classifier
    if head.out_features != num_classes:
        model.classifier = nn.Linear(head.in_features, num_classes)
    return model.eval()


@dataclass
class RunData:
    """The tensors of one run, normalised as its backbone expects."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    num_classes: int
    eval_split: str
    mean: tuple
    std: tuple
    load_s: float


def load_backbone_and_data(config: RunConfig, settings: Settings) -> tuple[nn.Module, RunData]:
    """The backbone with a fresh classifier and the data, normalised with its preprocessing
    (the data are loaded once more when the backbone's mean/std differ from [-1, 1]'s)."""
    t0 = time.perf_counter()
    mean = std = (0.5, 0.5, 0.5)
    loaded = load_data(config, settings)
    model = build_backbone(config, loaded[4])
    pre = getattr(model, "preprocess", None)
    if pre is not None and (tuple(pre.mean) != mean or tuple(pre.std) != std):
        mean, std = tuple(pre.mean), tuple(pre.std)
        loaded = load_data(config, settings, mean, std)
    return model, RunData(*loaded, mean=mean, std=std, load_s=time.perf_counter() - t0)


def ranking_key(arch: str, resolution: int) -> list[str]:
    """Keys tried in a rankings file: ``arch@resolution`` first, then ``arch``."""
    return [f"{arch}@{resolution}", arch]


def find_ranking(arch: str, resolution: int, source: str | None) -> tuple[LayerRanking | None, dict]:
    """The layer ranking to use and a description of where it came from."""
    if source is not None and str(source).lower() == "none":
        return None, {"source": "none (all layers in the pool)"}
    path = shipped_rankings_path() if source is None else Path(source).expanduser()
    if source is not None and not path.is_file():
        raise UsageError(f"ranking file not found: {path}")
    if not path.is_file():
        return None, {"source": f"none: no shipped rankings file at {path}"}
    errors = []
    for key in ranking_key(arch, resolution):
        try:
            ranking = load_ranking(path, key)
        except ValueError as error:
            errors.append(str(error))
            continue
        ranking.arch = arch
        return ranking, {"source": "shipped" if source is None else str(path), "key": key,
                         "steps": ranking.steps, "meta": ranking.meta}
    if source is not None:
        raise UsageError(f"ranking file {path} has no ranking for {arch!r}: {errors[-1]}")
    return None, {"source": f"none: the shipped rankings have no entry for {arch!r}"}


# ------------------------------------------------------------------------- schedule

def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up from base/warmup to base over ``warmup_steps``, then cosine to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int,
                  warmup_steps: int) -> LambdaLR:
    """The schedule of :func:`lr_at` as a LambdaLR over the optimizer's base rates (one
    ``step()`` per batch)."""
    return LambdaLR(optimizer, lambda step: lr_at(step, total_steps, warmup_steps, 1.0))


def _generator(*parts: int) -> torch.Generator:
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part) + 7_919) % (2 ** 62)
    return torch.Generator().manual_seed(value)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, salt: int = 0,
                  max_batches: int | None = None) -> list[torch.Tensor]:
    """Shuffled index batches of one epoch: a function of (seed, epoch) only."""
    order = torch.randperm(n, generator=_generator(seed, epoch, salt))
    batches = list(order.split(batch_size))
    return batches[:max_batches] if max_batches else batches


# ------------------------------------------------------------------------- one epoch

def _finite(value: float) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 256, desc: str = "evaluate") -> dict:
    """Mean cross-entropy and top-1 accuracy of ``model`` (eval mode) on the tensors."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    try:
        starts = range(0, len(images), batch_size)
        for start in progress_bar(starts, desc=desc, total=len(starts)):
            x = images[start:start + batch_size].contiguous()
            y = labels[start:start + batch_size]
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    finally:
        model.train(was_training)
    n = max(len(images), 1)
    return {"loss": _finite(loss_sum / n), "accuracy": correct / n}


def train_one_epoch(model: nn.Module, controller, optimizer: torch.optim.Optimizer,
                    images: torch.Tensor, labels: torch.Tensor, batches: list[torch.Tensor],
                    scheduler: LambdaLR, desc: str = "train",
                    before_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None
                    ) -> dict:
    """One epoch of SGD over ``batches`` (one scheduler step per batch); measures saved
    bytes on the first batch. ``before_step(x, y)`` runs before each step's forward, outside
    the measurement."""
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    measured = analytic = None
    for index, batch in enumerate(progress_bar(batches, desc=desc, total=len(batches))):
        x, y = images[batch].contiguous(), labels[batch]
        optimizer.zero_grad(set_to_none=True)
        if before_step is not None:
            before_step(x, y)
        if index == 0:
            with saved_tensor_bytes(model) as saved:
                logits = model(x)
            measured = saved.total
            analytic = controller.saved_bytes(len(x))
        else:
            logits = model(x)
        loss = F.cross_entropy(logits, y)
        if loss.requires_grad:
            loss.backward()
            optimizer.step()
        scheduler.step()
        loss_sum += float(loss.detach()) * len(x)
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += len(x)
    return {"loss": _finite(loss_sum / max(seen, 1)), "accuracy": correct / max(seen, 1),
            "samples": seen, "steps": len(batches), "measured_bytes": measured,
            "analytic_bytes": analytic, "measured_batch": len(batches[0]) if batches else 0}


def draw_digest(selection: dict[str, torch.Tensor]) -> str:
    """A short fingerprint of a channel selection (same draws <=> same digest)."""
    h = hashlib.sha1()
    for name in sorted(selection):
        h.update(name.encode())
        h.update(selection[name].to(torch.int64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------- memory

def measure_plain_full_finetune(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes plain PyTorch saves for backward when every parameter trains (BN stats frozen)."""
    states = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        with torch.enable_grad(), saved_tensor_bytes(model) as saved:
            out = model(x)
        del out
    finally:
        for p, state in zip(model.parameters(), states):
            p.requires_grad_(state)
        model.train(was_training)
    return saved.total


def full_analytic_bytes(controller, batch: int) -> int:
    """What the converted model would save training every channel (the "full" policy)."""
    counts = {l.name: l.in_channels for l in controller.layers}
    return C.saved_bytes_for_backward(controller.layers, controller.profile.masks, counts,
                                      batch)["total"]


# ------------------------------------------------------------------------- files

def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_record(record: RunRecord | dict, out_dir: Path) -> None:
    record = RunRecord.coerce(record)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / RECORD_FILE, json.dumps(record.to_dict(), indent=1) + "\n")
    _write_atomic(out_dir / TABLE_FILE, format_record(record) + "\n")


def save_checkpoint(path: Path, model, optimizer, controller, epoch: int, config: RunConfig,
                    record: dict, extra: dict | None = None) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "controller": controller.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                "python_version": random.getstate()[0],
                "python_gauss": random.getstate()[2]},
        "config_json": json.dumps(config.as_dict(), sort_keys=True),
        "record_json": json.dumps(record),
        **(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a trady-finetune checkpoint")
    return state


def _comparable(config_dict: dict) -> dict:
    return {k: v for k, v in config_dict.items() if k not in _RESUME_FREE}


# ------------------------------------------------------------------------- the run

def _environment(threads: int) -> dict:
    from . import __version__
    return {"trady_triton": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "machine": platform.machine(), "threads": threads,
            "cpu_count": os.cpu_count(), "device": "cpu"}


@dataclass
class Run:
    """What one run holds while it trains: its options, data, model, optimizer and record."""

    config: RunConfig
    settings: Settings
    data: RunData
    model: nn.Module
    controller: object
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    steps_per_epoch: int
    record: RunRecord
    out: Path | None
    log: Callable[[str], None]
    started: float
    tracker: UpdateTracker | None = None

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.out is None else self.out / CHECKPOINT_FILE

    def lr_of_step(self, step: int) -> float:
        return self.scheduler.base_lrs[0] * self.scheduler.lr_lambdas[0](step)

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.started, 3)


def _resume_checkpoint(out: Path | None, config: RunConfig) -> dict:
    """The checkpoint to resume from; UsageError when absent or made with other options."""
    path = None if out is None else out / CHECKPOINT_FILE
    if path is None or not path.is_file():
        raise UsageError(f"--resume: no checkpoint at {path}; run without "
                         "--resume first (same --out)")
    checkpoint = load_checkpoint(path)
    saved = json.loads(checkpoint["config_json"])
    now = _comparable(config.as_dict())
    if _comparable(saved) != now:
        diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        raise UsageError(f"--resume: the checkpoint in {out} was made with other settings "
                         f"(option: (checkpoint, now)) {diff}; resume with the same options")
    return checkpoint


def _set_threads(config: RunConfig, settings: Settings) -> int:
    # the fast preset runs on 1 thread: its 40x40 maps gain little from more, and on a shared
    # CPU an oversubscribed OpenMP pool was 5x slower (docs/EXPERIMENTS.md)
    threads = config.threads or get_preset(settings.preset).threads
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _convert(model: nn.Module, config: RunConfig, settings: Settings, example: torch.Tensor,
             ranking: LayerRanking | None):
    """convert() with the run's policy, budget and ranking; its ValueErrors are usage errors."""
    # arch "<model>@no-ranking" keeps convert() from picking a shipped ranking by itself
    try:
        return convert(model, policy=get_policy(config.policy).name, example_input=example,
                       ranking=ranking, coverage=config.coverage, seed=config.seed,
                       arch=config.model if ranking is not None
                       else f"{config.model}@no-ranking", **settings.budget)
    except ValueError as error:     # a budget below the cheapest channel, a bad ranking ...
        raise UsageError(str(error)) from None


def _optimizer(model: nn.Module, controller, settings: Settings) -> torch.optim.Optimizer:
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    if settings.momentum or settings.weight_decay:
        # momentum and weight decay would move unselected channels: mask the step
        controller.mask_optimizer(optimizer)
    return optimizer


def _model_facts(config: RunConfig, controller, ranking, ranking_info: dict,
                 num_classes: int) -> ModelFacts:
    policy = get_policy(config.policy)
    body = [l for l in controller.layers if not l.is_classifier]
    full_units = C.full_units(controller.layers)
    budget = controller.budget_units
    return ModelFacts(
        name=config.model, weights=config.weights, num_classes=num_classes,
        convertible_layers=len(body), full_units=full_units, budget_units=budget,
        budget_fraction=None if budget is None else budget / full_units,
        pool_layers=len(controller.pool) if policy.pool == "topk" else
        (len(body) if policy.pool in ("all", "full") else 0),
        ranking={**ranking_info, "coverage": config.coverage,
                 "top_k": len(ranking.top_k(config.coverage)) if ranking else None})


def _data_facts(config: RunConfig, settings: Settings, data: RunData) -> DataFacts:
    return DataFacts(name=config.data, resolution=settings.resolution,
                     train_size=len(data.train_x), eval_split=data.eval_split,
                     eval_size=len(data.eval_x), num_classes=data.num_classes,
                     mean=list(data.mean), std=list(data.std), data_seed=config.data_seed,
                     load_s=round(data.load_s, 3))


def prepare_run(config: RunConfig, settings: Settings, out: Path | None, threads: int,
                command: str | None, log: Callable[[str], None], started: float) -> Run:
    """Stage 1: data, backbone, memory probe, ranking, convert, optimizer, a fresh record."""
    from .models import build_model  # noqa: F401  (fail early with the install hint)
    model, data = load_backbone_and_data(config, settings)
    if len(data.train_x) == 0 or len(data.eval_x) == 0:
        raise UsageError(f"data set {config.data!r} gave {len(data.train_x)} training and "
                         f"{len(data.eval_x)} evaluation images: need at least one of each")
    batch = settings.batch_size
    example = data.train_x[epoch_batches(len(data.train_x), batch, config.seed, 0)[0]].contiguous()
    plain_full_bytes = measure_plain_full_finetune(model, example)
    ranking, ranking_info = find_ranking(config.model, settings.resolution, config.ranking)
    controller = _convert(model, config, settings, example, ranking)
    model.train()
    optimizer = _optimizer(model, controller, settings)
    steps = len(epoch_batches(len(data.train_x), batch, config.seed, 0,
                              max_batches=config.max_batches))
    scheduler = warmup_cosine(optimizer, steps * settings.epochs, steps * settings.warmup_epochs)
    record = RunRecord(
        status="running", command=command, config=config, settings=settings,
        model=_model_facts(config, controller, ranking, ranking_info, data.num_classes),
        data=_data_facts(config, settings, data),
        memory=MemoryFacts(batch=len(example), plain_full_finetune_measured_bytes=plain_full_bytes,
                           trady_full_analytic_bytes=full_analytic_bytes(controller,
                                                                         len(example))),
        environment=_environment(threads))
    tracker = UpdateTracker(controller, optimizer) if config.track_updates else None
    return Run(config, settings, data, model, controller, optimizer, scheduler, steps, record,
               out, log, started, tracker)


def restore(run: Run, checkpoint: dict) -> int:
    """Stage 2 (resume): model, optimizer, schedule, controller, RNGs and the finished
    epochs from a checkpoint; returns the first epoch still to run."""
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.controller.load_state_dict(checkpoint["controller"])
    rng = checkpoint["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
    previous = RunRecord.from_dict(json.loads(checkpoint["record_json"]))
    start_epoch = int(checkpoint["epoch"]) + 1
    for group in run.optimizer.param_groups:     # checkpoints from before the LambdaLR
        group.setdefault("initial_lr", run.settings.lr)
    run.scheduler = LambdaLR(run.optimizer, run.scheduler.lr_lambdas[0],
                             last_epoch=start_epoch * run.steps_per_epoch - 1)
    if run.tracker is not None:
        run.tracker.load_state_dict(checkpoint[TRACKER_KEY])
    run.record.epochs = previous.epochs
    run.record.resumed_from_epoch = int(checkpoint["epoch"])
    run.record.previous_wall_s = previous.total_wall_s
    run.log(f"resuming {run.out} after epoch {start_epoch} of {run.settings.epochs}")
    return start_epoch


def _score_channels(run: Run, epoch: int) -> float:
    """DetRGN scoring on a few full-gradient batches when the policy needs it; seconds spent."""
    policy = get_policy(run.config.policy)
    if not policy.needs_scores or not (policy.dynamic or run.controller.channel_scores is None):
        return 0.0
    data = run.data
    batches = epoch_batches(len(data.train_x), run.settings.batch_size, run.config.seed, epoch,
                            salt=1, max_batches=run.settings.score_batches)
    tick = time.perf_counter()
    run.controller.score_channels([(data.train_x[b].contiguous(), data.train_y[b])
                                   for b in batches])
    return time.perf_counter() - tick


def _epoch_record(run: Run, epoch: int, selection: dict, trained: dict, evaluated: dict,
                  seconds: dict, tracked: dict | None) -> EpochRecord:
    stats, counts = run.controller.stats(), run.controller.counts()
    body = {k: v for k, v in counts.items() if k != run.controller.classifier}
    analytic = trained["analytic_bytes"] or {}
    first = epoch * run.steps_per_epoch
    return EpochRecord(
        epoch=epoch, lr_start=run.lr_of_step(first),
        lr_end=run.lr_of_step(first + run.steps_per_epoch - 1),
        train_loss=trained["loss"], train_accuracy=trained["accuracy"],
        eval_loss=evaluated["loss"], eval_accuracy=evaluated["accuracy"],
        eval_split=run.data.eval_split, channels_drawn=sum(body.values()),
        layers_trained=sum(1 for v in body.values() if v), channels_per_layer=body,
        draw_digest=draw_digest(selection), selected_units=stats.selected_units,
        budget_units=stats.budget_units, weight_sparsity=stats.weight_sparsity,
        activation_sparsity=stats.activation_sparsity,
        weight_grad_flops_saved=stats.flops_saved,
        saved_bytes_measured=trained["measured_bytes"], saved_bytes_model=analytic,
        saved_bytes_batch=trained["measured_batch"],
        saved_bytes_match=trained["measured_bytes"] == analytic.get("total"),
        train_samples=trained["samples"], train_steps=trained["steps"],
        update_tracking=tracked, **{k: round(v, 3) for k, v in seconds.items()})


def evaluation_due(every: int | None, epoch: int, epochs: int) -> bool:
    """Evaluate after ``epoch`` (0-based)? Every ``every`` epochs and always after the last."""
    return every is None or (epoch + 1) % every == 0 or epoch + 1 == epochs


def run_epoch(run: Run, epoch: int) -> EpochRecord:
    """Stage 3: score (DetRGN), draw the epoch's channels, train one epoch, evaluate."""
    tick = time.perf_counter()
    score_s = _score_channels(run, epoch)
    selection = run.controller.resample(epoch)
    data, settings = run.data, run.settings
    batches = epoch_batches(len(data.train_x), settings.batch_size, run.config.seed, epoch,
                            max_batches=run.config.max_batches)
    t_train = time.perf_counter()
    if run.tracker is not None:
        run.tracker.start_epoch(selection)
    trained = train_one_epoch(run.model, run.controller, run.optimizer, data.train_x,
                              data.train_y, batches, run.scheduler,
                              desc=f"epoch {epoch + 1}/{settings.epochs}",
                              before_step=run.tracker and run.tracker.before_step)
    tracked = run.tracker.end_epoch() if run.tracker is not None else None
    train_s = time.perf_counter() - t_train
    t_eval = time.perf_counter()
    # in training-sized batches: the peak stays the training's, and the CPU path's 1x1 and
    # depthwise convs meet the shapes whose fastest form they already timed
    evaluated = evaluate(run.model, data.eval_x, data.eval_y, batch_size=settings.batch_size,
                         desc=f"eval {data.eval_split}") \
        if evaluation_due(run.config.eval_every, epoch, settings.epochs) \
        else {"loss": None, "accuracy": None}
    eval_s = time.perf_counter() - t_eval
    return _epoch_record(run, epoch, selection, trained, evaluated,
                         {"score_s": score_s, "train_s": train_s, "eval_s": eval_s,
                          "wall_s": time.perf_counter() - tick}, tracked)


def persist_epoch(run: Run, epoch: int, keep_checkpoint: bool) -> None:
    """Stage 4 (each epoch): the checkpoint (unless it is the last epoch's and not kept) and
    the record, so that Ctrl-C or a crash leaves every finished epoch on disk."""
    if run.out is None:
        return
    run.out.mkdir(parents=True, exist_ok=True)
    if keep_checkpoint or epoch + 1 < run.settings.epochs:
        save_checkpoint(run.checkpoint_path, run.model, run.optimizer, run.controller, epoch,
                        run.config, run.record.to_dict(),
                        None if run.tracker is None else {TRACKER_KEY: run.tracker.state_dict()})
    write_record(run.record, run.out)


def persist_final(run: Run, keep_checkpoint: bool = True) -> None:
    """Stage 4 (the end): wall time and final figures into the record, on disk."""
    run.record.wall_s = run.elapsed()
    run.record.final = summarize(run.record)
    if run.out is None:
        return
    write_record(run.record, run.out)
    path = run.checkpoint_path
    if not keep_checkpoint and run.record.status == "complete" and path.exists():
        path.unlink()


def run_epochs(run: Run, start_epoch: int, keep_checkpoint: bool,
               on_epoch_end: Callable[[dict], None] | None) -> None:
    """Epochs ``start_epoch..`` until done or ``max_epochs_this_call`` have run."""
    limit = run.config.max_epochs_this_call
    for count, epoch in enumerate(range(start_epoch, run.settings.epochs)):
        if limit is not None and count >= limit:
            run.record.status = "stopped"
            return
        entry = run_epoch(run, epoch)
        run.record.epochs.append(entry)
        run.record.wall_s = run.elapsed()
        run.log(format_epoch_line(entry, run.settings.epochs))
        persist_epoch(run, epoch, keep_checkpoint)
        if on_epoch_end is not None:
            on_epoch_end(entry.to_dict())
    run.record.status = "complete"


def finetune(config: RunConfig, out_dir: str | Path | None = None, *, resume: bool = False,
             log: Callable[[str], None] | None = None, command: str | None = None,
             on_epoch_end: Callable[[dict], None] | None = None,
             keep_checkpoint: bool = True) -> dict:
    """Run one fine-tuning; returns the JSON record (also written to ``out_dir``).

    ``resume`` continues from ``out_dir/checkpoint.pt``. A KeyboardInterrupt stops the
    run after writing the record of the finished epochs (status "interrupted") and is
    re-raised. ``on_epoch_end(epoch_entry)`` is called after each finished epoch.
    """
    started = time.perf_counter()
    settings = resolve(config)
    out = Path(out_dir) if out_dir is not None else None
    checkpoint = _resume_checkpoint(out, config) if resume else None
    threads = _set_threads(config, settings)
    run = prepare_run(config, settings, out, threads, command, log or (lambda message: None),
                      started)
    start_epoch = restore(run, checkpoint) if checkpoint is not None else 0
    try:
        run_epochs(run, start_epoch, keep_checkpoint, on_epoch_end)
    except KeyboardInterrupt:
        run.record.status = "interrupted"
        persist_final(run)
        raise
    persist_final(run, keep_checkpoint)
    return run.record.to_dict()


# ------------------------------------------------------------------------- text

def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.2f}"


def format_epoch_line(entry: EpochRecord, epochs: int) -> str:
    loss = "nan" if entry.train_loss is None else f"{entry.train_loss:.4f}"
    return (f"epoch {entry.epoch + 1}/{epochs}: train loss {loss}, "
            f"{entry.eval_split} acc {_percent(entry.eval_accuracy)}%, "
            f"{entry.channels_drawn} channels in {entry.layers_trained} layers, "
            f"saved for backward {mib(entry.saved_bytes_measured)} MiB, "
            f"{entry.wall_s:.1f}s")


def _record_head(r: RunRecord) -> str:
    cfg, st, model, data = r.config, r.settings, r.model, r.data
    return (f"{cfg.model} on {cfg.data} ({data.train_size} train / "
            f"{data.eval_size} {data.eval_split} images, "
            f"{st.resolution}x{st.resolution}), policy {get_policy(cfg.policy).name}, "
            f"budget {st.budget_text}"
            + (f" = {model.budget_units:,} of {model.full_units:,} units "
               f"({100 * model.budget_fraction:.2f}%)" if model.budget_units else "")
            + f", seed {cfg.seed}, preset {st.preset}, lr {st.lr:g} ({st.lr_source})")


def _record_footer(r: RunRecord) -> list[str]:
    final, mem = r.final, r.memory
    if final is None or not final.epochs_done:
        return []
    return ["",
            f"status {r.status}: {final.epochs_done} of {r.settings.epochs} epochs, "
            f"{final.eval_split} accuracy {_percent(final.eval_accuracy)}% "
            f"(best {_percent(final.best_eval_accuracy)}%), wall {final.wall_s:.1f}s",
            f"saved for backward, batch {mem.batch}: {mib(final.saved_bytes_measured)}"
            f" MiB measured (cost model {mib(final.saved_bytes_model)} MiB) vs full "
            f"fine-tuning {mib(mem.plain_full_finetune_measured_bytes)} MiB in plain "
            f"PyTorch (measured), {mib(mem.trady_full_analytic_bytes)} MiB with "
            f"TraDy layers and every channel"]


def format_record(record: RunRecord | dict) -> str:
    """The readable table of one run."""
    r = RunRecord.coerce(record)
    header = ("epoch", "lr", "train loss", f"{r.data.eval_split} acc %", "channels",
              "layers", "act sp %", "W sp %", "dW FLOPs saved %", "saved MiB (meas.)",
              "= model", "wall s")
    rows = [(str(e.epoch + 1), f"{e.lr_start:.4g}",
             "nan" if e.train_loss is None else f"{e.train_loss:.4f}",
             _percent(e.eval_accuracy), str(e.channels_drawn), str(e.layers_trained),
             pct(e.activation_sparsity), pct(e.weight_sparsity), pct(e.weight_grad_flops_saved),
             mib(e.saved_bytes_measured), "yes" if e.saved_bytes_match else "NO",
             f"{e.wall_s:.1f}") for e in r.epochs]
    return "\n".join([_record_head(r), "", text_table(header, rows)] + _record_footer(r))


def _comparison_row(r: RunRecord) -> tuple:
    f = r.final or RunSummary(epochs_done=0)
    plain = r.memory.plain_full_finetune_measured_bytes
    units = r.epochs[-1].selected_units if r.epochs else None
    return (get_policy(r.config.policy).name, r.settings.budget_text,
            "-" if not f.epochs_done else _percent(f.eval_accuracy),
            mib(f.saved_bytes_measured),
            "-" if not f.saved_bytes_measured else f"{100 * f.saved_bytes_measured / plain:.1f}%",
            "-" if units is None else f"{units:,}",
            pct(f.mean_weight_grad_flops_saved), f"{f.wall_s or 0:.1f}")


def format_comparison(records: list[RunRecord | dict]) -> str:
    """Side-by-side summary of runs (e.g. TraDy and full fine-tuning)."""
    runs = [RunRecord.coerce(r) for r in records]
    header = ("policy", "budget", "accuracy %", "saved for backward MiB", "vs plain full FT",
              "memory units", "dW FLOPs saved %", "wall s")
    plain = runs[0].memory.plain_full_finetune_measured_bytes
    return "\n".join([text_table(header, [_comparison_row(r) for r in runs],
                                 align="l" + "r" * (len(header) - 1)),
                      f"(plain PyTorch full fine-tuning saves {mib(plain)} MiB for backward at "
                      f"batch {runs[0].memory.batch}, measured)"])
