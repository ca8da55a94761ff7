"""Training presets and budget levels of the fine-tuning command.

``paper``: the TraDy paper's protocol (docs/METHOD.md section 6): SGD without momentum or weight
decay, lr 0.125, 5 warm-up epochs then cosine decay to 0, batch 32, 128x128 inputs, 50
epochs (the paper uses 50-200 by data set), the whole train and test splits.

``fast``: the same structure scaled down for a CPU: 40x40 inputs, a class-stratified subset
of 640 training and 1,000 test images, 5 epochs of which 1 warm-up, batch 32. (Not 32x32:
there EfficientNet-Lite0's last feature map is 1x1 and its pooled features collapse to
about 0: a linear probe on them is at chance on digits; at 40x40 it reaches 93 %.) The paper's
lr 0.125 diverges on these backbones (docs/METHOD.md section 6), so each (backbone, policy) gets
its own learning rate, chosen on a validation split held out of the training split (never
on the test split): see :data:`FAST_LRS` and docs/EXPERIMENTS.md for the command that chose
them.

Budget levels (``--budget small|medium|large``): the paper's three budgets. At the paper's
resolution (128) on one of the paper's backbones they are the paper's absolute budgets in
memory units; otherwise they are the paper's keep ratios (MobileNetV2-w0.35's budgets over
its full fine-tuning units: 2.23 %, 5.32 %, 7.48 %).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

BUDGET_LEVELS = ("small", "medium", "large")

# the paper's absolute budgets (memory units per sample at 128x128), docs/METHOD.md section 4
PAPER_BUDGET_UNITS = {
    "mcunet-in1": (15_936, 64_832, 112_640),
    "mbv2-w0.35": (27_946, 66_592, 93_696),
    "proxyless-w0.3": (25_984, 72_960, 101_376),
}
PAPER_FULL_UNITS = {"mcunet-in1": 1_309_808, "mbv2-w0.35": 1_252_320, "proxyless-w0.3": 1_162_032}
PAPER_RESOLUTION = 128

# keep ratios of the paper's MobileNetV2-w0.35 budgets (27,946 / 66,592 / 93,696 of 1,252,320)
KEEP_RATIOS = tuple(u / PAPER_FULL_UNITS["mbv2-w0.35"] for u in PAPER_BUDGET_UNITS["mbv2-w0.35"])

BUDGETLESS_POLICIES = ("classifier-only", "full")


@dataclass(frozen=True)
class Preset:
    """Every training setting a preset fixes (the command's options override them)."""

    name: str
    resolution: int
    epochs: int
    warmup_epochs: int
    batch_size: int
    lr: float                       # default learning rate when no per-policy rate applies
    momentum: float = 0.0
    weight_decay: float = 0.0
    train_subset: int | None = None    # None: the whole split
    test_subset: int | None = None
    val_subset: int = 0                # held-out images for --eval-on val (from the train split)
    score_batches: int = 4             # batches of full gradient for the DetRGN oracles
    threads: int | None = None         # torch CPU threads; None: torch's default
    description: str = ""
    lrs: dict = field(default_factory=dict)   # {model: {policy: lr}}

    def lr_for(self, model: str, policy: str) -> tuple[float, str]:
        """(learning rate, where it came from) for ``model`` trained with ``policy``."""
        table = self.lrs.get(model) or self.lrs.get("*") or {}
        if policy in table:
            if model in self.lrs:
                return table[policy], (f"preset {self.name}: per-policy rate for {model}, chosen "
                                       "on a validation split (docs/results/lr_search.json)")
            return table[policy], (f"preset {self.name}: per-policy default rate (not tuned "
                                   f"for {model})")
        return self.lr, f"preset {self.name}: default rate"

    def as_dict(self) -> dict:
        data = asdict(self)
        data.pop("lrs")
        return data


# Chosen on a validation split (320 images held out of the training split; the test split is
# never looked at) with the fast preset, seed 0, the medium budget, by
#   trady-experiments tune-lr --models mcunet-in1 efficientnet-lite0 --data digits
#       fashion-mnist --grid 0.002 0.005 0.01 0.02 0.05 0.1 --out runs/lr-search
#       --json docs/results/lr_search.json
# (the DetRGN rates re-chosen after the depthwise scoring fix: the same command with
# --policies d-detrgn s-detrgn, into a copy of runs/lr-search without its DetRGN runs)
# : per (backbone, policy) the rate with the best validation accuracy averaged over digits and
# Fashion-MNIST (docs/results/lr_search.json has every figure). "*" serves other backbones.
FAST_LRS: dict[str, dict[str, float]] = {
    "efficientnet-lite0": {"d-topk": 0.05, "s-topk": 0.02, "d-fullrandom": 0.05,
                           "s-fullrandom": 0.1, "d-detrgn": 0.01, "s-detrgn": 0.01,
                           "classifier-only": 0.05, "full": 0.005},
    "mcunet-in1": {"d-topk": 0.01, "s-topk": 0.01, "d-fullrandom": 0.02, "s-fullrandom": 0.02,
                   "d-detrgn": 0.002, "s-detrgn": 0.005, "classifier-only": 0.02, "full": 0.002},
    "*": {"d-topk": 0.01, "s-topk": 0.01, "d-fullrandom": 0.02, "s-fullrandom": 0.02,
          "d-detrgn": 0.002, "s-detrgn": 0.005, "classifier-only": 0.02, "full": 0.002},
}

PRESETS: dict[str, Preset] = {
    "paper": Preset(
        name="paper", resolution=128, epochs=50, warmup_epochs=5, batch_size=32, lr=0.125,
        score_batches=8, val_subset=0,
        description="the paper's protocol: SGD (no momentum, no weight decay), lr 0.125, "
                    "5 warm-up epochs + cosine to 0, batch 32, 128x128, 50 epochs, whole splits"),
    "fast": Preset(
        name="fast", resolution=40, epochs=5, warmup_epochs=1, batch_size=32, lr=0.02,
        train_subset=640, test_subset=1000, val_subset=320, score_batches=2, lrs=FAST_LRS,
        threads=1,
        description="CPU scale, same structure: SGD (no momentum), per-policy lr tuned on a "
                    "validation split, 1 warm-up epoch + cosine to 0, batch 32, 40x40, 5 epochs, "
                    "640 training / 1,000 test images"),
}
DEFAULT_PRESET = "fast"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r}: allowed values are {', '.join(PRESETS)}")
    return PRESETS[name]


