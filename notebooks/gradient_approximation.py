# %% [markdown]
# # How well does a sparse channel update approximate the full gradient?
#
# TraDy's argument (paper, Eq. 9): re-drawing the trained channels uniformly at random every
# epoch makes the *sum* of the sparse updates approach the sum of the full-gradient updates,
# which a static choice cannot do. Here we measure it on the paper's MCUNet-in1 and on
# EfficientNet-Lite0, both with ImageNet weights, fine-tuned on Fashion-MNIST, for the six
# channel policies of the paper at the same memory budget:
# S-/D- (static / re-drawn every epoch) x FullRandom / TopK (TraDy = D-TopK) / DetRGN.
#
# **What is measured.** At each SGD step `t` one backward gives the full weight gradient `g_t`
# of every body layer (all input channels); the policy trains with `m_e * g_t`, where `m_e`
# masks the input channels drawn for epoch `e` (the classifier is trained in full by every
# policy and left out of all figures). Both updates are accumulated at the *same iterates*:
#
#     U_sparse(T) = sum_{t<=T} lr_t * m_e(t) * g_t        U_full(T) = sum_{t<=T} lr_t * g_t
#
# and we report, at the end of each epoch, `cos(U_sparse, U_full)`, the relative error
# `||U_sparse - U_full|| / ||U_full||`, and the mean per-step cosine `cos(m_e * g_t, g_t)`.
# Because the first epoch's gradients (fresh classifier, warm-up) can dwarf the later ones, we
# also report the accumulated cosine with each epoch's pair of updates divided by the norm of
# that epoch's full update (`cos_cum_unit`: every epoch weighs the same), which isolates the
# mechanism of Eq. 9 (re-drawn channels cover more of the full update over epochs).
# (Masking the full gradient is exactly what the converted layers compute:
# `tests/test_analysis.py` checks it.) The top-K layers of TopK come from `rank_layers` on a
# *proxy* data set (MNIST), as the paper ranks once per architecture on a proxy task.
#
# **Over budgets**, the on-trajectory runs would be too many for a CPU, so the budget sweep
# replays the policies' draws over the gradients recorded along one full fine-tuning run
# (`analysis.reference_trajectory` / `replay_selection`): the same quantities, but at the
# iterates of full fine-tuning rather than the policy's own.

# %% tags=["parameters"]
import os

MODE = os.environ.get("TRADY_NOTEBOOK_MODE", "full")   # "small" (CI) or "full"
PARAMS = {
    "small": dict(models=["mcunet-in1", "efficientnet-lite0"], data="fashion-mnist",
                  proxy="mnist", resolution={"mcunet-in1": 32, "efficientnet-lite0": 48},
                  train_subset=32, test_subset=32, epochs=2, batch_size=32, rank_steps=2,
                  sweep_epochs=2, sweep_ratios=[0.0223, 0.0748],
                  policies=["d-topk", "s-topk", "d-detrgn"]),
    "full": dict(models=["mcunet-in1", "efficientnet-lite0"], data="fashion-mnist",
                 proxy="mnist", resolution={"mcunet-in1": 64, "efficientnet-lite0": 48},
                 train_subset=192, test_subset=500, epochs=5, batch_size=32, rank_steps=10,
                 sweep_epochs=5, sweep_ratios=[0.01, 0.0223, 0.0532, 0.0748, 0.15, 0.30],
                 policies=["d-topk", "s-topk", "d-fullrandom", "s-fullrandom", "d-detrgn",
                           "s-detrgn"]),
}[MODE]
# EfficientNet-Lite0 needs >= 48 px: at 32 px its last feature map is 1x1 and almost all zero
# after ReLU6 on these grey images, so no gradient reaches its body.
POLICIES = PARAMS["policies"]
SEED = 0

# %%
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch

from trady_triton import analysis as A
from trady_triton.presets import KEEP_RATIOS

warnings.filterwarnings("ignore", message="no layer ranking")
plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3})
torch.manual_seed(SEED)
BUDGET = KEEP_RATIOS[0]   # the paper's smallest budget, as a share of full fine-tuning's units
print(f"mode {MODE}; main budget: keep ratio {BUDGET:.4f} of full fine-tuning's memory units")

# %% [markdown]
# ## Tasks and proxy rankings

