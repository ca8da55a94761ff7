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
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cost as C
from .api import convert
from .measure import saved_tensor_bytes
from .presets import (BUDGETLESS_POLICIES, DEFAULT_PRESET, budget_for_level, get_preset,
                      parse_budget)
from .progress import progress_bar
from .ranking import LayerRanking, load_ranking, shipped_rankings_path
from .sampling import get_policy

RECORD_FORMAT = "trady-finetune-record"
RECORD_VERSION = 1
CHECKPOINT_FORMAT = "trady-finetune-checkpoint"
RECORD_FILE = "record.json"
TABLE_FILE = "table.txt"
CHECKPOINT_FILE = "checkpoint.pt"

DATA_FORMS = ("digits", "fashion-mnist", "mnist", "imagefolder:PATH", "torchvision:NAME:ROOT")

# config fields that may differ between a run and its resumption
_RESUME_FREE = ("threads", "quiet", "max_epochs_this_call")


@dataclass
class RunConfig:
    """What to run. ``None`` fields take the preset's value."""

    model: str = "efficientnet-lite0"
    data: str = "digits"
    policy: str = "d-topk"
    budget: str = "small"          # small|medium|large, a keep ratio, "5%", or "15936u"
    seed: int = 0
    preset: str = DEFAULT_PRESET
    weights: str | None = None
    epochs: int | None = None
    warmup_epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    resolution: int | None = None
    train_subset: int | None = None     # 0 = the whole split
    test_subset: int | None = None      # 0 = the whole split
    val_subset: int | None = None
    eval_on: str = "test"               # "test", or "val": a split held out of the train split
    data_seed: int = 0                  # which subset of the data (fixed across run seeds)
    score_batches: int | None = None
    ranking: str | None = None          # None: shipped ranking; "none": no ranking; a path
    coverage: float = 0.97
    max_batches: int | None = None      # cap on batches per epoch (smoke tests)
    threads: int | None = None
    max_epochs_this_call: int | None = None   # stop after this many epochs (then --resume)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Settings:
    """A RunConfig with every preset default filled in."""

    preset: str
    resolution: int
    epochs: int
    warmup_epochs: int
    batch_size: int
    lr: float
    lr_source: str
    momentum: float
    weight_decay: float
    train_subset: int | None
    test_subset: int | None
    val_subset: int
    score_batches: int
    budget: dict = field(default_factory=dict)   # keep_ratio / budget_units, or {} (none)
    budget_text: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class UsageError(ValueError):
    """A bad option value (policy, data set, budget, preset ...): the message says what is allowed."""


# ------------------------------------------------------------------------- configuration

def check_data_name(name: str) -> None:
    if name in ("digits", "fashion-mnist", "mnist"):
        return
    if name.startswith("imagefolder:") and len(name) > len("imagefolder:"):
        return
    if name.startswith("torchvision:") and len(name.split(":", 2)) == 3 and all(name.split(":", 2)):
        return
    raise UsageError(f"unknown data set {name!r}; allowed values: {', '.join(DATA_FORMS)}")


