"""TraDy modules: drop-in subclasses of the torch.nn layers they replace.

They keep the parent's attribute names (``weight``, ``bias``, running stats), so
a converted model's state_dict has the original keys. Each decides per call
whether autograd is involved at all (layers before the earliest trainable one
run as plain ops and save nothing) and which Function of ``autograd.py`` to use.

A layer is *trained* when its ``weight.requires_grad`` is True; it then
computes the weight gradient for the input channels in its non-persistent
buffer ``selected_channels`` only (all channels unless the controller says
otherwise).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import autograd as fn


def _grad_needed(x: Tensor, *params) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p is not None and p.requires_grad for p in params)


def _cache_key(*tensors) -> tuple:
    """What a cache derived from ``tensors`` is keyed on: in-place writes bump the version
    counter, ``.to()`` / reloads change the storage (writes through ``.data`` are not seen)."""
    return tuple(None if t is None else (t._version, t.data_ptr(), t.device) for t in tensors)


class _FusionTarget:
    """Mixin: receive a compact copy prepared by an upstream fused BN->ReLU kernel.

    Only a weak reference to the upstream output is kept, so a forward that
    never reaches this layer leaks nothing.
    """

    def _offer_compact(self, y: Tensor, compact: Tensor) -> None:
        self._fused_input = (weakref.ref(y), compact)

    def _take_compact(self, x: Tensor):
        offered = getattr(self, "_fused_input", None)
        self._fused_input = None
        if offered is not None and offered[0]() is x:
            return offered[1]
        return None


class TraDyConv2d(_FusionTarget, nn.Conv2d):
    """nn.Conv2d that trains only the input channels ``selected_channels``."""

    compact_bits: int | None = None   # compressed mode: bits of the kept compact copy

    def _trady_setup(self) -> None:
        self.register_buffer("selected_channels",
                             torch.arange(self.in_channels, device=self.weight.device),
                             persistent=False)
        self._fused_input = None
        self._fold_into = None   # (TraDyBatchNorm2d,) to fold while both are frozen; controller

    def forward(self, x: Tensor) -> Tensor:
        bn = self._foldable_bn()
        if bn is not None:
            return self._folded_forward(x, bn)
        if not _grad_needed(x, self.weight, self.bias):
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding,
                            self.dilation, self.groups)
        compact = self._take_compact(x)
        if self.weight.requires_grad:
            return fn.SelectedConv2d.apply(x, self.weight, self.bias, self.selected_channels,
                                           self.stride, self.padding, self.dilation,
                                           self.groups, compact, self.compact_bits)
        return fn.FrozenConv2d.apply(x, self.weight, self.bias, self.stride, self.padding,
                                     self.dilation, self.groups)

    def _foldable_bn(self):
        """The wired BN if this conv and it are both frozen in the current selection
        (checked per call: the next resample may train either)."""
        if self._fold_into is None:
            return None
        bn = self._fold_into[0]
        frozen = not any(p is not None and p.requires_grad for p in (self.weight, self.bias))
        return bn if frozen and bn.uses_frozen_affine() else None

    def _folded_forward(self, x: Tensor, bn: "TraDyBatchNorm2d") -> Tensor:
        """conv then frozen BN as one conv with the BN's scale and shift folded in;
        the BN passes this output through."""
        weight, bias = self._folded_weight_bias(bn, x.dtype)
        if _grad_needed(x):
            y = fn.FrozenConv2d.apply(x, weight, bias, self.stride, self.padding,
                                      self.dilation, self.groups)
        else:
            y = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        bn._folded_output = weakref.ref(y)
        return y

    def _folded_weight_bias(self, bn: "TraDyBatchNorm2d", dtype) -> tuple[Tensor, Tensor]:
        """weight * scale and bias * scale + shift, cached like the BN's own scale and
        shift: keyed on the version counters and storages of both modules' tensors."""
        scale, shift = bn.frozen_scale_shift(dtype)
        key = (dtype, scale.data_ptr(), shift.data_ptr()) + _cache_key(self.weight, self.bias)
        cache = self.__dict__.get("_folded_cache")
        if cache is not None and cache[0] == key and not torch.compiler.is_compiling():
            return cache[1], cache[2]
        with torch.no_grad():
            weight = self.weight.to(dtype) * scale.view(-1, 1, 1, 1)
            bias = shift if self.bias is None else self.bias.to(dtype) * scale + shift
        self.__dict__["_folded_cache"] = (key, weight, bias)
        return weight, bias


class TraDyLinear(_FusionTarget, nn.Linear):
    """nn.Linear that trains only the input features ``selected_channels``."""

    compact_bits: int | None = None   # compressed mode: bits of the kept compact copy

    def _trady_setup(self) -> None:
        self.register_buffer("selected_channels",
                             torch.arange(self.in_features, device=self.weight.device),
                             persistent=False)
        self._fused_input = None

    def forward(self, x: Tensor) -> Tensor:
        if not _grad_needed(x, self.weight, self.bias):
            return F.linear(x, self.weight, self.bias)
        compact = self._take_compact(x)
        if self.weight.requires_grad:
            return fn.SelectedLinear.apply(x, self.weight, self.bias, self.selected_channels,
                                           compact, self.compact_bits)
        return fn.FrozenLinear.apply(x, self.weight, self.bias)


