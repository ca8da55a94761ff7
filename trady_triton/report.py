"""The controller's printed report: a per-layer table and totals, next to full fine-tuning."""

from __future__ import annotations

import torch.nn as nn

from . import cost as C
from .tables import mib, text_table
from .compressed import backward_bits_of, summed_input_bits


def _mib(nbytes: float) -> str:
    return f"{mib(nbytes, 3)} MiB"


def format_report(controller, batch: int, measured_bytes: int | None = None) -> str:
    layers = controller.layers
    counts = controller.counts()
    rows = [("layer", "shape", "selected/total", "units", "saved bytes", "dW GFLOP")]
    for layer in layers:
        k = counts.get(layer.name, 0)
        units = k * layer.units_per_channel
        saved = layer.compact_bytes(k, batch) if k else 0
        flops = C.weight_grad_flops(layer, k, batch) / 1e9
        name = layer.name + (" (classifier)" if layer.is_classifier else "")
        rows.append((name, layer.shape_str(), f"{k}/{layer.in_channels}", str(units), str(saved),
                     f"{flops:.4f}"))
    lines = text_table(rows[0], rows[1:], align="l").split("\n")

    stats = controller.stats()
    analytic = controller.saved_bytes(batch)
    full_flops = sum(C.weight_grad_flops(l, l.in_channels, batch) for l in layers)
    sel_flops = sum(C.weight_grad_flops(l, counts.get(l.name, 0), batch) for l in layers)
    budget = "none" if controller.budget_units is None else f"{controller.budget_units:,}"
    lines += [
        "",
        f"policy {controller.policy.name}, epoch {controller.epoch}, seed {controller.seed}, "
        f"batch {batch}",
        f"memory units per sample: selected {stats.selected_units:,} of budget {budget} "
        f"(full fine-tuning {stats.full_units:,}; classifier excluded)",
        f"weight-derivative sparsity {stats.weight_sparsity:.2%}, activation sparsity "
        f"{stats.activation_sparsity:.2%}, weight-gradient FLOPs saved {stats.flops_saved:.2%}",
        f"weight-gradient GFLOP (all layers, batch {batch}): {sel_flops / 1e9:.4f} vs full "
        f"{full_flops / 1e9:.4f}",
        f"saved for backward (analytic): {_mib(analytic['total'])} = activations "
        f"{_mib(analytic['activations'])} + classifier input {_mib(analytic['classifier'])} + "
        f"1-bit masks {_mib(analytic['masks'])}",
        f"full fine-tuning keeps at least {_mib(C.full_finetune_saved_bytes_estimate(layers, batch))}"
        " of conv/linear inputs alone",
    ]
    bits = backward_bits_of(controller.model)
    lines.append("backward: exact" if bits is None else
                 f"backward: compressed, SiLU/GELU/Hardswish keep {bits}-bit derivative codes "
                 f"(levels fitted per tensor); LayerNorm inputs and attention qkv {bits}-bit, "
                 f"squeeze-excitation x and compact copies {summed_input_bits(bits)}-bit integers "
                 "with per-group scales; the classifier's input, masks and window codes exact")
    if isinstance(measured_bytes, dict):
        lines += _per_module_lines(controller, batch, measured_bytes)
    elif measured_bytes is not None:
        lines.append(f"saved for backward (measured): {_mib(measured_bytes)}")
    others = controller.profile.other_modules
    if others:
        kinds = sorted({cls for _, cls in others})
        lines.append(f"not converted (PyTorch behaviour, counted only when measured): "
                     f"{len(others)} modules of types {', '.join(kinds)}")
    return "\n".join(lines)


def _per_module_lines(controller, batch: int, measured: dict[str, int]) -> list[str]:
    """Every module that kept tensors (``saved_bytes_by_module``) next to the cost model."""
    modelled = C.saved_bytes_per_module(controller.layers, controller.profile.masks,
                                        controller.counts(), batch)
    rows = [("module (kept for backward)", "type", "kept as", "measured bytes", "cost model bytes")]
    for name in sorted(set(measured) | set(modelled), key=lambda n: -measured.get(n, 0)):
        module = controller.model.get_submodule(name) if name else None
        kind = type(module).__name__ if name else "functional calls in the model's forward"
        rows.append((name or "(model)", kind, kept_as(module), str(measured.get(name, 0)),
                     str(modelled[name]) if name in modelled else "not modelled"))
    table = text_table(rows[0], rows[1:], align="lllrr").split("\n")
    total = sum(measured.values())
    return ["", *table, f"saved for backward (measured): {_mib(total)} (cost model "
            f"{_mib(controller.saved_bytes(batch)['total'])})"]


def kept_as(module) -> str:
    """How ``module`` keeps what it keeps for backward: the bits column of the report."""
    from . import activations as A
    from . import hf_modules as H
    from . import pooling as P
    from . import transformer as X

    bits = getattr(module, "backward_bits", None)
    if isinstance(module, A._SavedInputModule):
        return "full precision input" if bits is None else f"{bits}-bit derivative codes"
    if isinstance(module, A.TraDySqueezeExcitation):
        return "gate; x full precision or recomputed" if bits is None else \
            f"gate; x {summed_input_bits(bits)}-bit, scale per channel (or recomputed)"
    if isinstance(module, X.TraDyLayerNorm):
        return "input, mean, 1/std" if bits is None else \
            f"input {bits}-bit, scale per row; mean, 1/std"
    if isinstance(module, X.TraDyAttention):
        return "qkv full precision" if bits is None else f"qkv {bits}-bit, scale per head"
    if isinstance(module, X.TraDyMultiheadAttention) and module.took_converted_path:
        return "qkv full precision; in_proj compact copy full precision" if bits is None else \
            f"qkv {bits}-bit, scale per head; in_proj compact copy {module.compact_bits}-bit"
    if isinstance(module, H.ExactSelfAttention) and module.took_converted_path:
        return "q, k, v full precision" if bits is None else f"q, k, v {bits}-bit, scale per head"
    if isinstance(module, A._SavedOutputModule):
        return "output, full precision"
    if isinstance(module, (nn.ReLU, nn.ReLU6, nn.Hardsigmoid, nn.Dropout, nn.BatchNorm2d)):
        return "1-bit mask"
    if isinstance(module, P.TraDyMaxPool2d):
        return f"{module.code_bits}-bit window codes"
    if isinstance(module, (nn.Conv2d, nn.Conv1d, nn.Linear)):
        compact_bits = getattr(module, "compact_bits", None)
        return "compact copy, full precision" if compact_bits is None else \
            f"compact copy {compact_bits}-bit, scale per channel"
    return "as PyTorch"
