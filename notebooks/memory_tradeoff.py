# %% [markdown]
# # Accuracy against measured memory
#
# Every policy and budget of the experiment runner (`trady-experiments sweep`, one JSON record
# per run), with full fine-tuning and classifier-only training as the two ends. Memory is what
# autograd really keeps for backward, measured on the first batch of each epoch
# (`saved_tensor_bytes`; the runner checks it against the cost model), not the paper's
# simulated units. The dotted vertical line is plain PyTorch full fine-tuning of the same
# backbone, measured the same way.
#
# In the small (CI) mode the notebook first runs a handful of one-step fine-tunings with the
# runner itself into a temporary folder, so that the rendering below is exercised; in the full
# mode it reads the records of the committed sweep (the folder in `RECORDS_DIR`, or, when that
# is absent, the summary JSON the runner writes with `summarize --json`) and renders whatever
# exists.

# %% tags=["parameters"]
import os

MODE = os.environ.get("TRADY_NOTEBOOK_MODE", "full")   # "small" (CI) or "full"
RECORDS_DIR = "../runs/sweep"                      # relative to notebooks/
SUMMARY_JSON = "../docs/results/summary.json"      # used when RECORDS_DIR holds no records
LONG_RUNS_JSONL = "../docs/results/long_horizon_runs.jsonl"     # the 30-epoch experiment
LONG_SUMMARY_JSON = "../docs/results/long_horizon_summary.json"
LONG_PLOT_PNG = "../docs/results/long_horizon.png"   # written in the full mode, for the docs
SMALL_RUNS = dict(models=["mcunet-in1"], datasets=["digits"],
                  policies=["d-topk", "s-topk", "classifier-only", "full"],
                  budgets=["small", "large"], seeds=[0],
                  settings=dict(epochs=1, warmup_epochs=0, train_subset=32, test_subset=32,
                                resolution=32, max_batches=1))

# %%
import json
import tempfile
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from trady_triton import analysis as A
from trady_triton import experiments as E

warnings.filterwarnings("ignore", message="no layer ranking")
plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3})

if MODE == "small":
    source = Path(tempfile.mkdtemp(prefix="trady-records-"))
    jobs = E.plan(SMALL_RUNS["models"], SMALL_RUNS["datasets"], SMALL_RUNS["policies"],
                  SMALL_RUNS["budgets"], SMALL_RUNS["seeds"])
    E.run_jobs(jobs, source, preset="fast", threads=None, extra=SMALL_RUNS["settings"],
               log=lambda message: None)
else:
    source = Path(RECORDS_DIR)

records = E.load_records(source) if source.exists() else []
if records:
    summary = E.summarize_records(records)
    origin = f"{len(records)} complete records under {source}"
elif Path(SUMMARY_JSON).exists():
    summary = json.loads(Path(SUMMARY_JSON).read_text())
    origin = f"the summary {SUMMARY_JSON} ({summary.get('runs', '?')} runs)"
else:
    summary = {"rows": [], "comparisons": []}
    origin = f"nothing: no records under {source} and no {SUMMARY_JSON}"
rows = summary["rows"]
print(f"read {origin}: {len(rows)} (model, data, policy, budget) groups")

# %% [markdown]
# ## Accuracy against memory saved for backward

# %%
panels = sorted({(r["model"], r["data"]) for r in rows})
if not panels:
    print("No experiment records to plot yet: run `trady-experiments sweep ... --out "
          f"{RECORDS_DIR.removeprefix('../')}` (or point RECORDS_DIR at its output) and re-run.")
else:
    cols = min(2, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(7.2 * cols, 4.6 * nrows), squeeze=False)
    for ax, (model, data) in zip(axes.flat, panels):
        sub = [r for r in rows if r["model"] == model and r["data"] == data]
        for policy in E.SWEEP_POLICIES:
            pts = sorted((r for r in sub if r["policy"] == policy),
                         key=lambda r: r["saved_bytes_measured"] or 0)
            if not pts:
                continue
            style = dict(A.POLICY_STYLE[policy])
            label = style.pop("label")
            x = [r["saved_bytes_measured"] / 2 ** 20 for r in pts]
            y = [100 * r["accuracy"]["mean"] for r in pts]
            yerr = [100 * r["accuracy"].get("std", 0.0) for r in pts]
            n = max(r["accuracy"]["n"] for r in pts)
            ax.errorbar(x, y, yerr=yerr, capsize=3, ms=8 if policy in ("full", "classifier-only") else 6,
                        label=f"{label} (n={n})", **style)
        plain = sub[0]["plain_full_finetune_bytes"] / 2 ** 20
        ax.axvline(plain, color="k", ls=":", lw=1, label=f"plain PyTorch full FT ({plain:.1f} MiB)")
        ax.set_xscale("log")
        ax.set_xlabel("memory saved for backward at batch 32 (MiB, measured, log scale)")
        ax.set_ylabel("top-1 test accuracy (%)")
        ax.set_title(f"{model} on {data} ({sub[0]['resolution']}px, {sub[0]['epochs']} epochs, "
                     f"{sub[0]['train_size']} train / {sub[0]['eval_size']} test images)",
                     fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Accuracy against measured memory: every policy and budget "
                 "(error bars: sample std over seeds)")
    fig.tight_layout()
    plt.show()

