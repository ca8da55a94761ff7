"""The cost model of docs/METHOD.md sections 1 and 4: memory units, bytes, FLOPs, sparsities.

All per-channel figures are per sample. For a conv with weight ``[C', C/g, D, D]``
and input ``[B, C, H, W]``, input channel ``c`` costs

    weight units      CW_c = (C'/g) * D * D
    activation units  CA_c = H * W
    time              T_c  = CW_c * H' * W'      (weight-gradient MACs per sample)

A Linear is the same with channel = input feature, ``CW_c = out_features`` and
``CA_c`` = the number of positions per sample (1 for a ``[B, in]`` input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LayerCost:
    """Shape facts of one convertible layer, measured at a profiling forward."""

    name: str
    kind: str                      # "conv" or "linear"
    in_channels: int
    out_channels: int
    groups: int
    kernel_size: tuple[int, int]
    input_spatial: tuple[int, ...]   # per-sample positions of the input (H, W) or (T,) or ()
    output_spatial: tuple[int, ...]
    element_bytes: int
    order: int                       # position in the forward's execution order
    is_classifier: bool = False
    compact_bits: int | None = None  # compressed mode: the compact copy in k-bit codes

    def compact_bytes(self, channels: int, batch: int) -> int:
        """Bytes of the compact copy of ``channels`` input channels (codes + per-channel scales)."""
        numel = batch * channels * self.activation_units_per_channel
        if self.compact_bits is None:
            return numel * self.element_bytes
        return math.ceil(numel * self.compact_bits / 8) + channels * 2 * self.element_bytes

    @property
    def weight_units_per_channel(self) -> int:
        return self.out_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]

    @property
    def activation_units_per_channel(self) -> int:
        return math.prod(self.input_spatial)

    @property
    def units_per_channel(self) -> int:
        """(Theta_space)_c = CW_c + CA_c."""
        return self.weight_units_per_channel + self.activation_units_per_channel

    @property
    def macs_per_channel(self) -> int:
        """(Theta_time)_c: weight-gradient multiply-adds per sample."""
        return self.weight_units_per_channel * math.prod(self.output_spatial)

    @property
    def weight_units(self) -> int:
        return self.in_channels * self.weight_units_per_channel

    @property
    def activation_units(self) -> int:
        return self.in_channels * self.activation_units_per_channel

    @property
    def units(self) -> int:
        return self.weight_units + self.activation_units

    def shape_str(self) -> str:
        if self.kind == "linear":
            return f"linear {self.in_channels}->{self.out_channels}"
        kh, kw = self.kernel_size
        g = "" if self.groups == 1 else (" dw" if self.groups == self.in_channels else f" g{self.groups}")
        return f"conv{kh}x{kw}{g} {self.in_channels}->{self.out_channels} @{'x'.join(map(str, self.input_spatial))}"


@dataclass(frozen=True)
class MaskCost:
    """A ReLU/ReLU6 whose 1-bit mask is kept when it runs on the backward path."""

    name: str
    numel_per_sample: int
    order: int

    category = "masks"

    def bytes_for(self, batch: int) -> int:
        return math.ceil(batch * self.numel_per_sample / 8)

    def saved_bytes(self, batch: int, first_trained: float, counts: dict[str, int]) -> int:
        return self.bytes_for(batch) if self.order > first_trained else 0


@dataclass(frozen=True)
class KeptCost:
    """A module keeping ``bits`` bits per element of a tensor when it runs on the backward path.

    E.g. SiLU / GELU / Hardswish keep their input, Sigmoid / Tanh their output (bits =
    8 x element size), MaxPool2d a window code per output element (1-8 bits), LayerNorm
    its input and per-row statistics, an attention core its packed qkv. ``order`` may be
    fractional: an attention core runs between its qkv and output projections.
    """

    name: str
    numel_per_sample: int
    bits: int
    order: int
    # (layer, its input channels): a conv/linear taking the kept tensor as input; trained
    # on every channel it keeps the same storage, which its own entry counts
    shared_with: tuple[str, int] | None = None
    # compressed mode: per-sample bytes besides the codes (scales, exact row statistics),
    # and bytes kept once per call (a derivative code's levels)
    extra_bytes_per_sample: int = 0
    fixed_bytes: int = 0
    category = "kept"

    def saved_bytes(self, batch: int, first_trained: float, counts: dict[str, int]) -> int:
        if self.order <= first_trained:
            return 0
        if self.shared_with is not None and counts.get(self.shared_with[0]) == self.shared_with[1]:
            return 0
        return (math.ceil(batch * self.numel_per_sample * self.bits / 8)
                + batch * self.extra_bytes_per_sample + self.fixed_bytes)


@dataclass(frozen=True)
class GateCost:
    """Squeeze-excitation ``x * gate``: keeps the gate when x needs a gradient, and x when
    the gate does, unless x is recomputed from the input its activation keeps anyway.

    ``start`` / ``order``: execution positions at the module's entry and exit; x needs a
    gradient when a trained layer ran before ``start``, the gate when one ran before
    ``order``. ``source_order``: position of the activation whose kept input recomputes x
    (None: x is kept itself). ``gate_kept_elsewhere``: the gate is a Sigmoid's output,
    which that Sigmoid keeps (one storage, counted there). ``x_bits`` (compressed mode):
    x kept itself is kept as ``x_bits``-bit codes with a (minimum, step) per channel.
    """

    name: str
    x_numel_per_sample: int
    gate_numel_per_sample: int
    element_bytes: int
    start: int
    order: int
    source_order: int | None
    gate_kept_elsewhere: bool
    x_bits: int | None = None
    category = "kept"

    def saved_bytes(self, batch: int, first_trained: float, counts: dict[str, int]) -> int:
        total = 0
        if self.start > first_trained and not self.gate_kept_elsewhere:
            total += batch * self.gate_numel_per_sample * self.element_bytes
        recomputed = self.source_order is not None and self.source_order > first_trained
        if self.order > first_trained and not recomputed:
            total += self._x_bytes(batch)
        return total

    def _x_bytes(self, batch: int) -> int:
        if self.x_bits is None:
            return batch * self.x_numel_per_sample * self.element_bytes
        scales = batch * self.gate_numel_per_sample * 2 * self.element_bytes
        return math.ceil(batch * self.x_numel_per_sample * self.x_bits / 8) + scales


@dataclass(frozen=True)
class RecomputeCost:
    """A transformer MLP whose activation keeps fc1's input ``x`` (not fc1's output).

    Kept when fc1's output needs a gradient (a trained layer ran at or before fc1),
    unless fc1 is trained on every input feature: it then keeps the same ``x``.
    """

    name: str
    numel_per_sample: int
    element_bytes: int
    fc1: str
    fc1_order: int
    fc1_in_features: int
    category = "kept"

    def saved_bytes(self, batch: int, first_trained: float, counts: dict[str, int]) -> int:
        if self.fc1_order < first_trained or counts.get(self.fc1) == self.fc1_in_features:
            return 0
        return batch * self.numel_per_sample * self.element_bytes


def full_units(layers: list[LayerCost]) -> int:
    """Full fine-tuning's memory units: weights + per-sample activations, classifier excluded."""
    return sum(layer.units for layer in layers if not layer.is_classifier)


