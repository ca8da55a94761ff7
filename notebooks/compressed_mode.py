# %% [markdown]
# # Compressed mode: how close are k-bit backward codes to the exact gradient?
#
# `convert(..., backward_bits=k)` lets the modules behind the earliest trained layer keep
# k-bit codes instead of what their exact backward needs (`trady_triton/compressed.py`: the
# derivative of SiLU/GELU/Hardswish, a squeeze-excitation's x, LayerNorm's input, attention's
# packed qkv). This notebook measures, per trained layer, the cosine between the weight
# gradient of compressed mode and that of exact mode (same channels, same batch), for
# k = 8, 4, 2:
#
# * on the two small nets pretrained here on Fashion-MNIST (a MobileNetV3-Small at width 0.5
#   and a 3-layer ViT with patch 4, 32x32 inputs; `trady_triton/compressed_experiment.py`),
#   with their fine-tuning data (MNIST) and the fine-tuning experiment's budget and ranking;
# * on random-init MobileNetV3-Small, EfficientNet-B0 and ViT-Tiny at their full size.
#
# It then shows the accuracy effect, read from the experiment's two committed summaries
# (`docs/results/compressed_accuracy.json`: the short plan, every bit width;
# `docs/results/compressed_accuracy_converged.json`: `--plan converged`, searched rates and
# 6 epochs, exact / 4 bits / full fine-tuning; both written by `trady-experiments
# compressed`); the notebook never re-runs the fine-tuning. Small mode (CI) pretrains tiny versions for one
# short epoch and shrinks the random-init nets: its numbers are meaningless.

# %% tags=["parameters"]
import os

MODE = os.environ.get("TRADY_NOTEBOOK_MODE", "full")   # "small" (CI) or "full"
CACHE_DIR = "../runs/compressed"                        # pretrained nets (full mode)
ACCURACY_JSONS = {"short plan": "../docs/results/compressed_accuracy.json",
                  "converged plan": "../docs/results/compressed_accuracy_converged.json"}
BITS = (8, 4, 2)
RANDOM_INIT_KEEP = 0.1        # random init: no ranking, so d-topk draws from every layer
BATCH = 32 if MODE == "full" else 8

# %%
import copy
import dataclasses
import json
import tempfile
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display

from trady_triton import compressed_experiment as CE
from trady_triton.models.efficientnet_b0 import EfficientNetB0
from trady_triton.models.mobilenetv3 import MobileNetV3Small
from trady_triton.models.transformers import VisionTransformer

warnings.filterwarnings("ignore", message="no layer ranking")
plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3})
torch.set_num_threads(2)

plan = CE.Plan() if MODE == "full" else dataclasses.replace(CE.TINY, nets=tuple(CE.NETS))
cache = Path(CACHE_DIR) if MODE == "full" else Path(tempfile.mkdtemp(prefix="trady-compressed-"))
train = CE.load_split(plan.finetune_data, "train", plan, plan.finetune_images)
x, y = train[0][:BATCH], train[1][:BATCH]

# %% [markdown]
# ## Per layer, on the nets pretrained here (the fine-tuning experiment's budget and ranking)

# %%
cosines = {}     # net label -> bits -> {layer: cosine}
for name in plan.nets:
    pretrained = CE.pretrain(name, plan, cache, log=print)
    ranking = CE.layer_ranking(name, pretrained, plan, train, cache)
    net = CE.with_fresh_classifier(pretrained, 0)
    cosines[f"{name} (pretrained)"] = {bits: CE.gradient_cosines(net, x, y, bits, plan, ranking)
                                       for bits in BITS}

# %% [markdown]
# ## Per layer, random-init architectures at full size

# %%
if MODE == "full":
    RANDOM_INIT = {"MobileNetV3-Small 96": (MobileNetV3Small, (4, 3, 96, 96)),
                   "EfficientNet-B0 96": (EfficientNetB0, (4, 3, 96, 96)),
                   "ViT-Tiny 224": (VisionTransformer, (4, 3, 224, 224))}
else:
    RANDOM_INIT = {"MobileNetV3-Small w0.25 32": (lambda num_classes: MobileNetV3Small(
                       num_classes, width_mult=0.25), (2, 3, 32, 32)),
                   "EfficientNet-B0 w0.25 32": (lambda num_classes: EfficientNetB0(
                       num_classes, width_mult=0.25), (2, 3, 32, 32)),
                   "ViT 2x32 32": (lambda num_classes: VisionTransformer(
                       num_classes, image_size=32, patch=8, dim=32, depth=2, heads=2),
                       (2, 3, 32, 32))}
random_plan = dataclasses.replace(plan, keep_ratio=RANDOM_INIT_KEEP)
for label, (make, shape) in RANDOM_INIT.items():
    torch.manual_seed(0)
    net = make(num_classes=10).eval()
    images, labels = torch.randn(shape), torch.randint(0, 10, (shape[0],))
    cosines[f"{label} (random init)"] = {
        bits: CE.gradient_cosines(net, images, labels, bits, random_plan) for bits in BITS}

# %%
fig, axes = plt.subplots(len(cosines), 1, figsize=(9, 2.4 * len(cosines)), squeeze=False)
for ax, (label, by_bits) in zip(axes[:, 0], cosines.items()):
    for bits, per_layer in by_bits.items():
        ax.plot(range(len(per_layer)), list(per_layer.values()), marker=".", label=f"{bits} bits")
    ax.axhline(0.99, color="k", linestyle=":", linewidth=1)
    ax.set_title(label, fontsize=10)
    ax.set_ylabel("cosine with exact")
    ax.set_ylim(max(-0.2, min(min(v.values()) for v in by_bits.values()) - 0.02), 1.005)
