"""What one fine-tuning run is asked to do, and the one place that checks it.

``RunConfig`` is what the user asks for (``None`` = the preset's value); ``resolve`` fills
the preset's defaults in and checks every value, raising ``UsageError`` with the allowed
values. The command-line parser is built from ``RunConfig``'s fields and leaves the
checking to ``resolve``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .presets import (BUDGETLESS_POLICIES, DEFAULT_PRESET, budget_for_level, get_preset,
                      parse_budget)
from .sampling import get_policy

DATA_FORMS = ("digits", "fashion-mnist", "mnist", "imagefolder:PATH", "torchvision:NAME:ROOT")


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
    eval_every: int | None = None       # evaluate every N epochs and after the last (None: each)
    track_updates: bool = False         # per-epoch pool coverage and Eq. 9 cosine (extra backward)

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


def _pick(value, default):
    return default if value is None else value


def _names(config: RunConfig):
    """The preset and the canonical policy name; UsageError for unknown names."""
    from .models import MODEL_NAMES

    try:
        preset = get_preset(config.preset)
        policy = get_policy(config.policy).name
    except ValueError as error:
        raise UsageError(str(error)) from None
    if config.model not in MODEL_NAMES:
        raise UsageError(f"unknown model {config.model!r}; allowed values: {', '.join(MODEL_NAMES)}")
    check_data_name(config.data)
    if config.eval_on not in ("test", "val"):
        raise UsageError(f"eval_on={config.eval_on!r}: allowed values are test, val")
    return preset, policy


def _protocol(config: RunConfig, preset) -> tuple[int, int, int, int]:
    """(resolution, epochs, warm-up epochs, batch size), checked."""
    resolution = int(_pick(config.resolution, preset.resolution))
    epochs = int(_pick(config.epochs, preset.epochs))
    warmup = int(_pick(config.warmup_epochs, preset.warmup_epochs))
    batch = int(_pick(config.batch_size, preset.batch_size))
    for name, value, low in (("resolution", resolution, 8), ("epochs", epochs, 1),
                             ("warmup_epochs", warmup, 0), ("batch_size", batch, 1)):
        if value < low:
            raise UsageError(f"{name}={value}: allowed values are integers >= {low}")
    if warmup >= epochs and epochs > 1:
        raise UsageError(f"warmup_epochs={warmup}: allowed values are < epochs ({epochs})")
    return resolution, epochs, warmup, batch


def _learning_rate(config: RunConfig, preset, policy: str) -> tuple[float, str]:
    if config.lr is None:
        return preset.lr_for(config.model, policy)
    if not (isinstance(config.lr, (int, float)) and math.isfinite(config.lr) and config.lr > 0):
        raise UsageError(f"lr={config.lr!r}: allowed values are numbers > 0")
    return float(config.lr), "given (--lr)"


def _subset(value, default) -> int | None:
    """A subset size (None = the whole split; 0 means the same)."""
    value = _pick(value, default)
    if value is None or value == 0:
        return None
    if value < 0:
        raise UsageError(f"subset={value}: allowed values are integers >= 1, or 0 for all")
    return int(value)


def _budget(config: RunConfig, policy: str, resolution: int) -> dict:
    """keep_ratio / budget_units for convert(), or {} for the budgetless policies."""
    if policy in BUDGETLESS_POLICIES:
        return {}
    try:
        parsed = parse_budget(config.budget)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return budget_for_level(parsed["level"], config.model, resolution) \
        if "level" in parsed else parsed


def resolve(config: RunConfig) -> Settings:
    """Fill the preset's defaults in and check every value; raises UsageError."""
    preset, policy = _names(config)
    resolution, epochs, warmup, batch = _protocol(config, preset)
    lr, lr_source = _learning_rate(config, preset, policy)
    if not 0.0 < config.coverage <= 1.0:
        raise UsageError(f"coverage={config.coverage!r}: allowed values are in (0, 1]")
    train_subset = _subset(config.train_subset, preset.train_subset)
    test_subset = _subset(config.test_subset, preset.test_subset)
    val_subset = int(_pick(config.val_subset, preset.val_subset) or 0)
    if config.eval_on == "val" and val_subset <= 0:
        val_subset = 320
    score_batches = int(_pick(config.score_batches, preset.score_batches))
    for name, value in (("score_batches", score_batches), ("val_subset", config.val_subset),
                        ("max_batches", config.max_batches), ("threads", config.threads),
                        ("eval_every", config.eval_every)):
        if value is not None and value < 1:
            raise UsageError(f"{name}={value}: allowed values are integers >= 1")
    budget = _budget(config, policy, resolution)
    if config.track_updates and (preset.momentum or preset.weight_decay):
        raise UsageError(f"track_updates=True: allowed only with plain SGD (preset "
                         f"{preset.name!r} has momentum {preset.momentum}, weight decay "
                         f"{preset.weight_decay}): the sparse update is read off the weights")
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