# %% [markdown]
# ## Accuracy against the budget in memory units

# %%
if panels:
    fig, axes = plt.subplots(nrows, cols, figsize=(7.2 * cols, 4.2 * nrows), squeeze=False)
    for ax, (model, data) in zip(axes.flat, panels):
        sub = [r for r in rows if r["model"] == model and r["data"] == data]
        for policy in E.SWEEP_POLICIES:
            pts = sorted((r for r in sub if r["policy"] == policy and r["budget_fraction"]),
                         key=lambda r: r["budget_fraction"])
            if not pts:
                continue
            ax.errorbar([100 * r["budget_fraction"] for r in pts],
                        [100 * r["accuracy"]["mean"] for r in pts],
                        yerr=[100 * r["accuracy"].get("std", 0.0) for r in pts], capsize=3,
                        **A.POLICY_STYLE[policy])
        for policy, ls in (("full", "-"), ("classifier-only", "--")):
            end = next((r for r in sub if r["policy"] == policy), None)
            if end:
                ax.axhline(100 * end["accuracy"]["mean"], color=A.POLICY_STYLE[policy]["color"],
                           ls=ls, lw=1, label=A.POLICY_STYLE[policy]["label"])
        ax.set_xlabel("budget (% of full fine-tuning's memory units)")
        ax.set_ylabel("top-1 test accuracy (%)")
        ax.set_title(f"{model} on {data}", fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Accuracy against the memory budget (the ends as horizontal lines)")
    fig.tight_layout()
    plt.show()

# %% [markdown]
# ## Numbers

# %%
table = [{"model": r["model"], "data": r["data"], "policy": r["policy"], "budget": r["budget"],
          "units %": None if r["budget_fraction"] is None else 100 * r["budget_fraction"],
          "acc %": 100 * r["accuracy"]["mean"], "sd": 100 * r["accuracy"].get("std", 0.0),
          "n": r["accuracy"]["n"], "saved MiB": r["saved_bytes_measured"] / 2 ** 20,
          "vs plain full %": 100 * r["saved_bytes_measured"] / r["plain_full_finetune_bytes"],
          "act. sparsity %": 100 * r["activation_sparsity"], "lr": r["lr"],
          "diverged": r["diverged_seeds"]} for r in rows]
if table:
    print(A.format_table(table, list(table[0]), {"units %": ".2f", "acc %": ".1f", "sd": ".1f",
                                                "saved MiB": ".3f", "vs plain full %": ".1f",
                                                "act. sparsity %": ".1f"}))
comps = [c for c in summary.get("comparisons", []) if c["diff"].get("n")]
if comps:
    print("\nPaired differences (same seed), accuracy points:")
    print(A.format_table([{"model": c["model"], "data": c["data"], "budget": c["budget"],
                           "comparison": f"{c['a']} - {c['b']}", "mean": 100 * c["diff"]["mean"],
                           "sd": 100 * c["diff"]["std"], "wins": f"{c['wins']}/{c['diff']['n']}"}
                          for c in comps],
                         ["model", "data", "budget", "comparison", "mean", "sd", "wins"],
                         {"mean": "+.1f", "sd": ".1f"}))

# %% [markdown]
# ## Dynamic against static over 30 epochs: accuracy, coverage and the Eq. 9 cosine
#
# The long-horizon experiment of docs/EXPERIMENTS.md (MCUNet-in1 and MobileNetV2-w0.35 at the
# paper's smallest budget, 64 px, 30 epochs, 5 seeds, Fashion-MNIST and MNIST), read from its
# committed one-line-per-run file in both modes. Top: paired accuracy difference (same seed)
# with its 95 % t interval. Middle and bottom: per epoch, mean over seeds and both data sets,
# the share of the top-K pool's channels trained so far (coverage) and the cosine between the
# sparse and the full update summed from the first epoch.

# %%
long_lines = [json.loads(line) for line in Path(LONG_RUNS_JSONL).read_text().splitlines()] \
    if Path(LONG_RUNS_JSONL).exists() else []
long_summary = json.loads(Path(LONG_SUMMARY_JSON).read_text()) \
    if Path(LONG_SUMMARY_JSON).exists() else {"comparisons": []}
if not long_lines:
    print(f"no {LONG_RUNS_JSONL}: run scripts/long_horizon.sh, then summarize (docs/EXPERIMENTS.md)")
else:
    long_models = sorted({line["model"] for line in long_lines})
    fig, axes = plt.subplots(3, len(long_models), figsize=(6.4 * len(long_models), 10.5),
                             squeeze=False)
    pairs = [("d-topk", "s-topk"), ("d-fullrandom", "s-fullrandom"), ("d-topk", "d-fullrandom")]
    styles = {"d-topk": ("C0", "-"), "s-topk": ("C0", "--"), "d-fullrandom": ("C1", "-"),
              "s-fullrandom": ("C1", "--")}
    for col, model in enumerate(long_models):
        ax = axes[0, col]
        comps = [c for c in long_summary["comparisons"] if c["model"] == model
                 and (c["a"], c["b"]) in pairs and c.get("stats", {}).get("ci_low") is not None]
        for i, c in enumerate(comps):
            st = c["stats"]
            ax.errorbar(100 * st["mean"], i, xerr=[[100 * (st["mean"] - st["ci_low"])],
                        [100 * (st["ci_high"] - st["mean"])]], fmt="o", capsize=3)
        ax.set_yticks(range(len(comps)),
                      [f"{c['a']} − {c['b']}\n{c['data']}" for c in comps], fontsize=7)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel("paired accuracy difference, points (95 % t interval)")
        ax.set_title(model)
        for row, key, label in ((1, "coverage", "pool coverage"),
                                (2, "cosine_cum", "cosine, sums from epoch 1")):
            ax = axes[row, col]
            curves = E.mean_curves([l for l in long_lines if l["model"] == model], key)
            for policy, (color, dash) in styles.items():
                per_data = [v for (m, d, p, b), v in curves.items() if p == policy]
                if per_data:
                    ax.plot(range(1, len(per_data[0]) + 1), np.mean(per_data, axis=0),
                            color=color, ls=dash, label=policy)
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
    fig.tight_layout()
    if MODE == "full":
        fig.savefig(LONG_PLOT_PNG, dpi=80)
    plt.show()

# %% [markdown]
# ## Reading (full mode, on our data)
#
# Numbers from the full mode as built: the runner's complete sweep (240 records: MCUNet-in1
# and EfficientNet-Lite0, digits and Fashion-MNIST, 8 policies, 3 budgets, 3 seeds; fast
# preset: 40 px, 640 training images, 5 epochs, per-policy learning rates tuned on a
# validation split). Memory is what autograd keeps for backward at batch 32.
#
# - **The memory saving is real and large.** TraDy (D-TopK) at the paper's smallest budget
#   keeps 0.20 MiB on MCUNet-in1 (0.9 % of the 21.5 MiB that plain PyTorch full fine-tuning
#   keeps) and 1.7 MiB on EfficientNet-Lite0 (1.8 % of 94.1 MiB). Full fine-tuning through
#   the converted layers keeps 12.0 and 33.3 MiB; classifier-only keeps 0.02 and 0.16 MiB.
# - **At equal budget units, TopK uses less measured memory on MCUNet-in1: 2.5-4x less than
#   FullRandom or DetRGN** (large budget: 0.41 MiB vs 1.08-1.16 / 1.46-1.61 MiB). On
#   EfficientNet-Lite0 it is on a par with FullRandom and 1.8-2.5x below DetRGN. The budget counts the
#   selected channels' units. The measurement also counts the 1-bit ReLU masks from the
#   earliest trained layer onwards, and the whole-network policies train some channel early in
#   the net. On MCUNet-in1, whose top-K layers are all late, restricting the draw to them
#   therefore pays twice.
# - **Accuracy: sparse training reaches full fine-tuning, but at this scale it is hard to beat
#   the classifier alone.** MCUNet-in1: D-TopK 83.3-86.0 % on digits (full FT 83.8,
#   classifier only 80.9) and 74.5-75.8 % on Fashion-MNIST (full FT 76.5, classifier only
#   75.8). EfficientNet-Lite0: D-TopK 88.6-91.7 % on digits (full FT 90.3, classifier only
#   85.5) and 77.5-79.4 % on Fashion-MNIST (full FT 78.6, classifier only 72.8). There the
#   backbone updates are worth 5-6 points. The paper reports 2-3 points below full
#   fine-tuning at 128 px and 50+ epochs. Our runs are at 40 px and 5 epochs, where full
#   fine-tuning itself gains little.
# - **Dynamic vs static: no consistent effect.** The paired difference D-TopK - S-TopK is
#   +1.4 to +1.6 points on EfficientNet-Lite0 / Fashion-MNIST (8 of 9 seeds) and +1.9 on its
#   digits small budget. It is 0.0 to -1.8 on MCUNet-in1 / digits and within +-0.5 on
#   MCUNet-in1 / Fashion-MNIST. The paper's "every dynamic variant beats its static twin" (by
#   about 1 point) shows only on EfficientNet-Lite0 / Fashion-MNIST. Elsewhere the effect is
#   inside the seed spread of 3 seeds.
# - **DetRGN is far worse than TraDy on MCUNet-in1** (D-TopK ahead by 5.7 to 17.5 points per
#   cell, in every seed) and on a par with it on EfficientNet-Lite0 (-1.0 to +0.6). The paper
#   has it within 0.3 points. These DetRGN rows were re-run after fixing
#   `TraDyController.score_channels`, which had scored only channel 0 of each depthwise conv;
#   the fix lifted DetRGN on EfficientNet-Lite0 to TraDy's level but not on MCUNet-in1 (see
#   docs/EXPERIMENTS.md for the reading).