# %%
tasks, rankings = {}, {}
for name in PARAMS["models"]:
    res = PARAMS["resolution"][name]
    tasks[name] = A.load_task(name, PARAMS["data"], res, PARAMS["train_subset"],
                              PARAMS["test_subset"], seed=SEED)
    proxy = A.load_task(name, PARAMS["proxy"], res, PARAMS["rank_steps"] * PARAMS["batch_size"],
                        0, seed=SEED)
    rankings[name] = A.proxy_ranking(proxy, PARAMS["rank_steps"], PARAMS["batch_size"])
    top = rankings[name].top_k(0.97)
    print(f"{name} @ {res}px: {len(tasks[name].train_x)} train / {len(tasks[name].test_x)} test "
          f"images of {PARAMS['data']}; ranking on {PARAMS['proxy']} "
          f"({PARAMS['rank_steps']} steps): top-K = {len(top)} of {len(rankings[name].scores)} layers")

# %% [markdown]
# ## Every policy on its own trajectory, at the paper's smallest budget

# %%
rows = {}
for name, task in tasks.items():
    for policy in POLICIES:
        started = time.perf_counter()
        rows[name, policy] = A.track_sparse_training(
            task, policy, keep_ratio=BUDGET, ranking=rankings[name], epochs=PARAMS["epochs"],
            batch_size=PARAMS["batch_size"], seed=SEED)
        last = rows[name, policy][-1]
        print(f"{name:18s} {policy:13s} cos {last['cos_cum']:.3f}  rel.err {last['relerr_cum']:.3f}"
              f"  step cos {last['step_cos']:.3f}  coverage {last['coverage']:.3f}"
              f"  acc {last['test_accuracy']:.3f}  lr {last['lr']:g}  ({time.perf_counter() - started:.0f} s)")

# %%
metrics = [("cos_cum", "cosine", "accumulated update: cos(sparse, full)"),
           ("cos_cum_unit", "cosine", "accumulated, epochs weighed equally"),
           ("relerr_cum", "relative error", "accumulated: |sparse - full| / |full|"),
           ("step_cos", "cosine", "per step: mean cos(m*g, g)"),
           ("test_accuracy", "accuracy (fraction)", "test accuracy")]
fig, axes = plt.subplots(len(tasks), len(metrics), figsize=(3.7 * len(metrics), 3.4 * len(tasks)),
                         squeeze=False)
for i, name in enumerate(tasks):
    for j, (key, ylabel, title) in enumerate(metrics):
        ax = axes[i, j]
        for policy in POLICIES:
            r = rows[name, policy]
            ax.plot([x["epoch"] for x in r], [x[key] for x in r], **A.POLICY_STYLE[policy])
        ax.set_xlabel("epoch")
        ax.set_xticks(range(1, PARAMS["epochs"] + 1))
        ax.set_ylabel(ylabel + ("" if "fraction" in ylabel else " (unitless)"))
        ax.set_title(f"{name} @ {tasks[name].resolution}px\n{title}", fontsize=9)
