"""The public entry point: convert(model, keep_ratio) -> TraDyController."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .compressed import check_backward_bits, set_backward_bits
from .controller import TraDyController
from .convert import swap_modules, unswap_modules
from .profile import find_classifier
from .ranking import DEFAULT_COVERAGE, LayerRanking, load_ranking, shipped_ranking
from .sampling import get_policy
from .snapshot import ModelSnapshot, UserFlags


def _check_budget(keep_ratio, budget_units, budget_bytes, policy_pool: str) -> None:
    given = [v is not None for v in (keep_ratio, budget_units, budget_bytes)]
    if sum(given) > 1:
        raise ValueError("give one budget: keep_ratio, budget_units or budget_bytes, not several")
    if policy_pool in ("none", "full"):
        return
    if not any(given):
        raise ValueError("keep_ratio: a budget is required: keep_ratio in (0, 1], "
                         "or budget_units / budget_bytes > 0")
    if keep_ratio is not None and (isinstance(keep_ratio, bool)
                                   or not isinstance(keep_ratio, (int, float))
                                   or not 0.0 < keep_ratio <= 1.0):
        raise ValueError(f"keep_ratio={keep_ratio!r}: allowed values are numbers in (0, 1]")
    for name, value in (("budget_units", budget_units), ("budget_bytes", budget_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or value <= 0):
            raise ValueError(f"{name}={value!r}: allowed values are numbers > 0")


def _resolve_ranking(ranking, arch: str | None, example_input=None) -> LayerRanking | None:
    if ranking is None:
        if not arch:
            return None
        # a ranking made at the input's resolution ("arch@H", square inputs) beats the default
        if isinstance(example_input, torch.Tensor) and example_input.dim() == 4 \
                and example_input.shape[-1] == example_input.shape[-2]:
            at_resolution = shipped_ranking(f"{arch}@{example_input.shape[-1]}")
            if at_resolution is not None:
                return at_resolution
        return shipped_ranking(arch)
    if isinstance(ranking, LayerRanking):
        return ranking
    if isinstance(ranking, (str, Path)):
        if not arch:
            raise ValueError("ranking: a ranking file needs the model's architecture name: "
                             "set model.arch_name or pass arch=...")
        return load_ranking(ranking, arch)
    raise TypeError(f"ranking={type(ranking).__name__}: allowed values are None, a LayerRanking "
                    "or a path to a ranking JSON file")


def convert(model: nn.Module, keep_ratio: float | None = None, *, budget_units: int | None = None,
            budget_bytes: int | None = None, example_input=None, policy: str = "d-topk",
            ranking=None, coverage: float = DEFAULT_COVERAGE, seed: int = 0,
            freeze_bn_stats: bool = True, classifier: str | None = "auto",
            arch: str | None = None, backward_bits: int | None = None) -> TraDyController:
    """Make ``model`` train only a budgeted, re-drawn set of input channels.

    Swaps, in place on this instance, every Conv2d / Linear / BatchNorm2d /
    ReLU / ReLU6 / global-average-pool for a TraDy module (state_dict keys do
    not change), freezes every parameter, and returns the controller that draws
    the channels to train at each epoch (``controller.resample(epoch)``).

    All or nothing: if anything raises once the model is touched (a budget no
    channel fits, a ranking naming unknown layers, a profiling forward that
    fails, KeyboardInterrupt), the model is restored exactly (module objects,
    ``requires_grad``, training flags, hooks, buffers) before the error
    propagates. Training flags are never changed.

    Args:
        keep_ratio: budget as a fraction in (0, 1] of full fine-tuning's memory
            units (weights + per-sample input activations of the conv/linear
            layers, classifier excluded). Or give ``budget_units`` (elements
            per sample) or ``budget_bytes`` (units x element size) instead.
        example_input: a batch to measure activation sizes with (no gradient).
            Without it, the first forward measures them, then draws epoch 0.
        policy: ``"d-topk"`` (= ``"trady"``), ``"s-topk"``, ``"d-fullrandom"``,
            ``"s-fullrandom"``, ``"d-detrgn"``, ``"s-detrgn"``,
            ``"classifier-only"`` or ``"full"``. The DetRGN oracles draw only
            after ``controller.score_channels(batches)``.
        ranking: a LayerRanking, a ranking JSON path, or None for the ranking
            shipped for ``model.arch_name`` (the one made at ``example_input``'s
            resolution when one ships, e.g. ``mcunet-in1@40``; else all layers,
            with a warning).
        coverage: share of the ranking's RGN that the top-K layers cover.
        seed: draws are deterministic functions of ``(seed, epoch)``.
        freeze_bn_stats: use BatchNorm running statistics in train mode too
            (like FrozenBatchNorm2d); False keeps PyTorch's train-mode BN.
        classifier: name of the layer trained in full; "auto" = the last
            nn.Linear; None = no classifier.
        backward_bits: None (exact, the default), or 8 / 4 / 2: SiLU, GELU and
            Hardswish keep a k-bit code of their derivative, LayerNorm and attention
            their inputs as k-bit integers, squeeze-excitation gates and the compact
            copies of the selected channels theirs in 2k bits (at most 8); see
            :mod:`trady_triton.compressed`.
    """
    check_backward_bits(backward_bits)
    chosen = get_policy(policy)
    _check_budget(keep_ratio, budget_units, budget_bytes, chosen.pool)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if classifier == "auto":
        classifier = find_classifier(model)
    elif classifier is not None and classifier not in dict(model.named_modules()):
        raise ValueError(f"classifier={classifier!r}: not a module name of this model")
    arch = arch or getattr(model, "arch_name", None)
    resolved_ranking = _resolve_ranking(ranking, arch, example_input)
    snapshot, user_flags = ModelSnapshot(model), UserFlags(model)
    try:
        modules = swap_modules(model, freeze_stats=freeze_bn_stats)
        set_backward_bits(model, backward_bits, classifier)
        trainable = [m for n, m in modules.items()
                     if hasattr(m, "selected_channels") and n != classifier]
        if not trainable:
            raise ValueError("model: nothing to convert: no nn.Conv2d or nn.Linear besides the "
                             "classifier (supported: Conv2d with zero padding, Linear)")
        controller = TraDyController(model, modules, policy=chosen.name, keep_ratio=keep_ratio,
                                     budget_units=budget_units, budget_bytes=budget_bytes,
                                     ranking=resolved_ranking, coverage=coverage, seed=seed,
                                     classifier=classifier, user_flags=user_flags)
        if example_input is None:
            controller.install_lazy_profiling()
        else:
            controller.set_example_input(example_input)
            if not chosen.needs_scores:   # DetRGN draws after controller.score_channels()
                controller.resample(0)
    except BaseException:
        snapshot.restore()
        raise
    return controller


def revert(model_or_controller) -> nn.Module:
    """Plain modules again, as the user had them (accepts the controller or the converted model).

    Parameters and buffers keep their trained values; each parameter's
    ``requires_grad`` and each module's training flag are those from before
    convert(); no TraDy hook, buffer or attribute is left behind.
    """
    if isinstance(model_or_controller, TraDyController):
        return model_or_controller.revert()
    if not isinstance(model_or_controller, nn.Module):
        raise TypeError(f"model_or_controller: expected a TraDyController or a torch.nn.Module, "
                        f"got {type(model_or_controller).__name__}")
    controller = model_or_controller.__dict__.get("_trady_controller")
    if controller is not None:
        return controller.revert()
    return unswap_modules(model_or_controller)   # swapped without a controller
