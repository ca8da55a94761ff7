"""Measurements behind the notebooks (notebooks/): how sparse updates approximate the full one.

Everything a notebook computes lives here, so that the notebooks hold parameters, calls and
plots only, and the tests (tests/test_analysis.py) check the pieces:

- :func:`load_task`: a pretrained backbone with a fresh seeded classifier and an offline data
  set normalised for it; :func:`proxy_ranking` ranks its layers (``rank_layers``) on a proxy task.
- :func:`full_gradients`, :func:`channel_mask`, :func:`cosine`, :func:`relative_error`: the
  algebra of a sparse update. A converted layer's weight gradient for selected input channels
  ``S`` equals the full weight gradient masked to ``S`` (exact zeros elsewhere), so one full
  backward per step gives both the full and the sparse gradient.
- :func:`track_sparse_training`: SGD (no momentum) with the controller's channel draws, each
  step computing the full gradient too; per epoch, the cosine and relative error between the
  accumulated sparse update and the accumulated full-gradient update taken at the same iterates,
  and the per-step cosine.
- :func:`reference_trajectory` and :func:`replay_selection`: the gradients of one trajectory,
  summed per epoch, replayed through any policy and budget (selections are constant within an
  epoch, so the accumulated sparse update is ``sum_e mask_e * G_e``): cheap budget sweeps.
- :func:`alpha_stable_index` (Mohammadi et al. 2015, Cor. 2.4, as used by Simsekli et al. 2019)
  and :func:`gradient_noise_probe`: tail index of the stochastic gradient noise, and the share
  of the gradient energy carried by the top channels.
- :func:`spearman_matrix`, :func:`channel_agreement`, :func:`coverage_curve`: layer rankings
  compared across data sets and seeds, channel scores compared layer by layer.
(The experiment records are read with ``trady_triton.experiments``.)
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import sampling
from .api import convert
from .cost import LayerCost
from .ranking import LayerRanking, channel_grad_norms, channel_rgn, rank_layers
from .tables import text_table

__all__ = [
    "Task", "load_task", "proxy_ranking", "channel_scores_at_start", "score_channels",
    "channel_mask", "selection_masks", "full_gradients", "cosine", "relative_error", "norm",
    "channel_energy", "policy_lr", "track_sparse_training", "reference_trajectory", "replay_selection",
    "alpha_stable_index", "gradient_noise_probe", "top_share", "energy_curve",
    "spearman_matrix", "channel_agreement", "coverage_curve",
    "POLICY_STYLE", "format_table",
]

Grads = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- task set-up

@dataclass
class Task:
    """A pretrained backbone (fresh classifier, eval mode) and its data, as tensors."""

    model_name: str
    data: str
    resolution: int
    model: nn.Module
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    seed: int = 0

    def fresh_model(self) -> nn.Module:
        """A deep copy of the pretrained model (the task's own copy is never trained)."""
        return copy.deepcopy(self.model)

    def batches(self, batch_size: int, seed: int, epoch: int, salt: int = 0,
                max_batches: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled training batches of one epoch (the fine-tuning runner's order)."""
        from .train import epoch_batches
        return [(self.train_x[i].contiguous(), self.train_y[i])
                for i in epoch_batches(len(self.train_x), batch_size, seed, epoch, salt,
                                       max_batches)]


def load_task(model_name: str, data: str, resolution: int, train_subset: int | None,
              test_subset: int | None = None, seed: int = 0, data_seed: int = 0) -> Task:
    """Backbone ``model_name`` with ImageNet weights and a fresh ``num_classes`` head
    (initialised from ``seed``), and class-stratified subsets of ``data`` normalised with
    the backbone's own mean/std."""
    from .data import load_dataset
    from .models import build_model

    model = build_model(model_name)
    pre = getattr(model, "preprocess", None)
    mean = tuple(pre.mean) if pre is not None else (0.5, 0.5, 0.5)
    std = tuple(pre.std) if pre is not None else (0.5, 0.5, 0.5)
    train = load_dataset(data, "train", resolution, subset=train_subset, seed=data_seed,
                         mean=mean, std=std)
    test = load_dataset(data, "test", resolution, subset=test_subset, seed=data_seed,
                        mean=mean, std=std) if test_subset != 0 else None
    torch.manual_seed(seed)
    model.classifier = nn.Linear(model.classifier.in_features, train.num_classes)
    model.eval()
    empty = torch.empty(0, 3, resolution, resolution)
    return Task(model_name, data, resolution, model, train.images.contiguous(), train.labels,
                test.images.contiguous() if test is not None else empty,
                test.labels if test is not None else torch.empty(0, dtype=torch.int64),
                train.num_classes, seed)


def proxy_ranking(task: Task, steps: int, batch_size: int = 32, lr: float = 0.02,
                  seed: int = 0) -> LayerRanking:
    """``rank_layers`` of the task's backbone on the task's training data (the proxy)."""
    batches = task.batches(batch_size, seed, epoch=0)
    need = max(1, min(steps, len(batches)))
    ranking = rank_layers(task.model, batches[:need], steps, lr=lr, arch=task.model_name,
                          meta={"data": task.data, "resolution": task.resolution,
                                "train_size": len(task.train_x), "seed": seed})
    return ranking


def channel_scores_at_start(task: Task, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
                            ) -> dict[str, torch.Tensor]:
    """Channel RGN (Eq. 7) of every body layer at the pretrained point, from the full
    gradient summed over ``batches`` (:func:`score_channels`: what the DetRGN oracle ranks by)."""
    model = task.fresh_model()
    controller = convert(model, policy="full", example_input=batches[0][0],
                         arch=f"{task.model_name}@analysis")
    return score_channels(controller, batches)


# --------------------------------------------------------------------------- gradient algebra

def _body(controller) -> list[LayerCost]:
    return [l for l in controller.layers if not l.is_classifier]


def channel_mask(layer: LayerCost, weight_shape: Sequence[int], channels: torch.Tensor
                 ) -> torch.Tensor:
    """Boolean mask of the weight elements that input ``channels`` of ``layer`` own.

    Conv weight ``[C', C/g, kh, kw]``: input channel ``c`` is in group ``c // (C/g)`` and owns
    ``W[group's output rows, c % (C/g)]``; Linear ``[out, in]``: column ``c``.
    """
    mask = torch.zeros(tuple(weight_shape), dtype=torch.bool)
    channels = torch.as_tensor(channels, dtype=torch.int64).flatten()
    if channels.numel() == 0:
        return mask
    if len(weight_shape) == 2:
        mask[:, channels] = True
        return mask
    out_channels, in_per_group = weight_shape[0], weight_shape[1]
    grouped = mask.view(layer.groups, out_channels // layer.groups, in_per_group, -1)
    grouped[channels // in_per_group, :, channels % in_per_group] = True
    return mask


def selection_masks(controller, selection: dict[str, torch.Tensor] | None = None) -> Grads:
    """Mask per body layer (``layer name -> bool tensor of the weight's shape``)."""
    selection = controller.selection if selection is None else selection
    masks = {}
    for layer in _body(controller):
        shape = controller.modules[layer.name].weight.shape
        channels = selection.get(layer.name, torch.empty(0, dtype=torch.int64))
        masks[layer.name] = channel_mask(layer, shape, channels)
    return masks


def full_gradients(controller, x: torch.Tensor, y: torch.Tensor,
                   loss_fn: Callable = F.cross_entropy, with_classifier: bool = True,
                   layers: Collection[str] | None = None
                   ) -> tuple[Grads, Grads, float, torch.Tensor]:
    """Full weight gradient of every body layer (all input channels) at the current weights;
    of the body layers named in ``layers`` only, when given (the backward stops earlier).

    Returns ``(body grads by layer name, classifier grads by parameter name, loss, logits)``.
    Runs one backward through the converted model with every body weight trainable and every
    channel selected (as ``controller.score_channels`` does), then restores the selection.
    """
    body = [l for l in _body(controller) if layers is None or l.name in layers]
    weights = [controller.modules[l.name].weight for l in body]
    head = controller.model.get_submodule(controller.classifier) \
        if (with_classifier and controller.classifier) else None
    head_params = list(head.named_parameters()) if head is not None else []
    states = [w.requires_grad for w in weights]
    saved = {l.name: controller.modules[l.name].selected_channels for l in body}
    try:
        for layer, w in zip(body, weights):
            w.requires_grad_(True)
            controller.modules[layer.name].selected_channels = torch.arange(
                layer.in_channels, device=w.device)
        for _, p in head_params:
            p.requires_grad_(True)
        logits = controller.model(x)
        loss = loss_fn(logits, y)
        grads = torch.autograd.grad(loss, weights + [p for _, p in head_params])
    finally:
        for w, state in zip(weights, states):
            w.requires_grad_(state)
        for name, channels in saved.items():
            controller.modules[name].selected_channels = channels
    body_grads = {l.name: g.detach() for l, g in zip(body, grads[:len(body)])}
    head_grads = {n: g.detach() for (n, _), g in zip(head_params, grads[len(body):])}
    return body_grads, head_grads, float(loss.detach()), logits.detach()


def score_channels(controller, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   loss_fn: Callable = F.cross_entropy) -> dict[str, torch.Tensor]:
    """Channel RGN of the full gradient summed over ``batches``, set as the controller's
    ``channel_scores`` (what the DetRGN oracles rank by) and returned.

    Same definition as ``TraDyController.score_channels``, computed with
    :func:`full_gradients`, which selects every input channel of depthwise convs too.
    """
    total: Grads | None = None
    for x, y in batches:
        grads, _, _, _ = full_gradients(controller, x, y, loss_fn, with_classifier=False)
        total = grads if total is None else {k: total[k] + g for k, g in grads.items()}
    by_name = {l.name: l for l in _body(controller)}
    controller.channel_scores = {k: channel_rgn(by_name[k], g).cpu() for k, g in total.items()}
    return controller.channel_scores


def _dot(a: Grads, b: Grads) -> float:
    return float(sum((a[k].double() * b[k].double()).sum() for k in a if k in b))


def norm(a: Grads) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in a.values()))


def cosine(a: Grads, b: Grads) -> float:
    """Cosine similarity of two updates given as dicts of tensors (same keys)."""
    na, nb = norm(a), norm(b)
    if na == 0.0 or nb == 0.0:
        return 0.0
    return _dot(a, b) / (na * nb)


def relative_error(approx: Grads, target: Grads) -> float:
    """``||approx - target|| / ||target||``."""
    nt = norm(target)
    diff = math.sqrt(sum(float((approx[k].double() - target[k].double()).pow(2).sum())
                         for k in target))
    return diff / nt if nt else float("nan")


def channel_energy(layer: LayerCost, grad: torch.Tensor) -> torch.Tensor:
    """``||dW[:, c]||^2`` per input channel ``c`` (float64)."""
    return channel_grad_norms(grad.detach().double(), layer.groups).pow(2)


# --------------------------------------------------------------------------- on-trajectory

def policy_lr(model_name: str, policy: str, preset: str = "fast") -> float:
    """The fine-tuning runner's learning rate for ``policy`` (trady_triton.presets)."""
    from .presets import get_preset
    return get_preset(preset).lr_for(model_name, sampling.get_policy(policy).name)[0]


def _make_controller(task: Task, model: nn.Module, policy: str, keep_ratio: float | None,
                     ranking: LayerRanking | None, seed: int, example: torch.Tensor):
    pol = sampling.get_policy(policy)
    budget = {} if pol.pool in ("none", "full") else {"keep_ratio": keep_ratio}
    return convert(model, policy=pol.name, example_input=example, ranking=ranking, seed=seed,
                   arch=task.model_name if ranking is not None else f"{task.model_name}@analysis",
                   **budget)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> float | None:
    if len(x) == 0:
        return None
    was = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
                  for i in range(0, len(x), batch))
    model.train(was)
    return correct / len(x)


def _start_run(task, policy, lr, keep_ratio, ranking, seed, batch_size, max_batches):
    """(policy, lr, fresh model in train mode, epoch-0 batches, controller, trained body
    layers) of one trajectory; ``lr=None`` takes the policy's tuned rate."""
    pol = sampling.get_policy(policy)
    lr = policy_lr(task.model_name, pol.name) if lr is None else lr
    model = task.fresh_model()
    first = task.batches(batch_size, seed, 0, max_batches=max_batches)
    controller = _make_controller(task, model, pol.name, keep_ratio, ranking, seed, first[0][0])
    model.train()
    return pol, lr, model, first, controller, _body(controller)


@dataclass
class _Updates:
    """Sparse and full updates summed over the run (``cum``) and over epochs of unit full norm
    (``unit``), and which body weight elements the sparse updates have touched so far."""

    zeros: Grads
    sparse_cum: Grads = field(init=False)
    full_cum: Grads = field(init=False)
    sparse_unit: Grads = field(init=False)
    full_unit: Grads = field(init=False)
    touched: dict = field(init=False)

    def __post_init__(self):
        for name in ("sparse_cum", "full_cum", "sparse_unit", "full_unit"):
            setattr(self, name, self.fresh())
        self.touched = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in self.zeros.items()}

    def fresh(self) -> Grads:
        return {k: v.clone() for k, v in self.zeros.items()}

    def add_epoch(self, sparse_ep: Grads, full_ep: Grads) -> None:
        scale = 1.0 / max(norm(full_ep), 1e-300)
        for k in self.zeros:
            self.sparse_cum[k].add_(sparse_ep[k])
            self.full_cum[k].add_(full_ep[k])
            self.sparse_unit[k].add_(sparse_ep[k], alpha=scale)
            self.full_unit[k].add_(full_ep[k], alpha=scale)

    def coverage(self) -> float:
        n_weights = sum(v.numel() for v in self.zeros.values())
        return sum(int(t.sum()) for t in self.touched.values()) / n_weights


def _sparse_sgd_epoch(controller, body, head, masks, batches, rate_at, step: int,
                      updates: _Updates):
    """One epoch of SGD with the masked full gradient; returns the epoch's sparse and full
    updates, the per-step cosines and losses, and the next step."""
    sparse_ep, full_ep = updates.fresh(), updates.fresh()
    step_cos, losses = [], []
    for x, y in batches:
        rate = rate_at(step)
        grads, head_grads, loss, _ = full_gradients(controller, x, y)
        step += 1
        if not math.isfinite(loss):
            losses.append(float("nan"))
            continue
        sparse = {k: g * masks[k] for k, g in grads.items()}
        step_cos.append(cosine(sparse, grads))
        with torch.no_grad():
            for layer in body:
                w = controller.modules[layer.name].weight
                if masks[layer.name].any():
                    w.sub_(rate * sparse[layer.name])
                sparse_ep[layer.name].add_(sparse[layer.name].double(), alpha=rate)
                full_ep[layer.name].add_(grads[layer.name].double(), alpha=rate)
            if head is not None:
                for name, p in head.named_parameters():
                    p.sub_(rate * head_grads[name])
        losses.append(loss)
    return sparse_ep, full_ep, step_cos, losses, step


def _tracking_row(task: Task, pol, lr: float, keep_ratio, controller, epoch: int,
                  updates: _Updates, sparse_ep: Grads, full_ep: Grads, step_cos, losses,
                  masks, test_accuracy) -> dict:
    u = updates
    return {
        "model": task.model_name, "data": task.data, "policy": pol.name, "lr": lr,
        "keep_ratio": keep_ratio if pol.pool not in ("none", "full") else None,
        "budget_units": controller.budget_units, "epoch": epoch + 1,
        "cos_cum": cosine(u.sparse_cum, u.full_cum),
        "relerr_cum": relative_error(u.sparse_cum, u.full_cum),
        "norm_ratio_cum": norm(u.sparse_cum) / max(norm(u.full_cum), 1e-300),
        "cos_cum_unit": cosine(u.sparse_unit, u.full_unit),
        "full_epoch_norm": norm(full_ep),
        "cos_epoch": cosine(sparse_ep, full_ep),
        "relerr_epoch": relative_error(sparse_ep, full_ep),
        "step_cos": float(np.mean(step_cos)) if step_cos else float("nan"),
        "step_cos_min": float(np.min(step_cos)) if step_cos else float("nan"),
        "coverage": u.coverage(),
        "selected_units": controller.stats().selected_units,
        "layers_trained": sum(1 for m in masks.values() if m.any()),
        "train_loss": float(np.mean(losses)) if losses else float("nan"),
        "test_accuracy": test_accuracy,
    }


def track_sparse_training(task: Task, policy: str, *, keep_ratio: float | None = None,
                          ranking: LayerRanking | None = None, epochs: int = 3,
                          batch_size: int = 32, lr: float | None = None,
                          warmup_epochs: int = 1, seed: int = 0, score_batches: int = 2,
                          max_batches: int | None = None, evaluate: bool = True,
                          on_epoch_start: Callable[[int, object, Task], dict] | None = None
                          ) -> list[dict]:
    """Fine-tune a copy of ``task.model`` with ``policy`` and measure, per epoch, how the
    sparse update approximates the full-gradient update taken at the same iterates.

    Each step computes the full gradient ``g`` (one backward, all channels), trains with the
    sparse gradient ``m_e * g`` (``m_e``: the epoch's selection; the classifier always in
    full) by plain SGD at the runner's warm-up + cosine learning rate, and accumulates both
    updates ``lr_t * m_e * g_t`` and ``lr_t * g_t`` over the body layers (classifier excluded).
    ``on_epoch_start(epoch, controller, task)`` may add measurements to the epoch's row.
    ``lr=None`` takes the fine-tuning runner's per-policy rate (:func:`policy_lr`).

    Row fields: ``epoch``, ``cos_cum`` / ``relerr_cum`` / ``norm_ratio_cum`` (accumulated from
    the start), ``cos_cum_unit`` (the same cosine with each epoch's pair of updates divided by
    the norm of that epoch's full update, so that every epoch weighs the same: the first
    epoch's gradient, with a fresh classifier, is often much larger than the later ones),
    ``full_epoch_norm`` (norm of this epoch's full update), ``cos_epoch`` / ``relerr_epoch``
    (this epoch's updates only), ``step_cos``
    (mean over steps of cos(m*g, g)), ``step_cos_min``, ``coverage`` (share of body weight
    elements updated at least once so far), ``selected_units``, ``train_loss``,
    ``test_accuracy``.
    """
    from .train import lr_at

    pol, lr, model, first, controller, body = _start_run(task, policy, lr, keep_ratio, ranking,
                                                         seed, batch_size, max_batches)
    steps_per_epoch = len(first)
    total, warm = steps_per_epoch * epochs, steps_per_epoch * warmup_epochs
    updates = _Updates({l.name: torch.zeros_like(controller.modules[l.name].weight,
                                                 dtype=torch.float64) for l in body})
    head = model.get_submodule(controller.classifier) if controller.classifier else None
    rows, step = [], 0
    for epoch in range(epochs):
        extra = on_epoch_start(epoch, controller, task) if on_epoch_start else {}
        if pol.needs_scores and (pol.dynamic or controller.channel_scores is None):
            score_channels(controller, task.batches(batch_size, seed, epoch, salt=1,
                                                    max_batches=score_batches))
        controller.resample(epoch)
        masks = selection_masks(controller)
        for name, m in masks.items():
            updates.touched[name] |= m
        sparse_ep, full_ep, step_cos, losses, step = _sparse_sgd_epoch(
            controller, body, head, masks,
            task.batches(batch_size, seed, epoch, max_batches=max_batches),
            lambda s: lr_at(s, total, warm, lr), step, updates)
        updates.add_epoch(sparse_ep, full_ep)
        row = _tracking_row(task, pol, lr, keep_ratio, controller, epoch, updates, sparse_ep,
                            full_ep, step_cos, losses, masks,
                            _accuracy(model, task.test_x, task.test_y) if evaluate else None)
        row.update(extra or {})
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- replay

@dataclass
class Trajectory:
    """Gradients of one fine-tuning run, as much as a replay needs."""

    task_name: str
    policy: str
    layers: list[LayerCost]
    pool_layers: list[str]
    epoch_sums: list[Grads]                     # sum over the epoch's steps of lr_t * g_t
    step_energy: list[list[dict[str, torch.Tensor]]]   # per epoch, per step: channel ||g_c||^2
    epoch_scores: list[dict[str, torch.Tensor]]        # channel RGN on score batches at epoch start
    full_units: int
    meta: dict = field(default_factory=dict)


def reference_trajectory(task: Task, *, policy: str = "full", keep_ratio: float | None = None,
                         ranking: LayerRanking | None = None, epochs: int = 3,
                         batch_size: int = 32, lr: float | None = None, warmup_epochs: int = 1,
                         seed: int = 0, score_batches: int = 2, max_batches: int | None = None
                         ) -> Trajectory:
    """Record the gradients of one run (by default full fine-tuning) for :func:`replay_selection`.

    Per epoch: channel RGN of the full gradient on ``score_batches`` batches at the epoch's
    start (what DetRGN would see), the lr-weighted sum of the full body gradients, and each
    step's channel energies. ``lr=None``: the runner's rate for ``policy``.
    """
    from .cost import full_units
    from .train import lr_at

    pol, lr, model, first, controller, body = _start_run(task, policy, lr, keep_ratio, ranking,
                                                         seed, batch_size, max_batches)
    steps_per_epoch = len(first)
    total, warm = steps_per_epoch * epochs, steps_per_epoch * warmup_epochs
    head = model.get_submodule(controller.classifier) if controller.classifier else None
    sums, energies, scores, step = [], [], [], 0
    for epoch in range(epochs):
        score_channels(controller, task.batches(batch_size, seed, epoch, salt=1,
                                                max_batches=score_batches))
        scores.append({k: v.clone() for k, v in controller.channel_scores.items()})
        controller.resample(epoch)
        masks = selection_masks(controller)
        acc = {l.name: torch.zeros_like(controller.modules[l.name].weight, dtype=torch.float64)
               for l in body}
        epoch_energy = []
        for x, y in task.batches(batch_size, seed, epoch, max_batches=max_batches):
            rate = lr_at(step, total, warm, lr)
            grads, head_grads, loss, _ = full_gradients(controller, x, y)
            epoch_energy.append({l.name: channel_energy(l, grads[l.name]) for l in body})
            with torch.no_grad():
                for layer in body:
                    acc[layer.name].add_(grads[layer.name].double(), alpha=rate)
                    if masks[layer.name].any():
                        controller.modules[layer.name].weight.sub_(
                            rate * grads[layer.name] * masks[layer.name])
                if head is not None:
                    for name, p in head.named_parameters():
                        p.sub_(rate * head_grads[name])
            step += 1
        sums.append(acc)
        energies.append(epoch_energy)
    pool = ranking.top_k(controller.coverage) if ranking is not None else [l.name for l in body]
    return Trajectory(f"{task.model_name}/{task.data}", pol.name, list(controller.layers), pool,
                      sums, energies, scores, full_units(controller.layers),
                      {"lr": lr, "epochs": epochs, "batch_size": batch_size, "seed": seed,
                       "steps_per_epoch": steps_per_epoch})


def replay_selection(trajectory: Trajectory, policy: str, keep_ratio: float, seed: int = 0
                     ) -> list[dict]:
    """Replay ``policy`` at ``keep_ratio`` over a recorded trajectory's gradients.

    The draws are the package's (``sampling.draw``, same pool, same seeds as a controller);
    DetRGN uses the trajectory's epoch-start channel RGN. Returns one row per epoch with
    ``cos_cum``, ``relerr_cum``, ``norm_ratio_cum``, ``cos_cum_unit``, ``full_epoch_norm``
    (as :func:`track_sparse_training`) and ``step_cos`` (mean over steps of
    ``cos(m * g, g) = sqrt(selected channel energy / total energy)``).
    """
    pol = sampling.get_policy(policy)
    layers = trajectory.layers
    body = [l for l in layers if not l.is_classifier]
    by_name = {l.name: l for l in body}
    budget = int(math.floor(keep_ratio * trajectory.full_units))
    shapes = {k: v.shape for k, v in trajectory.epoch_sums[0].items()}
    sparse_cum = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
    full_cum = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
    sparse_unit = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
    full_unit = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
    rows, static = [], None
    for epoch, (g_sum, energy, score) in enumerate(zip(trajectory.epoch_sums,
                                                       trajectory.step_energy,
                                                       trajectory.epoch_scores)):
        if pol.dynamic or static is None:
            selection = sampling.draw(pol, layers, trajectory.pool_layers, budget, seed, epoch,
                                      score if pol.needs_scores else None)
            static = selection
        else:
            selection = static
        cos_steps = []
        for e in energy:
            total = sum(float(v.sum()) for v in e.values())
            kept = sum(float(e[name][ch].sum()) for name, ch in selection.items() if ch.numel())
            cos_steps.append(math.sqrt(kept / total) if total > 0 else 0.0)
        scale = 1.0 / max(norm(g_sum), 1e-300)
        for name, g in g_sum.items():
            channels = selection.get(name)
            full_cum[name].add_(g)
            full_unit[name].add_(g, alpha=scale)
            if channels is not None and channels.numel():
                masked = g * channel_mask(by_name[name], g.shape, channels)
                sparse_cum[name].add_(masked)
                sparse_unit[name].add_(masked, alpha=scale)
        rows.append({"policy": pol.name, "keep_ratio": keep_ratio, "budget_units": budget,
                     "epoch": epoch + 1, "cos_cum": cosine(sparse_cum, full_cum),
                     "relerr_cum": relative_error(sparse_cum, full_cum),
                     "norm_ratio_cum": norm(sparse_cum) / max(norm(full_cum), 1e-300),
                     "cos_cum_unit": cosine(sparse_unit, full_unit),
                     "full_epoch_norm": norm(g_sum),
                     "step_cos": float(np.mean(cos_steps)) if cos_steps else float("nan")})
    return rows


# --------------------------------------------------------------------------- heavy tails

def alpha_stable_index(x: torch.Tensor | np.ndarray, k1: int | None = None) -> float:
    """Tail index of a symmetric alpha-stable sample (Mohammadi et al. 2015, Corollary 2.4).

    With ``K = K1 * K2`` samples ``X_i`` (the flattened values of ``x``) and block sums
    ``Y_j = X_{(j-1)K1+1} + ... + X_{j K1}``::

        1 / alpha = ( mean_j log|Y_j| - mean_i log|X_i| ) / log K1

    ``K1`` defaults to ``floor(sqrt(K))`` (Simsekli et al. 2019 take ``K1 ~ sqrt(K)``); the
    last ``K mod K1`` values are dropped. alpha = 2 is Gaussian; alpha < 2 is heavy-tailed.
    The estimate is not clipped: values above 2 mean "no heavier than Gaussian".
    """
    v = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    v = v.detach().double().flatten()
    n = v.numel()
    if n < 4:
        raise ValueError(f"alpha_stable_index needs at least 4 values, got {n}")
    k1 = int(math.isqrt(n)) if k1 is None else int(k1)
    if not 2 <= k1 <= n // 2:
        raise ValueError(f"k1={k1}: allowed values are 2 <= k1 <= {n // 2}")
    k2 = n // k1
    v = v[:k1 * k2]
    y = v.view(k2, k1).sum(dim=1)
    eps = float(np.spacing(1))
    inverse = (torch.log(y.abs() + eps).mean() - torch.log(v.abs() + eps).mean()) / math.log(k1)
    return float(1.0 / inverse)


def top_share(energies: Iterable[torch.Tensor], fractions: Sequence[float]) -> dict[float, float]:
    """Share of the total energy carried by the top ``fraction`` of channels (all layers
    pooled, channels sorted by energy)."""
    e = torch.cat([t.double().flatten() for t in energies])
    e = torch.sort(e, descending=True).values
    total = float(e.sum())
    out = {}
    for f in fractions:
        k = max(1, int(math.ceil(f * e.numel())))
        out[float(f)] = float(e[:k].sum()) / total if total > 0 else float("nan")
    return out


def energy_curve(energies: Iterable[torch.Tensor], points: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """(fraction of channels, share of energy in the top that fraction), on a log grid."""
    e = torch.cat([t.double().flatten() for t in energies])
    e = torch.sort(e, descending=True).values
    cum = torch.cumsum(e, 0) / e.sum()
    n = e.numel()
    ks = np.unique(np.clip(np.round(np.logspace(0, math.log10(n), points)).astype(int), 1, n))
    return ks / n, cum[ks - 1].numpy()


def gradient_noise_probe(controller, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                         fractions: Sequence[float] = (0.01, 0.05, 0.10)) -> dict:
    """Tail index of the minibatch gradient noise and top-channel energy shares, now.

    For minibatch gradients ``g_1..g_M`` of ``batches`` (all body layers, all channels, at the
    current weights) and their mean ``G`` (the large-batch gradient of the pooled batches), the
    noise ``g_i - G`` is flattened across parameters and :func:`alpha_stable_index` is applied
    to each ``i``; the results are averaged over ``i``.

    Coordinates whose noise is exactly zero in every minibatch (weights that get no gradient
    from these batches at all, e.g. behind dead ReLUs) are dropped first (``zero_fraction``):
    they are no noise sample, and ``log|0|`` would drag the estimate towards 0
    (``alpha_with_zeros`` shows by how much). Reported: ``alpha`` (Simsekli et al.'s
    coordinate order: blocks of neighbouring weights), ``alpha_sd`` (over ``i``),
    ``alpha_shuffled`` (coordinates in random order: blocks mix layers),
    ``alpha_layer_std`` (each layer's noise divided by its RMS, then shuffled: heavy tails
    *within* layers, not from scale differences between layers), ``gaussian_alpha`` (the
    estimator on Gaussian noise of the same size: its bias), ``noise_to_signal``
    (mean ``||g_i - G|| / ||G||``), the top-channel shares of ``||G||^2`` (``share_top``) and
    the mean share of ``||g_i||^2`` (``share_top_minibatch``), and ``curve``
    (:func:`energy_curve` of ``G``).
    """
    body = _body(controller)
    grads = []
    for x, y in batches:
        g, _, _, _ = full_gradients(controller, x, y, with_classifier=False)
        grads.append(g)
    names = [l.name for l in body]
    flat = torch.stack([torch.cat([g[n].double().flatten() for n in names]) for g in grads])
    mean = flat.mean(dim=0)
    noise = flat - mean
    sizes = [grads[0][n].numel() for n in names]
    layer_index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    live = (noise != 0).any(dim=0)
    generator = torch.Generator().manual_seed(0)
    n_live = int(live.sum())
    perm = torch.randperm(n_live, generator=generator)
    live_layer = layer_index[live]
    alphas, shuffled, alphas_std, with_zeros = [], [], [], []
    for row in noise:
        kept = row[live]
        alphas.append(alpha_stable_index(kept))
        shuffled.append(alpha_stable_index(kept[perm]))
        rms = torch.zeros(len(sizes), dtype=torch.float64).index_add_(0, live_layer, kept ** 2)
        count = torch.bincount(live_layer, minlength=len(sizes)).clamp_min(1)
        standardized = kept / (rms / count).sqrt().clamp_min(1e-300)[live_layer]
        alphas_std.append(alpha_stable_index(standardized[perm]))
        with_zeros.append(alpha_stable_index(row))
    gauss = alpha_stable_index(torch.randn(n_live, generator=generator, dtype=torch.float64))
    layer_of = {l.name: l for l in body}
    offsets = np.cumsum([0] + sizes)
    mean_grads = {n: mean[offsets[i]:offsets[i + 1]].view_as(grads[0][n]) for i, n in enumerate(names)}
    energy_G = [channel_energy(layer_of[n], mean_grads[n]) for n in names]
    share = top_share(energy_G, fractions)
    mini = [top_share([channel_energy(layer_of[n], g[n]) for n in names], fractions) for g in grads]
    share_mini = {f: float(np.mean([m[f] for m in mini])) for f in share}
    noise_to_signal = float(noise.norm(dim=1).mean() / mean.norm().clamp_min(1e-300))
    return {"alpha": float(np.mean(alphas)), "alpha_sd": float(np.std(alphas)),
            "alpha_shuffled": float(np.mean(shuffled)),
            "alpha_layer_std": float(np.mean(alphas_std)),
            "alpha_with_zeros": float(np.mean(with_zeros)), "gaussian_alpha": gauss,
            "zero_fraction": 1.0 - n_live / noise.shape[1],
            "share_top": share, "share_top_minibatch": share_mini,
            "noise_to_signal": noise_to_signal, "curve": energy_curve(energy_G),
            "n_coordinates": int(noise.shape[1]), "n_minibatches": len(grads)}


# --------------------------------------------------------------------------- rankings

def spearman_matrix(score_sets: Sequence[dict[str, float]]) -> np.ndarray:
    """Spearman rank correlation between every pair of score dicts (over their common keys)."""
    from scipy.stats import spearmanr

    keys = sorted(set.intersection(*(set(s) for s in score_sets)))
    n = len(score_sets)
    out = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            a = [score_sets[i][k] for k in keys]
            b = [score_sets[j][k] for k in keys]
            rho = spearmanr(a, b).statistic
            out[i, j] = out[j, i] = float(rho)
    return out


def channel_agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                      top: float = 0.1, min_channels: int = 8) -> dict[str, float]:
    """How alike two channel-score dicts are, layer by layer (layers with at least
    ``min_channels`` channels): mean Spearman correlation of the channel scores, and mean
    overlap (Jaccard index) of each layer's top ``top`` share of channels."""
    from scipy.stats import spearmanr

    rhos, overlaps = [], []
    for name in sorted(set(a) & set(b)):
        x, y = a[name].double().flatten(), b[name].double().flatten()
        if x.numel() < min_channels or x.numel() != y.numel():
            continue
        if float(x.std()) > 0 and float(y.std()) > 0:
            rhos.append(float(spearmanr(x.numpy(), y.numpy()).statistic))
        k = max(1, int(round(top * x.numel())))
        sa = set(torch.topk(x, k).indices.tolist())
        sb = set(torch.topk(y, k).indices.tolist())
        overlaps.append(len(sa & sb) / len(sa | sb))
    return {"spearman": float(np.mean(rhos)) if rhos else float("nan"),
            "top_overlap": float(np.mean(overlaps)) if overlaps else float("nan"),
            "layers": len(overlaps)}


def coverage_curve(ranking: LayerRanking) -> np.ndarray:
    """Cumulative share of the total RGN covered by the top-k layers, k = 1..L."""
    values = np.array([ranking.scores[n] for n in ranking.order()], dtype=np.float64)
    return np.cumsum(values) / values.sum()


# --------------------------------------------------------------------------- presentation

POLICY_STYLE = {
    "d-topk": {"color": "C0", "linestyle": "-", "marker": "o", "label": "D-TopK (TraDy)"},
    "s-topk": {"color": "C0", "linestyle": "--", "marker": "o", "label": "S-TopK"},
    "d-fullrandom": {"color": "C1", "linestyle": "-", "marker": "s", "label": "D-FullRandom"},
    "s-fullrandom": {"color": "C1", "linestyle": "--", "marker": "s", "label": "S-FullRandom"},
    "d-detrgn": {"color": "C2", "linestyle": "-", "marker": "^", "label": "D-DetRGN"},
    "s-detrgn": {"color": "C2", "linestyle": "--", "marker": "^", "label": "S-DetRGN"},
    "full": {"color": "k", "linestyle": "-", "marker": "*", "label": "full fine-tuning"},
    "classifier-only": {"color": "0.5", "linestyle": ":", "marker": "x",
                        "label": "classifier only"},
}


def format_table(rows: Sequence[dict], columns: Sequence[str], formats: dict | None = None) -> str:
    """A plain-text table of ``rows`` (dicts) with the given ``columns``."""
    formats = formats or {}

    def cell(row, col):
        value = row.get(col)
        if value is None:
            return "-"
        fmt = formats.get(col)
        if fmt:
            return format(value, fmt)
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    return text_table(columns, [[cell(r, c) for c in columns] for r in rows],
                      align="l" + "r" * (len(columns) - 1))