axes[0, 0].legend(fontsize=8)
fig.suptitle(f"Sparse vs full-gradient update on {PARAMS['data']}, budget {100 * BUDGET:.2f}% "
             f"of full fine-tuning's memory units (on each policy's own trajectory)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Over budgets (replayed along full fine-tuning's gradients)

# %%
trajectories, sweep = {}, {}
for name, task in tasks.items():
    started = time.perf_counter()
    trajectories[name] = A.reference_trajectory(
        task, policy="full", ranking=rankings[name], epochs=PARAMS["sweep_epochs"],
        batch_size=PARAMS["batch_size"], seed=SEED)
    for policy in POLICIES:
        for ratio in PARAMS["sweep_ratios"]:
            sweep[name, policy, ratio] = A.replay_selection(trajectories[name], policy, ratio, SEED)
    print(f"{name}: reference trajectory + replays in {time.perf_counter() - started:.0f} s")

# %%
sweep_metrics = [("cos_cum", "cosine (unitless)", "accumulated update: cos(sparse, full)"),
                 ("cos_cum_unit", "cosine (unitless)", "accumulated, epochs weighed equally"),
                 ("relerr_cum", "relative error (unitless)", "accumulated: |sparse - full| / |full|"),
                 ("step_cos", "cosine (unitless)", "per step, last epoch: mean cos(m*g, g)")]
fig, axes = plt.subplots(len(tasks), len(sweep_metrics), figsize=(4 * len(sweep_metrics), 3.5 * len(tasks)),
                         squeeze=False)
for i, name in enumerate(tasks):
    ratios = PARAMS["sweep_ratios"]
    for policy in POLICIES:
        final = [sweep[name, policy, r][-1] for r in ratios]
        for ax, (key, _, _) in zip(axes[i], sweep_metrics):
            ax.plot([100 * r for r in ratios], [f[key] for f in final], **A.POLICY_STYLE[policy])
    for ax, (_, ylabel, title) in zip(axes[i], sweep_metrics):
        ax.set_xscale("log")
        ax.set_xticks([100 * r for r in ratios], [f"{100 * r:.3g}" for r in ratios])
        ax.minorticks_off()
        ax.set_xlabel("budget (% of full FT's memory units, log)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{name}, after {PARAMS['sweep_epochs']} epochs\n{title}", fontsize=9)
        ax.axvline(100 * BUDGET, color="0.7", lw=1)
axes[0, 0].legend(fontsize=8)
fig.suptitle("Accumulated-update approximation against the memory budget "
             "(policies replayed over full fine-tuning's per-epoch gradients)")
fig.tight_layout()
plt.show()

# %%
fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(5 * (len(tasks) + 1), 3.6), squeeze=False)
ratio = min(PARAMS["sweep_ratios"], key=lambda r: abs(r - BUDGET))
for ax, name in zip(axes[0], tasks):
    for policy in POLICIES:
        r = sweep[name, policy, ratio]
        ax.plot([x["epoch"] for x in r], [x["cos_cum_unit"] for x in r], **A.POLICY_STYLE[policy])
    ax.set_xlabel("epoch")
    ax.set_xticks(range(1, PARAMS["sweep_epochs"] + 1))
    ax.set_ylabel("cosine (unitless)")
    ax.set_title(f"{name}: replay at {100 * ratio:.2f}% budget\n"
                 "accumulated, epochs weighed equally", fontsize=9)
axes[0, 0].legend(fontsize=7)
ax = axes[0, -1]
for k, name in enumerate(tasks):
    r = sweep[name, POLICIES[0], ratio]
    ax.plot([x["epoch"] for x in r], [x["full_epoch_norm"] for x in r], marker="o", color=f"C{k}",
            label=f"{name} (full fine-tuning)")
ax.set_yscale("log")
ax.set_xlabel("epoch")
ax.set_xticks(range(1, PARAMS["sweep_epochs"] + 1))
ax.set_ylabel("norm of the epoch's update (log scale)")
ax.set_title("Size of each epoch's full update\n||sum over the epoch of lr_t * g_t||", fontsize=9)
ax.legend(fontsize=7)
fig.suptitle("Replay along full fine-tuning's gradients, over epochs")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Numbers

# %%
table = []
for (name, policy), r in rows.items():
    last = r[-1]
    table.append({"model": name, "policy": policy, "cos": last["cos_cum"],
                  "cos unit": last["cos_cum_unit"],
                  "rel.err": last["relerr_cum"], "|sparse|/|full|": last["norm_ratio_cum"],
                  "step cos": last["step_cos"], "coverage": last["coverage"],
                  "layers": last["layers_trained"], "test acc": last["test_accuracy"],
                  "lr": last["lr"]})
print("Norm of each epoch's full update, on each policy's own trajectory:")
for (name, policy), r in rows.items():
    print(f"  {name:18s} {policy:13s} " + "  ".join(f"{x['full_epoch_norm']:.3g}" for x in r)
          + "   train loss per epoch: " + "  ".join(f"{x['train_loss']:.3g}" for x in r))
print("\nOn-trajectory, after the last epoch (budget %.2f%%):" % (100 * BUDGET))
print(A.format_table(table, list(table[0]), {"cos": ".3f", "cos unit": ".3f", "rel.err": ".3f",
                                            "|sparse|/|full|": ".3f", "step cos": ".3f",
                                            "coverage": ".3f", "test acc": ".3f"}))
sweep_table = [{"model": n, "policy": p, "budget %": 100 * r, "cos": v[-1]["cos_cum"],
                "cos unit": v[-1]["cos_cum_unit"],
                "rel.err": v[-1]["relerr_cum"], "step cos": v[-1]["step_cos"]}
               for (n, p, r), v in sweep.items()]