axes[-1, 0].set_xlabel("trained layer (forward order)")
axes[0, 0].legend(fontsize=8, loc="lower left")
fig.tight_layout()
plt.show()

# %%
lines = ["| net | bits | trained layers | min cosine | layers >= 0.99 |", "|---|---|---|---|---|"]
for label, by_bits in cosines.items():
    for bits, per_layer in by_bits.items():
        values = list(per_layer.values())
        lines.append(f"| {label} | {bits} | {len(values)} | {min(values):.4f} | "
                     f"{sum(v >= 0.99 for v in values)}/{len(values)} |")
display(Markdown("\n".join(lines)))

# %% [markdown]
# ## Accuracy effect (read from the committed experiment, not re-run)

# %%
def read_summary(path: str) -> dict | None:
    """The experiment's committed summary, or None (with a hint) when it is absent."""
    if not Path(path).is_file():
        print(f"no {path}: run `trady-experiments compressed --json ...` first")
        return None
    return json.loads(Path(path).read_text())


summaries = {plan: read_summary(path) for plan, path in ACCURACY_JSONS.items()}
summaries = {plan: summary for plan, summary in summaries.items() if summary is not None}
for plan, summary in summaries.items():
    display(Markdown(f"### {plan}\n\n`{summary.get('command', '')}`\n\n"
                     + CE.format_markdown(summary)))


# %%
def plot_accuracies(ax, summary: dict, net: str, title: str) -> None:
    """Every seed's test accuracy per setting (dots) and the mean +- std (red square)."""
    rows = [r for r in summary["rows"] if r["net"] == net]
    for i, row in enumerate(rows):
        seeds = [100 * a for a in row["accuracy_per_seed"]]
        ax.plot([i] * len(seeds), seeds, "o", alpha=0.5, color="C0")
        ax.errorbar(i + 0.15, 100 * row["accuracy"]["mean"], yerr=100 * row["accuracy"]["std"],
                    fmt="s", color="C3", capsize=3)
    ax.set_xticks(range(len(rows)), [CE.setting_label(r["setting"]).replace("TraDy ", "")
                                     for r in rows], fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(f"{summary['plan']['finetune_data']} test accuracy %")


if summaries:
    nets = {plan: list(dict.fromkeys(r["net"] for r in summary["rows"]))
            for plan, summary in summaries.items()}
    columns = max(len(names) for names in nets.values())
    fig, axes = plt.subplots(len(summaries), columns, figsize=(5 * columns, 3.2 * len(summaries)),
                             squeeze=False)
    for row_axes, (plan, summary) in zip(axes, summaries.items()):
        for ax, net in zip(row_axes, nets[plan]):
            plot_accuracies(ax, summary, net, f"{net}, {plan}")
        for ax in row_axes[len(nets[plan]):]:
            ax.axis("off")
    fig.tight_layout()
    plt.show()

# %% [markdown]
# ## Reading (full mode)
#
# * **4 bits meets the per-layer target (cosine >= 0.99) on four of the five nets, not on the
#   pretrained MobileNetV3**: worst 0.9987 (pretrained ViT) and 1.0000 / 0.9999 / 0.9955 on
#   random-init MobileNetV3-Small / EfficientNet-B0 / ViT-Tiny, but on the pretrained
#   MobileNetV3 (23 trained layers) 21 of 23 layers, worst 0.985. The two below 0.99 are
#   early depthwise convs (features.2-3 and 9), whose gradient comes back through every later
#   block's 4-bit Hardswish codes; with every other code exact and only the Hardswish ones at
#   4 bits the worst layer is the same 0.981-0.985, so those codes are the cause. Giving the
#   codes' exact slopes 0 and 1 levels of their own did not help (0.9807 -> 0.9810).
#   An earlier build of this notebook showed 16 trained layers, worst 0.991: it read a
#   ranking from an older cache, keyed without the images it was computed on (which ones is
#   not recorded); ranked afresh on the plan's images the same net has 23. The cache key now
#   hashes the ranking's images and labels (`compressed_experiment.layer_ranking`). 8 bits is
#   >= 0.999 throughout.
# * **2 bits does not**: 0.98-0.99 worst layers on the random-init CNNs, 0.89 on ViT-Tiny
#   (18 of 49 layers >= 0.99), and on the pretrained MobileNetV3 a worst layer at 0.79 (1 of
#   23 layers >= 0.99).
# * The accuracy table agrees: 8 and 4 bits are within exact mode's seed spread on both nets
#   (ViT: -0.02 and +0.03 points); 2 bits too, but with 3 seeds and MobileNetV3's 9-point seed
#   spread that test is weak (docs/EXPERIMENTS.md, "Compressed mode: the accuracy effect").
# * The converged plan (searched rates, 6 epochs, 5 seeds) settles it for 4 bits: same-seed
#   differences against exact mode of +0.17 points on the ViT (95 % t interval [-0.46, +0.80])
#   and -0.69 on MobileNetV3 ([-2.37, +0.99]); both intervals hold 0 and lie within one exact
#   std (2.65 / 1.82 points). There full fine-tuning is 21.5 points above TraDy on MobileNetV3
#   and level with it on the ViT (docs/EXPERIMENTS.md, "Compressed mode, converged plan").
# * One batch, one channel draw per net: the cosines are of one gradient, not an average.