def with_lrs(preset: Preset, lrs: dict) -> Preset:
    return replace(preset, lrs=lrs)


def budget_for_level(level: str, model: str, resolution: int) -> dict:
    """``{"keep_ratio": r}`` or ``{"budget_units": u}`` for a named budget level."""
    if level not in BUDGET_LEVELS:
        raise ValueError(f"budget level {level!r}: allowed values are {', '.join(BUDGET_LEVELS)}")
    index = BUDGET_LEVELS.index(level)
    if model in PAPER_BUDGET_UNITS and resolution == PAPER_RESOLUTION:
        return {"budget_units": PAPER_BUDGET_UNITS[model][index]}
    return {"keep_ratio": KEEP_RATIOS[index]}


def parse_budget(text: str) -> dict:
    """The command's ``--budget``: a level, a keep ratio in (0, 1], a percentage, or units.

    Returns ``{"level": ...}``, ``{"keep_ratio": ...}`` or ``{"budget_units": ...}``.
    Raises ValueError with the allowed forms for anything else.
    """
    allowed = ("allowed values: small, medium, large (the paper's budgets), a keep ratio in "
               "(0, 1] such as 0.05, a percentage in (0, 100] such as 5%, or memory units per "
               "sample such as 15936u")
    raw = str(text).strip().lower()
    if raw in BUDGET_LEVELS:
        return {"level": raw}
    try:
        if raw.endswith("%"):
            value = float(raw[:-1]) / 100.0
            kind = "keep_ratio"
        elif raw.endswith("units") or raw.endswith("u"):
            number = raw[:-5] if raw.endswith("units") else raw[:-1]
            value = float(number.replace(",", "").replace("_", "").strip())
            kind = "budget_units"
        else:
            value = float(raw)
            kind = "keep_ratio"
    except ValueError:
        raise ValueError(f"budget {text!r} is not understood; {allowed}") from None
    if value != value or value <= 0:          # NaN or not positive
        raise ValueError(f"budget {text!r} must be positive; {allowed}")
    if kind == "keep_ratio":
        if value > 1.0:
            raise ValueError(f"budget {text!r} is more than the whole network (keep ratio > 1); "
                             f"{allowed}")
        return {"keep_ratio": value}
    if value != int(value):
        raise ValueError(f"budget {text!r}: memory units must be a whole number; {allowed}")
    return {"budget_units": int(value)}
