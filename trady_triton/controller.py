"""The object convert() returns: budget, layer pool, per-epoch draws, reports, state.

At each epoch boundary ``resample(epoch)`` draws the channels to train
(deterministic from ``(seed, epoch)``) and applies them: a layer with selected
channels gets ``weight.requires_grad = True`` and those channels in its
``selected_channels`` buffer; every other layer is frozen. The classifier is
always trained in full.

The controller's calls are transactional: one that raises (a budget that no
channel fits, a ranking that names unknown layers) leaves the profile, the
budget, the pool and the current selection as they were.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cost as C
from . import sampling
from .convert import unswap_modules
from .dispatch import check_channel_index, prepare_index
from .profile import Profile, profile_model
from .ranking import LayerRanking, channel_rgn, default_pool, DEFAULT_COVERAGE
from .snapshot import UserFlags, training_flags_and_buffers_kept

STATE_VERSION = 1


class TraDyController:
    """Drives the channel selection of one converted model. Made by :func:`convert`."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module], *, policy: str,
                 keep_ratio: float | None, budget_units: int | None, budget_bytes: int | None,
                 ranking: LayerRanking | None, coverage: float, seed: int, classifier: str | None,
                 train_classifier: bool = True, user_flags: UserFlags | None = None):
        self.model = model
        self._user_flags = user_flags or UserFlags(model)   # what revert() gives back
        self._reverted = False
        self.modules = modules
        self.policy = sampling.get_policy(policy)
        self.seed = int(seed)
        self.classifier = classifier
        self.train_classifier = train_classifier
        self.ranking = ranking
        self.coverage = coverage
        self._budget_spec = (keep_ratio, budget_units, budget_bytes)
        self.epoch: int | None = None
        self.selection: dict[str, torch.Tensor] = {}
        self.channel_scores: dict[str, torch.Tensor] | None = None
        self._static_selection: dict[str, torch.Tensor] | None = None
        self.profile: Profile | None = None
        self.budget_units: int | None = None
        self.pool: list[str] = []
        self._lazy_hook = None
        self._input_shape: tuple | None = None    # per-sample shape of the profiled input
        self._shape_hook = None
        self._optimizer_masks: list = []
        self._profiling = False
        self._fold_bn = True   # frozen BN folded into the frozen conv feeding it (set_bn_folding)
        model.__dict__["_trady_controller"] = self   # lets revert(model) find the controller
        self._freeze_all()

    # ----------------------------------------------------------------- set-up
    def _freeze_all(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._apply_classifier()

    def _apply_classifier(self) -> None:
        if self.classifier is None:
            return
        head = self.model.get_submodule(self.classifier)
        for p in head.parameters():
            p.requires_grad_(self.train_classifier)
        if hasattr(head, "selected_channels"):
            head.selected_channels = torch.arange(head.in_features, device=head.weight.device)

    def set_example_input(self, example_input) -> None:
        """Profile the model on ``example_input``: shapes, budget, layer pool.

        Call it again with an input of a new resolution (then ``resample``) to
        re-evaluate the budget: activation costs depend on the input size, and a
        training forward at another per-sample shape than the profiled one raises.
        If it raises (e.g. the budget fits no channel at the new size), the
        previous profile, budget, pool and selection stay in force.
        """
        self._require_converted()
        profile = self._profile(example_input)
        if self.ranking is not None:
            self.ranking.check_layers({l.name for l in profile.layers})
            pool = self.ranking.top_k(self.coverage)
        else:
            body = [l.name for l in profile.layers if not l.is_classifier]
            pool = body if self.policy.pool != "topk" else \
                default_pool(body, getattr(self.model, "arch_name", type(self.model).__name__))
        budget_units = self._budget_for(profile, pool)
        self.profile, self.pool, self.budget_units = profile, pool, budget_units
        self._wire_fusions()
        self._watch_input_shape(example_input)

    def _profile(self, example_input) -> Profile:
        """One profiling forward that leaves training flags and buffers (BN statistics) as they were."""
        with training_flags_and_buffers_kept(self.model):
            profile = profile_model(self.model, example_input, self.classifier)
        if not [l for l in profile.layers if not l.is_classifier]:
            raise ValueError("model: nothing to convert: no Conv2d/Linear layer besides the "
                             "classifier ran in the forward pass")
        return profile

    def _watch_input_shape(self, example_input) -> None:
        """From now on, a training forward must have the per-sample shape just profiled."""
        if self._shape_hook is not None:
            self._shape_hook.remove()
            self._shape_hook = None
        first = example_input[0] if isinstance(example_input, tuple) else example_input
        self._input_shape = tuple(first.shape[1:]) if isinstance(first, torch.Tensor) else None
        if self._input_shape is not None:
            self._shape_hook = self.model.register_forward_pre_hook(self._check_input_shape)

    def _check_input_shape(self, module, args) -> None:
        """A training forward must see the per-sample shape the budget was computed for."""
        if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
            return
        shape = tuple(args[0].shape[1:])
        if shape != self._input_shape:
            raise RuntimeError(
                f"input per-sample shape {shape} differs from the profiled {self._input_shape}: "
                "the memory budget and channel costs were computed for the profiled size. Call "
                "controller.set_example_input(batch) and controller.resample(epoch) to "
                "re-evaluate them for the new resolution (forwards under torch.no_grad(), "
                "e.g. evaluation, may use any size)")

    def _budget_for(self, profile: Profile, pool: list[str]) -> int | None:
        """The budget in units at ``profile``'s sizes; it must fit a channel of the pool."""
        keep_ratio, units, nbytes = self._budget_spec
        if self.policy.pool in ("none", "full"):
            return None
        full = C.full_units(profile.layers)
        if keep_ratio is not None:
            budget = int(math.floor(keep_ratio * full))
        elif units is not None:
            budget = int(units)
        else:
            element = profile.layers[0].element_bytes
            budget = int(nbytes // element)
        in_pool = [l for l in profile.layers if l.name in set(pool) and not l.is_classifier]
        if not in_pool:
            raise ValueError("ranking: the channel pool is empty: no convertible layer besides "
                             "the classifier is in the ranking's top-K")
        cheapest = min(l.units_per_channel for l in in_pool)
        if budget < cheapest:
            raise ValueError(f"budget of {budget} units is smaller than the cheapest channel "
                             f"({cheapest} units): allowed budgets are >= {cheapest} units "
                             f"(keep_ratio >= {cheapest / full:.2e} of the full {full} units)")
        return budget

    def set_bn_folding(self, enabled: bool) -> None:
        """Fold each frozen BN into the frozen conv feeding it (forward and backward; exact
        to float rounding; state_dict untouched; saved bytes unchanged). On by default:
        bench/RESULTS.md has the measurement."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled={enabled!r}: allowed values are True or False")
        self._fold_bn = enabled
        self._wire_fusions()

    def _wire_fusions(self) -> None:
        for module in self.modules.values():
            if hasattr(module, "_fuse_with"):
                module._fuse_with = None
            if hasattr(module, "_fold_into"):
                module._fold_into = None
        for conv_name, bn_name in (self.profile.conv_bn_folds if self._fold_bn else []):
            if conv_name in self.modules and bn_name in self.modules:
                self.modules[conv_name]._fold_into = (self.modules[bn_name],)
        for bn_name, act_name, consumer_name in self.profile.fusions:
            if bn_name in self.modules and act_name in self.modules and consumer_name in self.modules:
                self.modules[bn_name]._fuse_with = (self.modules[act_name], self.modules[consumer_name])

    def _require_converted(self) -> None:
        if self._reverted:
            raise RuntimeError("controller: its model was reverted to plain modules; "
                               "call convert() again to train it with TraDy")

    def _require_profile(self) -> None:
        if self.profile is None:
            raise RuntimeError("the controller has no layer shapes yet: pass example_input to "
                               "convert() or run one forward pass first")

    def install_lazy_profiling(self) -> None:
        """Profile and draw at the first forward (when convert() got no example input)."""
        def pre_hook(module, args, kwargs):
            if self._profiling:          # the profiling forward itself
                return
            self._profiling = True
            try:    # on failure the hook stays: the next forward profiles again
                self.set_example_input(args if len(args) > 1 else args[0])
                if not self.policy.needs_scores:
                    self.resample(0 if self.epoch is None else self.epoch)
            finally:
                self._profiling = False
            self._lazy_hook.remove()
            self._lazy_hook = None
        self._lazy_hook = self.model.register_forward_pre_hook(pre_hook, with_kwargs=True)

    # ------------------------------------------------------------- selection
    @property
    def layers(self) -> list[C.LayerCost]:
        self._require_profile()
        return self.profile.layers

    def resample(self, epoch: int) -> dict[str, torch.Tensor]:
        """Draw (D-) or reuse (S-) the channels for ``epoch`` and apply them.

        If it raises, the current selection and epoch stay in force.
        """
        self._require_profile()
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch={epoch!r}: allowed values are integers >= 0")
        if not self.policy.dynamic and self._static_selection is not None:
            selection = self._static_selection
        else:
            selection = self._draw(epoch)
        self.apply_selection(selection)
        if not self.policy.dynamic:
            self._static_selection = selection
        self.epoch = epoch
        return selection

    def _draw(self, epoch: int) -> dict[str, torch.Tensor]:
        if self.policy.needs_scores and self.channel_scores is None:
            raise RuntimeError(f"policy {self.policy.name!r} ranks channels by RGN: call "
                               "controller.score_channels(batches) before resample()")
        selection = sampling.draw(self.policy, self.layers, self.pool, self.budget_units,
                                  self.seed, epoch, self.channel_scores)
        if self.budget_units is not None and not any(v.numel() for v in selection.values()):
            raise ValueError(f"budget of {self.budget_units} units fits no channel of the "
                             f"{len(self.pool)} pool layers: give a larger budget")
        return selection

    def apply_selection(self, selection: dict[str, torch.Tensor]) -> None:
        """Train exactly ``selection`` (layer name -> input channels); freeze the rest."""
        self._require_converted()
        by_name = {l.name: l for l in self.layers}
        for name, channels in selection.items():
            if name not in by_name or by_name[name].is_classifier:
                raise ValueError(f"selection: unknown or classifier layer {name!r}")
            check_channel_index(f"selection[{name!r}]", channels, by_name[name].in_channels)
        self.selection = {k: v.clone() for k, v in selection.items() if v.numel()}
        for layer in self.layers:
            if layer.is_classifier:
                continue
            module = self.modules[layer.name]
            channels = self.selection.get(layer.name)
            module.weight.requires_grad_(channels is not None)
            if channels is not None:
                module.selected_channels = prepare_index(channels.to(module.weight.device),
                                                         layer.in_channels)
        self._apply_classifier()

    def score_channels(self, batches: Iterable, loss_fn: Callable = F.cross_entropy) -> None:
        """Channel RGN from the full gradient on ``batches`` (for the DetRGN oracles).

        Runs a plain full backward (no saving: an oracle costs full memory).
        """
        self._require_profile()
        params = [self.modules[l.name].weight for l in self.layers if not l.is_classifier]
        states = [p.requires_grad for p in params]
        grads = {l.name: None for l in self.layers if not l.is_classifier}
        for p in params:
            p.requires_grad_(True)
        saved = {name: self.modules[name].selected_channels for name in grads}
        try:
            by_name = {l.name: l for l in self.layers}
            for name in grads:   # full weight gradients, all input channels (not weight.shape[1]:
                module = self.modules[name]   # that is 1 for a depthwise conv)
                module.selected_channels = torch.arange(by_name[name].in_channels,
                                                        device=module.weight.device)
            for inputs, targets in batches:
                full = torch.autograd.grad(loss_fn(self.model(inputs), targets), params)
                for name, g in zip(grads, full):
                    grads[name] = g if grads[name] is None else grads[name] + g
        finally:
            for p, state in zip(params, states):
                p.requires_grad_(state)
            for name, channels in saved.items():
                self.modules[name].selected_channels = channels
        by_name = {l.name: l for l in self.layers}
        self.channel_scores = {name: channel_rgn(by_name[name], g).cpu() for name, g in grads.items()}

    # ------------------------------------------------------------- reporting
    def counts(self) -> dict[str, int]:
        counts = {name: int(ch.numel()) for name, ch in self.selection.items()}
        if self.classifier is not None and self.train_classifier:
            head = next((l for l in self.layers if l.is_classifier), None)
            if head is not None:
                counts[head.name] = head.in_channels
        return counts

    def stats(self) -> C.SelectionStats:
        """Weight / activation sparsity and weight-gradient FLOPs saved, this epoch."""
        return C.selection_stats(self.layers, self.counts(), self.budget_units)

    def saved_bytes(self, batch: int) -> dict[str, int]:
        """Analytic bytes saved for backward by one forward of ``batch`` samples."""
        return C.saved_bytes_for_backward(self.layers, self.profile.masks, self.counts(), batch)

    def report(self, batch: int = 1, measured_bytes: int | None = None) -> str:
        """A per-layer table and totals, next to full fine-tuning."""
        from .report import format_report
        return format_report(self, batch, measured_bytes)

    # ------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything needed to continue with the same draws (tensors and plain values only)."""
        return {
            "version": STATE_VERSION,
            "policy": self.policy.name,
            "seed": self.seed,
            "epoch": -1 if self.epoch is None else self.epoch,
            "budget_units": -1 if self.budget_units is None else self.budget_units,
            "pool": list(self.pool),
            "selection": {k: v.clone() for k, v in self.selection.items()},
            "static_selection": None if self._static_selection is None
            else {k: v.clone() for k, v in self._static_selection.items()},
            "channel_scores": None if self.channel_scores is None
            else {k: v.clone() for k, v in self.channel_scores.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"controller state version {state.get('version')!r}: "
                             f"allowed value is {STATE_VERSION}")
        if state["policy"] != self.policy.name:
            raise ValueError(f"controller state is for policy {state['policy']!r}, "
                             f"this controller runs {self.policy.name!r}")
        self._require_profile()
        known = {l.name for l in self.layers if not l.is_classifier}
        unknown = sorted(set(state["pool"]) - known)
        if unknown:
            raise ValueError(f"controller state names pool layers this model does not have: "
                             f"{unknown[:5]}")
        self.apply_selection(state["selection"])   # validates before it changes anything
        self.seed = int(state["seed"])
        self.pool = list(state["pool"])
        self.budget_units = None if state["budget_units"] < 0 else int(state["budget_units"])
        self._static_selection = state["static_selection"]
        self.channel_scores = state["channel_scores"]
        self.epoch = None if state["epoch"] < 0 else int(state["epoch"])

    def mask_optimizer(self, optimizer: torch.optim.Optimizer, state: str = "freeze"):
        """Make ``optimizer.step()`` change only the selected channels (and the classifier).

        Needed with momentum, Adam-style state or weight decay; see
        :mod:`trady_triton.optim`. Returns the :class:`~trady_triton.optim.OptimizerMask`
        (``.remove()`` takes its hooks off; ``revert()`` does it too).
        """
        from .optim import OptimizerMask
        self._require_converted()
        mask = OptimizerMask(self, optimizer, state)
        self._optimizer_masks.append(mask)
        return mask

    def revert(self) -> nn.Module:
        """Plain torch.nn modules again, as the user had them before convert().

        Parameters and buffers keep their trained values; each parameter's
        ``requires_grad`` and each module's training flag are set back to what
        they were before convert(); the controller's hooks (on the model and on
        masked optimizers) and every attribute and buffer TraDy added are
        removed. A second call does nothing.
        """
        if self._reverted:
            return self.model
        for handle in (self._lazy_hook, self._shape_hook):
            if handle is not None:
                handle.remove()
        self._lazy_hook = self._shape_hook = None
        for mask in list(self._optimizer_masks):
            mask.remove()
        unswap_modules(self.model)
        self._user_flags.restore(self.model)
        self.model.__dict__.pop("_trady_controller", None)
        self._reverted = True
        return self.model