class _MaskedActivation:
    """Mixin for ReLU / ReLU6: keep a 1-bit mask instead of the activation."""

    upper: float | None = None

    def _trady_setup(self) -> None:
        self._fused_output = None

    def forward(self, x: Tensor) -> Tensor:
        fused = self._fused_output
        self._fused_output = None
        if fused is not None and fused() is x:   # already activated by a fused BN kernel
            return x
        if not _grad_needed(x):
            return super().forward(x)
        return fn.MaskedClamp.apply(x, self.upper, self.inplace)


class TraDyReLU(_MaskedActivation, nn.ReLU):
    upper = None


class TraDyReLU6(_MaskedActivation, nn.ReLU6):
    upper = 6.0


class TraDyBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, with frozen statistics, is an affine map saving nothing.

    ``freeze_stats=True`` (convert()'s default) uses the running statistics in
    train mode too, like torchvision's FrozenBatchNorm2d. With
    ``freeze_stats=False`` in train mode, or with a trainable BN weight, it is
    plain PyTorch BatchNorm (which saves its input; the report counts it).
    """

    def _trady_setup(self, freeze_stats: bool = True) -> None:
        self.freeze_stats = freeze_stats
        self._fuse_with = None   # (activation module, consumer layer), set by convert()
        self._folded_output = None   # weakref to the output of a conv this BN is folded into

    def uses_frozen_affine(self) -> bool:
        frozen_stats = self.freeze_stats or not self.training
        trainable = any(p is not None and p.requires_grad for p in (self.weight, self.bias))
        return frozen_stats and self.track_running_stats and not trainable

    def forward(self, x: Tensor) -> Tensor:
        folded, self._folded_output = self.__dict__.get("_folded_output"), None
        if folded is not None and folded() is x:   # already applied by the conv before it
            return x
        if not self.uses_frozen_affine():
            return super().forward(x)
        if not _grad_needed(x):
            with torch.no_grad():
                return fn.FrozenAffine.apply(x, *self.frozen_scale_shift(x.dtype))
        fused = self._fused_forward(x)
        if fused is not None:
            return fused
        return fn.FrozenAffine.apply(x, *self.frozen_scale_shift(x.dtype))

    def frozen_scale_shift(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Per-channel (scale, shift) in ``dtype``, cached while the BN is unchanged.

        Recomputing them costs about eight tiny kernel launches per BN and step
        (forward and backward), which on a GPU is host time the step waits on. The
        cache key holds the version counter and storage of the weight, bias and
        statistics, so in-place updates (``load_state_dict``, ``.to()``, ``copy_``)
        refresh it; writes through ``.data`` bypass the version counter and are not
        seen (use ``copy_`` under ``torch.no_grad()``). Under torch.compile the values
        are computed in the graph.
        """
        tensors = (self.weight, self.bias, self.running_mean, self.running_var)
        if torch.compiler.is_compiling():
            return fn.frozen_bn_scale_shift(*tensors, self.eps, dtype)
        key = (dtype, self.eps) + _cache_key(*tensors)
        cache = self.__dict__.get("_frozen_cache")
        if cache is not None and cache[0] == key:
            return cache[1], cache[2]
        with torch.no_grad():
            scale, shift = fn.frozen_bn_scale_shift(*tensors, self.eps, dtype)
        self.__dict__["_frozen_cache"] = (key, scale, shift)
        return scale, shift

    def _fused_forward(self, x: Tensor):
        """BN -> ReLU/ReLU6 (-> compact copy for a partially trained consumer) in one
        kernel, if wired; without a compact copy only where the kernels fuse that (CPU)."""
        if self._fuse_with is None or x.dim() != 4:
            return None
        activation, consumer = self._fuse_with
        weight = consumer.weight
        scale, shift = self.frozen_scale_shift(x.dtype)
        if weight.requires_grad and consumer.selected_channels.numel() != weight.shape[1]:
            y, compact = fn.FusedAffineClamp.apply(x, scale, shift, activation.upper,
                                                   consumer.selected_channels)
            consumer._offer_compact(y, compact)
        elif fn.has_affine_clamp(x):
            y = fn.AffineClamp.apply(x, scale, shift, activation.upper)
        else:
            return None
        activation._fused_output = weakref.ref(y)
        return y


class TraDyAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """Global average pooling as a mean, whose backward needs no saved tensor."""

    def _trady_setup(self) -> None:
        pass

    def forward(self, x: Tensor) -> Tensor:
        if self.output_size in (1, (1, 1)):
            return x.mean(dim=(-2, -1), keepdim=True)
        return super().forward(x)