def resolve(config: RunConfig) -> Settings:
    """Fill the preset's defaults in and check every value; raises UsageError."""
    from .models import MODEL_NAMES

    try:
        preset = get_preset(config.preset)
    except ValueError as error:
        raise UsageError(str(error)) from None
    try:
        policy = get_policy(config.policy).name
    except ValueError as error:
        raise UsageError(str(error)) from None
    if config.model not in MODEL_NAMES:
        raise UsageError(f"unknown model {config.model!r}; allowed values: {', '.join(MODEL_NAMES)}")
    check_data_name(config.data)
    if config.eval_on not in ("test", "val"):
        raise UsageError(f"eval_on={config.eval_on!r}: allowed values are test, val")

    def pick(value, default):
        return default if value is None else value

    resolution = int(pick(config.resolution, preset.resolution))
    epochs = int(pick(config.epochs, preset.epochs))
    warmup = int(pick(config.warmup_epochs, preset.warmup_epochs))
    batch = int(pick(config.batch_size, preset.batch_size))
    for name, value, low in (("resolution", resolution, 8), ("epochs", epochs, 1),
                             ("warmup_epochs", warmup, 0), ("batch_size", batch, 1)):
        if value < low:
            raise UsageError(f"{name}={value}: allowed values are integers >= {low}")
    if warmup >= epochs and epochs > 1:
        raise UsageError(f"warmup_epochs={warmup}: allowed values are < epochs ({epochs})")
    if config.lr is not None:
        if not (isinstance(config.lr, (int, float)) and math.isfinite(config.lr) and config.lr > 0):
            raise UsageError(f"lr={config.lr!r}: allowed values are numbers > 0")
        lr, lr_source = float(config.lr), "given (--lr)"
    else:
        lr, lr_source = preset.lr_for(config.model, policy)
    if not 0.0 < config.coverage <= 1.0:
        raise UsageError(f"coverage={config.coverage!r}: allowed values are in (0, 1]")

    def subset(value, default):
        value = pick(value, default)
        if value is None or value == 0:
            return None
        if value < 0:
            raise UsageError(f"subset={value}: allowed values are integers >= 1, or 0 for all")
        return int(value)

    train_subset = subset(config.train_subset, preset.train_subset)
    test_subset = subset(config.test_subset, preset.test_subset)
    val_subset = int(pick(config.val_subset, preset.val_subset) or 0)
    if config.eval_on == "val" and val_subset <= 0:
        val_subset = 320
    score_batches = int(pick(config.score_batches, preset.score_batches))
    if score_batches < 1:
        raise UsageError(f"score_batches={score_batches}: allowed values are integers >= 1")

    budget: dict = {}
    if policy not in BUDGETLESS_POLICIES:
        try:
            parsed = parse_budget(config.budget)
        except ValueError as error:
            raise UsageError(str(error)) from None
        budget = budget_for_level(parsed["level"], config.model, resolution) \
            if "level" in parsed else parsed
    return Settings(preset=preset.name, resolution=resolution, epochs=epochs,
                    warmup_epochs=warmup, batch_size=batch, lr=lr, lr_source=lr_source,
                    momentum=preset.momentum, weight_decay=preset.weight_decay,
                    train_subset=train_subset, test_subset=test_subset, val_subset=val_subset,
                    score_batches=score_batches, budget=budget,
                    budget_text=str(config.budget) if budget else "none")


def auto_run_name(config: RunConfig) -> str:
    budget = "nobudget" if get_policy(config.policy).name in BUDGETLESS_POLICIES else config.budget
    data = config.data.replace(":", "_").replace("/", "_")
    return f"{config.model}_{data}_{get_policy(config.policy).name}_{budget}_s{config.seed}"


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
                    lr_of_step: Callable[[int], float], first_step: int,
                    desc: str = "train") -> dict:
    """One epoch of SGD over ``batches``; measures saved bytes on the first batch."""
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    measured = analytic = None
    step = first_step
    for index, batch in enumerate(progress_bar(batches, desc=desc, total=len(batches))):
        x, y = images[batch].contiguous(), labels[batch]
        for group in optimizer.param_groups:
            group["lr"] = lr_of_step(step)
        optimizer.zero_grad(set_to_none=True)
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
        loss_sum += float(loss.detach()) * len(x)
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += len(x)
        step += 1
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


def write_record(record: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / RECORD_FILE, json.dumps(record, indent=1) + "\n")
    _write_atomic(out_dir / TABLE_FILE, format_record(record) + "\n")


def save_checkpoint(path: Path, model, optimizer, controller, epoch: int, config: RunConfig,
                    record: dict) -> None:
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