@dataclass
class SelectionStats:
    """Per-epoch figures of docs/METHOD.md section 4 for one selection."""

    selected_units: int
    budget_units: int | None
    full_units: int
    weight_sparsity: float
    activation_sparsity: float
    flops_saved: float
    per_layer: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("selected_units", "budget_units", "full_units",
                                               "weight_sparsity", "activation_sparsity",
                                               "flops_saved")}


def selection_stats(layers: list[LayerCost], counts: dict[str, int],
                    budget_units: int | None = None) -> SelectionStats:
    """Sparsities and FLOPs saved for ``counts`` (layer name -> selected channels).

    The classifier is excluded from every figure, as in the paper.
    """
    body = [layer for layer in layers if not layer.is_classifier]
    w_sel = sum(counts.get(l.name, 0) * l.weight_units_per_channel for l in body)
    a_sel = sum(counts.get(l.name, 0) * l.activation_units_per_channel for l in body)
    t_sel = sum(counts.get(l.name, 0) * l.macs_per_channel for l in body)
    w_all = sum(l.weight_units for l in body)
    a_all = sum(l.activation_units for l in body)
    t_all = sum(l.in_channels * l.macs_per_channel for l in body)
    return SelectionStats(
        selected_units=w_sel + a_sel,
        budget_units=budget_units,
        full_units=w_all + a_all,
        weight_sparsity=1.0 - w_sel / w_all if w_all else 0.0,
        activation_sparsity=1.0 - a_sel / a_all if a_all else 0.0,
        flops_saved=1.0 - t_sel / t_all if t_all else 0.0,
        per_layer={l.name: counts.get(l.name, 0) for l in body},
    )


def saved_bytes_for_backward(layers: list[LayerCost], masks: list,
                             counts: dict[str, int], batch: int) -> dict[str, int]:
    """Analytic bytes that a converted model saves for backward, per component.

    Trained layers save ``batch * K * CA_c`` elements of their compact input;
    every ReLU/ReLU6/Hardsigmoid/Dropout executed after the earliest trained layer
    keeps a 1-bit mask (``masks``: :class:`MaskCost`), the other converted modules what
    their :class:`KeptCost` / :class:`GateCost` say (``kept``); frozen layers, frozen
    BatchNorm, average pooling and residual adds save none. (Unconverted modules on the
    backward path are not modelled: measure them, ``saved_bytes_by_module``.)
    """
    per_module = saved_bytes_per_module(layers, masks, counts, batch)
    heads = {l.name for l in layers if l.is_classifier}
    layer_names = {l.name for l in layers}
    categories = {m.name: m.category for m in masks}
    totals = {"activations": 0, "classifier": 0, "masks": 0, "kept": 0}
    for name, nbytes in per_module.items():
        if name in heads:
            totals["classifier"] += nbytes
        elif name in layer_names:
            totals["activations"] += nbytes
        else:
            totals[categories[name]] += nbytes
    totals["total"] = sum(totals.values())
    return totals


def saved_bytes_per_module(layers: list[LayerCost], masks: list, counts: dict[str, int],
                           batch: int) -> dict[str, int]:
    """Analytic bytes kept for backward, per module name (modules keeping nothing left out)."""
    trained = [l for l in layers if counts.get(l.name, 0) > 0]
    if not trained:
        return {}
    first = min(l.order for l in trained)
    per_module = {l.name: l.compact_bytes(counts[l.name], batch) for l in trained}
    for entry in masks:
        nbytes = entry.saved_bytes(batch, first, counts)
        if nbytes:
            per_module[entry.name] = per_module.get(entry.name, 0) + nbytes
    return per_module


def full_finetune_saved_bytes_estimate(layers: list[LayerCost], batch: int) -> int:
    """Activation bytes of all conv/linear inputs (a lower bound for plain PyTorch)."""
    return sum(batch * l.activation_units * l.element_bytes for l in layers)


def weight_grad_flops(layer: LayerCost, channels: int, batch: int) -> int:
    """FLOPs (2 x MACs) of the weight gradient for ``channels`` input channels."""
    return 2 * batch * channels * layer.macs_per_channel


def element_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