print("\nReplay along full fine-tuning, after the last epoch:")
print(A.format_table(sweep_table, list(sweep_table[0]), {"budget %": ".2f", "cos": ".3f",
                                                        "cos unit": ".3f",
                                                        "rel.err": ".3f", "step cos": ".3f"}))

# %% [markdown]
# ## Reading (full mode, on our data)
#
# Numbers from the full mode: Fashion-MNIST, 192 training images, 5 epochs, batch 32;
# MCUNet-in1 at 64 px and EfficientNet-Lite0 at 48 px; top-K from 10 ranking steps on MNIST
# (K = 18 of 42 and 33 of 49); each policy at the runner's tuned learning rate (table above);
# one seed.
#
# - **Per step, a random 2 % draw sees little of the gradient; the RGN oracle sees much more.**
#   At the paper's smallest budget (2.23 % of the memory units), the mean per-step cosine
#   between the sparse and the full gradient is 0.11-0.15 for the four random policies on both
#   nets. D-/S-DetRGN reach 0.42-0.48 (MCUNet-in1) and 0.55-0.56 (EfficientNet-Lite0). This
#   follows from `heavy_tails`: a few channels carry most of the gradient, and a uniform draw
#   rarely holds them.
# - **Accumulated over epochs, re-drawing helps the direction, but modestly.** D- policies
#   update 10-14 % of the body weights over 5 epochs, against 2-3 % for S- policies. The plain
#   accumulated cosine hardly shows it: D-TopK 0.14 vs S-TopK 0.11 on MCUNet-in1, and 0.11 vs
#   0.14 (reversed) on EfficientNet-Lite0. The reason is that the full update of the first
#   epoch is 11-80 times larger than that of the last (fresh classifier, then cosine decay;
#   printed above), so the sum is mostly the first draws. Weigh every epoch the same
#   (`cos unit`) and the dynamic variants come out ahead: MCUNet-in1 D-TopK 0.15 vs S-TopK
#   0.11, D-DetRGN 0.38 vs S-DetRGN 0.32; EfficientNet-Lite0 D-FullRandom 0.175 vs 0.13,
#   D-TopK 0.16 vs 0.15. Replayed over full fine-tuning's gradients, D-TopK beats S-TopK at
#   every budget from 2.23 % up. On MCUNet-in1 the equal-weight cosine is 0.22 vs 0.16 at
#   2.23 %, 0.40 vs 0.30 at 7.48 % and 0.69 vs 0.64 at 30 %; on EfficientNet-Lite0 it is 0.23
#   vs 0.15 at 2.23 % and 0.41 vs 0.30 at 7.48 %. This is the direction of the paper's Eq. 9.
# - **The sparse sum does not approach the full sum in size.** Relative errors stay at
#   0.99 for the random policies and 0.87-0.92 for DetRGN. The accumulated sparse update is
#   only 10-19 % as long as the full one for the random policies, 38-48 % for DetRGN
#   (`|sparse|/|full|`). Eq. 9 holds at best up to a
#   scale (an unbiased estimate would divide by each channel's probability of being drawn);
#   in plain terms a 2 % budget does not reproduce the full update.
# - **TopK vs FullRandom.** Restricting the draw to the top-K layers helps the approximation on
#   EfficientNet-Lite0 (replay at 2.23 %: 0.23 vs 0.20 equal-weight cosine) and makes no
#   consistent difference on MCUNet-in1, whose top 18 layers hold almost all the RGN anyway.
# - **Disagreements with the paper.** (1) The deterministic RGN oracle approximates the full
#   update far better than any random policy, at every budget (replay at 30 %: D-DetRGN 0.91
#   on both nets vs 0.54-0.71 equal-weight cosine for the random policies). So if TraDy beats DetRGN in accuracy, as in the paper's
#   Table 1, the reason is not a better gradient approximation in this sense. (2) On our short
#   runs DetRGN also trains *worse*: test accuracy 0.50 / 0.36 (D-/S-, MCUNet-in1) against
#   0.68 for TraDy, and 0.69 / 0.70 against 0.71 on EfficientNet-Lite0. The paper has
#   D-DetRGN within 0.3 points of TraDy. Here a better approximation of the full gradient
#   does not predict accuracy. Caveats: one seed, 192 images, 5 epochs, and learning rates
#   tuned per policy by the runner (DetRGN's are 2-10x lower than the random policies'). The accuracies are
#   illustrations; `memory_tradeoff` has the seed-averaged ones.