def finetune(config: RunConfig, out_dir: str | Path | None = None, *, resume: bool = False,
             log: Callable[[str], None] | None = None, command: str | None = None,
             on_epoch_end: Callable[[dict], None] | None = None,
             keep_checkpoint: bool = True) -> dict:
    """Run one fine-tuning; returns the JSON record (also written to ``out_dir``).

    ``resume`` continues from ``out_dir/checkpoint.pt``. A KeyboardInterrupt stops the
    run after writing the record of the finished epochs (status "interrupted") and is
    re-raised. ``on_epoch_end(epoch_entry)`` is called after each finished epoch.
    """
    log = log or (lambda message: None)
    started = time.perf_counter()
    settings = resolve(config)
    policy = get_policy(config.policy)
    out = Path(out_dir) if out_dir is not None else None
    checkpoint_path = out / CHECKPOINT_FILE if out is not None else None
    checkpoint = None
    if resume:
        if checkpoint_path is None or not checkpoint_path.is_file():
            raise UsageError(f"--resume: no checkpoint at {checkpoint_path}; run without "
                             "--resume first (same --out)")
        checkpoint = load_checkpoint(checkpoint_path)
        saved_config = json.loads(checkpoint["config_json"])
        if _comparable(saved_config) != _comparable(config.as_dict()):
            diff = {k: (saved_config.get(k), v) for k, v in _comparable(config.as_dict()).items()
                    if saved_config.get(k) != v}
            raise UsageError(f"--resume: the checkpoint in {out} was made with other settings "
                             f"(option: (checkpoint, now)) {diff}; resume with the same options")
    # the fast preset runs on 1 thread: its 40x40 maps gain little from more, and on a shared
    # CPU an oversubscribed OpenMP pool was 5x slower (docs/EXPERIMENTS.md)
    threads = config.threads or get_preset(settings.preset).threads
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()

    # data and model
    from .models import build_model  # noqa: F401  (fail early with the install hint)
    t0 = time.perf_counter()
    mean = std = (0.5, 0.5, 0.5)
    train_x, train_y, eval_x, eval_y, num_classes, eval_split = load_data(config, settings)
    model = build_backbone(config, num_classes)
    pre = getattr(model, "preprocess", None)
    if pre is not None and (tuple(pre.mean) != mean or tuple(pre.std) != std):
        mean, std = tuple(pre.mean), tuple(pre.std)
        train_x, train_y, eval_x, eval_y, num_classes, eval_split = load_data(
            config, settings, mean, std)
    if len(train_x) == 0 or len(eval_x) == 0:
        raise UsageError(f"data set {config.data!r} gave {len(train_x)} training and "
                         f"{len(eval_x)} evaluation images: need at least one of each")
    load_s = time.perf_counter() - t0
    batch = settings.batch_size
    first = epoch_batches(len(train_x), batch, config.seed, 0)[0]
    example = train_x[first].contiguous()

    plain_full_bytes = measure_plain_full_finetune(model, example)

    ranking, ranking_info = find_ranking(config.model, settings.resolution, config.ranking)
    # arch "<model>@no-ranking" keeps convert() from picking a shipped ranking by itself
    try:
        controller = convert(model, policy=policy.name, example_input=example, ranking=ranking,
                             coverage=config.coverage, seed=config.seed,
                             arch=config.model if ranking is not None
                             else f"{config.model}@no-ranking", **settings.budget)
    except ValueError as error:     # a budget below the cheapest channel, a bad ranking ...
        raise UsageError(str(error)) from None
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    if settings.momentum or settings.weight_decay:
        # momentum and weight decay would move unselected channels: mask the step
        controller.mask_optimizer(optimizer)

    body = [l for l in controller.layers if not l.is_classifier]
    full_units = C.full_units(controller.layers)
    record = {
        "format": RECORD_FORMAT, "version": RECORD_VERSION, "status": "running",
        "command": command,
        "config": config.as_dict(),
        "settings": settings.as_dict(),
        "model": {
            "name": config.model, "weights": config.weights, "num_classes": num_classes,
            "convertible_layers": len(body), "full_units": full_units,
            "budget_units": controller.budget_units,
            "budget_fraction": None if controller.budget_units is None
            else controller.budget_units / full_units,
            "pool_layers": len(controller.pool) if policy.pool == "topk" else
            (len(body) if policy.pool in ("all", "full") else 0),
            "ranking": {**ranking_info, "coverage": config.coverage,
                        "top_k": len(ranking.top_k(config.coverage)) if ranking else None},
        },
        "data": {"name": config.data, "resolution": settings.resolution,
                 "train_size": len(train_x), "eval_split": eval_split,
                 "eval_size": len(eval_x), "num_classes": num_classes,
                 "mean": list(mean), "std": list(std), "data_seed": config.data_seed,
                 "load_s": round(load_s, 3)},
        "memory": {"batch": len(example), "plain_full_finetune_measured_bytes": plain_full_bytes,
                   "trady_full_analytic_bytes": full_analytic_bytes(controller, len(example))},
        "environment": _environment(threads),
        "epochs": [],
        "final": None,
    }
    start_epoch = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        controller.load_state_dict(checkpoint["controller"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        random.setstate((checkpoint["rng"]["python_version"], tuple(checkpoint["rng"]["python"]),
                         checkpoint["rng"]["python_gauss"]))
        previous = json.loads(checkpoint["record_json"])
        record["epochs"] = previous["epochs"]
        record["resumed_from_epoch"] = int(checkpoint["epoch"])
        record["previous_wall_s"] = previous.get("wall_s", 0.0) + previous.get("previous_wall_s", 0.0)
        start_epoch = int(checkpoint["epoch"]) + 1
        log(f"resuming {out} after epoch {start_epoch} of {settings.epochs}")

    steps_per_epoch = len(epoch_batches(len(train_x), batch, config.seed, 0,
                                        max_batches=config.max_batches))
    total_steps = steps_per_epoch * settings.epochs
    warmup_steps = steps_per_epoch * settings.warmup_epochs

    def lr_of_step(step: int) -> float:
        return lr_at(step, total_steps, warmup_steps, settings.lr)

    epochs_run = 0
    try:
        for epoch in range(start_epoch, settings.epochs):
            if config.max_epochs_this_call is not None and epochs_run >= config.max_epochs_this_call:
                record["status"] = "stopped"
                break
            tick = time.perf_counter()
            score_s = 0.0
            if policy.needs_scores and (policy.dynamic or controller.channel_scores is None):
                score = epoch_batches(len(train_x), batch, config.seed, epoch, salt=1,
                                      max_batches=settings.score_batches)
                t_score = time.perf_counter()
                controller.score_channels(
                    [(train_x[b].contiguous(), train_y[b]) for b in score])
                score_s = time.perf_counter() - t_score
            selection = controller.resample(epoch)
            batches = epoch_batches(len(train_x), batch, config.seed, epoch,
                                    max_batches=config.max_batches)
            t_train = time.perf_counter()
            trained = train_one_epoch(
                model, controller, optimizer, train_x, train_y, batches, lr_of_step,
                epoch * steps_per_epoch, desc=f"epoch {epoch + 1}/{settings.epochs}")
            train_s = time.perf_counter() - t_train
            t_eval = time.perf_counter()
            evaluated = evaluate(model, eval_x, eval_y, desc=f"eval {eval_split}")
            eval_s = time.perf_counter() - t_eval
            stats = controller.stats()
            counts = controller.counts()
            analytic = trained["analytic_bytes"] or {}
            entry = {
                "epoch": epoch,
                "lr_start": lr_of_step(epoch * steps_per_epoch),
                "lr_end": lr_of_step((epoch + 1) * steps_per_epoch - 1),
                "train_loss": trained["loss"], "train_accuracy": trained["accuracy"],
                "eval_loss": evaluated["loss"], "eval_accuracy": evaluated["accuracy"],
                "eval_split": eval_split,
                "channels_drawn": sum(v for k, v in counts.items() if k != controller.classifier),
                "layers_trained": sum(1 for k, v in counts.items()
                                      if v and k != controller.classifier),
                "channels_per_layer": {k: v for k, v in counts.items()
                                       if k != controller.classifier},
                "draw_digest": draw_digest(selection),
                "selected_units": stats.selected_units,
                "budget_units": stats.budget_units,
                "weight_sparsity": stats.weight_sparsity,
                "activation_sparsity": stats.activation_sparsity,
                "weight_grad_flops_saved": stats.flops_saved,
                "saved_bytes_measured": trained["measured_bytes"],
                "saved_bytes_model": analytic,
                "saved_bytes_batch": trained["measured_batch"],
                "saved_bytes_match": trained["measured_bytes"] == analytic.get("total"),
                "train_samples": trained["samples"], "train_steps": trained["steps"],
                "score_s": round(score_s, 3), "train_s": round(train_s, 3),
                "eval_s": round(eval_s, 3), "wall_s": round(time.perf_counter() - tick, 3),
            }
            record["epochs"].append(entry)
            record["wall_s"] = round(time.perf_counter() - started, 3)
            log(format_epoch_line(entry, settings.epochs))
            epochs_run += 1
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                if keep_checkpoint or epoch + 1 < settings.epochs:
                    save_checkpoint(checkpoint_path, model, optimizer, controller, epoch,
                                    config, record)
                write_record(record, out)
            if on_epoch_end is not None:
                on_epoch_end(entry)
        else:
            record["status"] = "complete"
    except KeyboardInterrupt:
        record["status"] = "interrupted"
        record["wall_s"] = round(time.perf_counter() - started, 3)
        record["final"] = summarize(record)
        if out is not None:
            write_record(record, out)
        raise
    record["wall_s"] = round(time.perf_counter() - started, 3)
    record["final"] = summarize(record)
    if out is not None:
        write_record(record, out)
        if not keep_checkpoint and record["status"] == "complete" and checkpoint_path.exists():
            checkpoint_path.unlink()
    return record


def summarize(record: dict) -> dict | None:
    epochs = record["epochs"]
    if not epochs:
        return {"epochs_done": 0}
    last = epochs[-1]
    accs = [e["eval_accuracy"] for e in epochs]
    wall = record.get("wall_s", 0.0) + record.get("previous_wall_s", 0.0)
    return {
        "epochs_done": len(epochs),
        "eval_accuracy": last["eval_accuracy"], "eval_split": last["eval_split"],
        "best_eval_accuracy": max(accs), "train_loss": last["train_loss"],
        "saved_bytes_measured": last["saved_bytes_measured"],
        "saved_bytes_model": last["saved_bytes_model"].get("total"),
        "saved_bytes_match_all_epochs": all(e["saved_bytes_match"] for e in epochs),
        "plain_full_finetune_measured_bytes": record["memory"]["plain_full_finetune_measured_bytes"],
        "mean_weight_sparsity": sum(e["weight_sparsity"] for e in epochs) / len(epochs),
        "mean_activation_sparsity": sum(e["activation_sparsity"] for e in epochs) / len(epochs),
        "mean_weight_grad_flops_saved": sum(e["weight_grad_flops_saved"] for e in epochs) / len(epochs),
        "wall_s": round(wall, 3),
        "diverged": any(e["train_loss"] is None for e in epochs),
    }


# ------------------------------------------------------------------------- text

def _mib(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 2 ** 20:.2f}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_epoch_line(entry: dict, epochs: int) -> str:
    loss = "nan" if entry["train_loss"] is None else f"{entry['train_loss']:.4f}"
    return (f"epoch {entry['epoch'] + 1}/{epochs}: train loss {loss}, "
            f"{entry['eval_split']} acc {100 * entry['eval_accuracy']:.2f}%, "
            f"{entry['channels_drawn']} channels in {entry['layers_trained']} layers, "
            f"saved for backward {_mib(entry['saved_bytes_measured'])} MiB, "
            f"{entry['wall_s']:.1f}s")


def format_record(record: dict) -> str:
    """The readable table of one run."""
    cfg, st, model = record["config"], record["settings"], record["model"]
    head = (f"{cfg['model']} on {cfg['data']} ({record['data']['train_size']} train / "
            f"{record['data']['eval_size']} {record['data']['eval_split']} images, "
            f"{st['resolution']}x{st['resolution']}), policy {get_policy(cfg['policy']).name}, "
            f"budget {st['budget_text']}"
            + (f" = {model['budget_units']:,} of {model['full_units']:,} units "
               f"({100 * model['budget_fraction']:.2f}%)" if model["budget_units"] else "")
            + f", seed {cfg['seed']}, preset {st['preset']}, lr {st['lr']:g} ({st['lr_source']})")
    columns = ("epoch", "lr", "train loss", f"{record['data']['eval_split']} acc %", "channels",
               "layers", "act sp %", "W sp %", "dW FLOPs saved %", "saved MiB (meas.)",
               "= model", "wall s")
    rows = [columns]
    for e in record["epochs"]:
        rows.append((str(e["epoch"] + 1), f"{e['lr_start']:.4g}",
                     "nan" if e["train_loss"] is None else f"{e['train_loss']:.4f}",
                     f"{100 * e['eval_accuracy']:.2f}", str(e["channels_drawn"]),
                     str(e["layers_trained"]), _pct(e["activation_sparsity"]),
                     _pct(e["weight_sparsity"]), _pct(e["weight_grad_flops_saved"]),
                     _mib(e["saved_bytes_measured"]),
                     "yes" if e["saved_bytes_match"] else "NO", f"{e['wall_s']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    lines = [head, ""]
    for i, row in enumerate(rows):
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    final = record.get("final") or {}
    if final.get("epochs_done"):
        mem = record["memory"]
        lines += ["",
                  f"status {record['status']}: {final['epochs_done']} of {st['epochs']} epochs, "
                  f"{final['eval_split']} accuracy {100 * final['eval_accuracy']:.2f}% "
                  f"(best {100 * final['best_eval_accuracy']:.2f}%), wall {final['wall_s']:.1f}s",
                  f"saved for backward, batch {mem['batch']}: {_mib(final['saved_bytes_measured'])}"
                  f" MiB measured (cost model {_mib(final['saved_bytes_model'])} MiB) vs full "
                  f"fine-tuning {_mib(mem['plain_full_finetune_measured_bytes'])} MiB in plain "
                  f"PyTorch (measured), {_mib(mem['trady_full_analytic_bytes'])} MiB with "
                  f"TraDy layers and every channel"]
    return "\n".join(lines)


def format_comparison(records: list[dict]) -> str:
    """Side-by-side summary of runs (e.g. TraDy and full fine-tuning)."""
    columns = ("policy", "budget", "accuracy %", "saved for backward MiB", "vs plain full FT",
               "memory units", "dW FLOPs saved %", "wall s")
    rows = [columns]
    for r in records:
        f = r["final"] or {}
        plain = r["memory"]["plain_full_finetune_measured_bytes"]
        units = r["epochs"][-1]["selected_units"] if r["epochs"] else None
        rows.append((get_policy(r["config"]["policy"]).name, r["settings"]["budget_text"],
                     "-" if not f.get("epochs_done") else f"{100 * f['eval_accuracy']:.2f}",
                     _mib(f.get("saved_bytes_measured")),
                     "-" if not f.get("saved_bytes_measured") else
                     f"{100 * f['saved_bytes_measured'] / plain:.1f}%",
                     "-" if units is None else f"{units:,}",
                     _pct(f.get("mean_weight_grad_flops_saved")), f"{f.get('wall_s', 0):.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(c.rjust(w) if j else c.ljust(w)
                               for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    plain = records[0]["memory"]["plain_full_finetune_measured_bytes"]
    lines.append(f"(plain PyTorch full fine-tuning saves {_mib(plain)} MiB for backward at batch "
                 f"{records[0]['memory']['batch']}, measured)")
    return "\n".join(lines)
