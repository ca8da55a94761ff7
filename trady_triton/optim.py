"""Keep unselected channels bit-identical under any torch optimizer.

A TraDy layer with some selected input channels gets a dense weight gradient
whose unselected slices are exact zeros. That is enough for plain SGD, but not
for optimizers with state or weight decay: a momentum buffer or Adam moments
filled while a channel was selected keep moving it after it was dropped, and
weight decay (L2 in SGD/Adam, decoupled in AdamW) moves every entry of a
parameter that has a gradient. :class:`OptimizerMask` fixes this for any
optimizer, with its step hooks:

* before ``step()``: a parameter that does not require grad (a frozen layer,
  a conv bias, BatchNorm parameters) but still holds a ``.grad`` (left by
  ``zero_grad(set_to_none=False)`` or an earlier epoch) has its ``.grad`` set
  to None, so the optimizer skips it entirely (every ``torch.optim``
  optimizer, for-loop, ``foreach`` and ``fused``, skips parameters whose grad
  is None). For a partially selected layer, the entries owned by unselected
  input channels are copied aside: the weight's and, with ``state="freeze"``,
  those of every optimizer-state tensor of the weight's shape (momentum
  buffer, Adam's ``exp_avg`` / ``exp_avg_sq`` / ``max_exp_avg_sq``).
* after ``step()``: those entries are written back, exactly.

So a step changes only the selected channels of the trained layers and the
classifier. Optimizer state of unselected channels:

* ``state="freeze"`` (default): kept as it was when the channel was last
  trained, and used again when the channel is drawn again, the same thing
  that happens to a layer that is frozen as a whole (the optimizer does not
  touch it). Per-tensor scalars (Adam's ``step``) still count every step of
  the tensor.
* ``state="reset"``: zeroed, so a re-drawn channel starts with fresh state
  (for a wholly frozen layer, at the first step after it is frozen).
* ``state="keep"``: left to the optimizer (it decays); only the weights are
  held. Cheapest.

Cost: one copy of the unselected entries (and of the matching state entries
with ``"freeze"``) of the partially selected layers only, per step; wholly
frozen layers cost nothing.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

STATE_MODES = ("freeze", "reset", "keep")


def owned_entries(module: nn.Module, channels: Tensor) -> Tensor:
    """Boolean mask of the weight entries that input ``channels`` own (are trained)."""
    weight = module.weight
    owned = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    channels = channels.to(device=weight.device, dtype=torch.long)
    if weight.dim() == 2:                       # Linear [out, in]
        owned[:, channels] = True
        return owned
    groups = getattr(module, "groups", 1)
    out_channels, in_per_group = weight.shape[:2]
    out_per_group = out_channels // groups
    group = channels // in_per_group
    rows = group[:, None] * out_per_group + torch.arange(out_per_group, device=weight.device)[None]
    owned[rows, (channels % in_per_group)[:, None]] = True
    return owned


class OptimizerMask:
    """Step hooks on ``optimizer`` so that only selected channels (and the classifier) change.

    Made by :meth:`TraDyController.mask_optimizer`; ``remove()`` takes the hooks off
    (``controller.revert()`` does it too).
    """

    def __init__(self, controller, optimizer: torch.optim.Optimizer, state: str = "freeze"):
        if state not in STATE_MODES:
            raise ValueError(f"state={state!r}: allowed values are {STATE_MODES}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        self.controller = controller
        self.optimizer = optimizer
        self.state_mode = state
        self._masks: dict[int, tuple[Tensor, int, Tensor]] = {}   # id(module) -> (idx, version, frozen)
        self._saved: list[tuple[Tensor, Tensor, Tensor]] = []      # (tensor, frozen mask, values)
        self._handles = [optimizer.register_step_pre_hook(self._before_step),
                         optimizer.register_step_post_hook(self._after_step)]

    # ------------------------------------------------------------ internals
    def _layer_modules(self) -> dict[int, nn.Module]:
        """id(weight) -> TraDy module, for the controller's non-classifier layers."""
        found = {}
        for name, module in self.controller.modules.items():
            if name == self.controller.classifier or not hasattr(module, "selected_channels"):
                continue
            found[id(module.weight)] = module
        return found

    def _frozen_entries(self, module: nn.Module) -> Tensor | None:
        """Mask of the entries of unselected channels, or None when all are selected."""
        idx = module.selected_channels
        if idx.numel() == module.weight.shape[1] * getattr(module, "groups", 1):
            return None
        cached = self._masks.get(id(module))
        if cached is not None and cached[0] is idx and cached[1] == idx._version:
            return cached[2]
        frozen = ~owned_entries(module, idx)
        self._masks[id(module)] = (idx, idx._version, frozen)
        return frozen

    def _state_tensors(self, p: Tensor) -> list[Tensor]:
        return [v for v in self.optimizer.state.get(p, {}).values()
                if isinstance(v, Tensor) and v.shape == p.shape and v.is_floating_point()]

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        self._saved = []
        layers = self._layer_modules()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    p.grad = None            # the optimizer skips it: no decay, no momentum
                    continue
                module = layers.get(id(p))
                if module is None or p.grad is None:
                    continue                 # classifier / user's own trainable parameters
                frozen = self._frozen_entries(module)
                if frozen is None:
                    continue
                held = [p]
                if self.state_mode == "freeze":
                    held += self._state_tensors(p)
                for tensor in held:
                    self._saved.append((tensor, frozen, tensor.masked_select(frozen)))

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        for tensor, frozen, values in self._saved:
            tensor.masked_scatter_(frozen, values)
        self._saved = []
        if self.state_mode != "reset":
            return
        layers = self._layer_modules()
        for group in optimizer.param_groups:
            for p in group["params"]:
                module = layers.get(id(p))
                if module is None:
                    continue
                states = self._state_tensors(p)
                if not states:
                    continue
                frozen = None if p.requires_grad else True
                if p.requires_grad:
                    frozen = self._frozen_entries(module)
                    if frozen is None:
                        continue
                for tensor in states:
                    if frozen is True:
                        tensor.zero_()
                    else:
                        tensor.masked_fill_(frozen, 0)

    # ------------------------------------------------------------ public
    def remove(self) -> None:
        """Take the hooks off the optimizer (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._masks.clear()
        self._saved = []
        masks = getattr(self.controller, "_optimizer_masks", None)
        if masks is not None and self in masks:
            masks.remove(self)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __repr__(self) -> str:
        return (f"OptimizerMask({type(self.optimizer).__name__}, state={self.state_mode!r}, "
                f"{'active' if self.active else 'removed'})")
