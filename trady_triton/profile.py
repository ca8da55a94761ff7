"""One profiling forward: layer shapes, execution order, masks and fusable patterns.

The cost model needs each layer's per-sample input size, which only a forward
pass tells; the order of execution tells which activations lie on the backward
path of the earliest trained layer; and the data flow (which tensor feeds which
module) finds the BN -> ReLU/ReLU6 -> conv chains that one fused kernel serves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import activations as A
from . import hf
from . import pooling as P
from . import transformer as X
from .compressed import summed_input_bits
from .cost import GateCost, KeptCost, LayerCost, MaskCost, RecomputeCost, element_bytes

_ACTIVATIONS = (nn.ReLU, nn.ReLU6)
# Leaf modules whose backward needs no saved tensor: not "unsupported".
# (nn.Embedding: frozen by convert(), and its integer input needs no gradient)
_SAVE_NOTHING = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Embedding, P.TraDyAvgPool2d)
_KEEP_INPUT = (A._SavedInputModule,)   # SiLU, Hardswish, GELU, HF's GELUActivation
_KEEP_OUTPUT = (A.TraDySigmoid, A.TraDyTanh)
# containers that are costed themselves (their forward does more than call children)
_COSTED_CONTAINERS = (A.TraDySqueezeExcitation, X.TraDyAttention, X.TraDyMLP)
# containers not converted whose own forward keeps tensors (functional calls): listed
_KEEP_THEMSELVES = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


@dataclass
class Profile:
    layers: list[LayerCost]
    masks: list                                # MaskCost / KeptCost / GateCost entries
    fusions: list[tuple[str, str, str]]        # (batchnorm, activation, consumer) names
    other_modules: list[tuple[str, str]]       # (name, class) of leaves we do not convert
    calls: list[str] = field(default_factory=list)
    # (conv, batchnorm) names: a BN fed only by a conv and not fused with an activation
    conv_bn_folds: list[tuple[str, str]] = field(default_factory=list)


def find_classifier(model: nn.Module) -> str | None:
    """The last nn.Linear (by registration order): the classifier, trained in full."""
    name = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            name = module_name
    return name


def _spatial(shape: torch.Size, kind: str) -> tuple[int, ...]:
    return tuple(shape[2:]) if kind == "conv" else tuple(shape[1:-1])


def _record_forward(model: nn.Module, example_input):
    """One no_grad forward; (records, starts): each hooked module's (order, name, module,
    first input, output), and the entry position of each costed container."""
    records = []   # (order, name, module, input tensor, output tensor)
    starts = {}    # name -> position at entry, for the costed containers
    handles = []

    def hook_for(name):
        def hook(module, inputs, output):
            first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            records.append((len(records), name, module, first,
                            output if isinstance(output, torch.Tensor) else None))
        return hook

    def start_hook_for(name):
        def hook(module, inputs):
            starts.setdefault(name, len(records))
        return hook

    for name, module in model.named_modules():
        leaf = not any(True for _ in module.children())
        if isinstance(module, (*_COSTED_CONTAINERS, X.TraDyMultiheadAttention)):
            handles.append(module.register_forward_pre_hook(start_hook_for(name)))
        if leaf or isinstance(module, (nn.Conv2d, nn.Conv1d, nn.Linear, *_COSTED_CONTAINERS,
                                       *_KEEP_THEMSELVES, *hf.self_attention_classes(),
                                       *hf.costed_containers())):
            handles.append(module.register_forward_hook(hook_for(name)))
    was_training = model.training
    try:
        with torch.no_grad():
            if isinstance(example_input, dict):   # keyword inputs (HF: input_ids=...)
                model(**example_input)
            else:
                model(*(example_input if isinstance(example_input, tuple) else (example_input,)))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return records, starts


def profile_model(model: nn.Module, example_input, classifier: str | None = "auto") -> Profile:
    """Run ``model(example_input)`` once under no_grad, recording what the cost model needs."""
    if classifier == "auto":
        classifier = find_classifier(model)
    records, starts = _record_forward(model, example_input)

    layers, masks, other = [], [], []
    seen = {f"{n}.act" for n, m in model.named_modules()   # run inside RecomputedActivation
            if isinstance(m, X.TraDyMLP) and m.activation_kind()} | hf.recomputed_activations(model)
    for order, name, module, x, y in records:
        if name in seen:
            continue    # a module called twice is costed at its first call
        seen.add(name)
        if isinstance(module, nn.Conv2d) and x is not None:
            layers.append(LayerCost(name, "conv", module.in_channels, module.out_channels,
                                    module.groups, tuple(module.kernel_size),
                                    _spatial(x.shape, "conv"), _spatial(y.shape, "conv"),
                                    element_bytes(x.dtype), order, name == classifier,
                                    getattr(module, "compact_bits", None)))
        elif isinstance(module, nn.Conv1d) and x is not None:   # costed as a Conv2d of height 1
            layers.append(LayerCost(name, "conv", module.in_channels, module.out_channels,
                                    module.groups, (1, module.kernel_size[0]), tuple(x.shape[-1:]),
                                    tuple(y.shape[-1:]), element_bytes(x.dtype), order,
                                    name == classifier, getattr(module, "compact_bits", None)))
        elif isinstance(module, nn.Linear) and x is not None:
            layers.append(LayerCost(name, "linear", module.in_features, module.out_features, 1,
                                    (1, 1), _spatial(x.shape, "linear"), _spatial(y.shape, "linear"),
                                    element_bytes(x.dtype), order, name == classifier,
                                    getattr(module, "compact_bits", None)))
        elif isinstance(module, _ACTIVATIONS) and x is not None:
            masks.append(MaskCost(name, math.prod(x.shape[1:]), order))
        elif isinstance(module, X.TraDyMultiheadAttention) and module.took_converted_path \
                and x is not None:
            in_proj, core = _multihead_costs(name, module, x, starts[name])
            layers.append(in_proj)
            masks.append(core)
        elif isinstance(module, _NEW_KINDS) and x is not None:
            masks += _kept_costs(order, name, module, x, y, records, starts)
        elif x is not None and (hf_costs := hf.kept_costs(order, name, module, x, records)) \
                is not None:
            masks += hf_costs
        elif not isinstance(module, (nn.BatchNorm2d, nn.AdaptiveAvgPool2d, *_SAVE_NOTHING)):
            other.append((name, _class_name(module)))
        elif isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size not in (1, (1, 1)):
            other.append((name, _class_name(module)))
    layers.sort(key=lambda layer: layer.order)   # an MHA's in_proj ran before its out_proj
    fusions = _find_fusions(records)
    return Profile(layers, masks, fusions, other, [r[1] for r in records],
                   _find_conv_bn_folds(records, fusions))


def _multihead_costs(name, module, x, start) -> tuple[LayerCost, KeptCost]:
    """A converted MultiheadAttention: its input projection (a layer under the module's
    name, run first: order just before the entry position) and the core keeping the
    packed qkv (just after it; out_proj, a Linear of its own, runs later); in compressed
    mode the compact copy's and qkv's codes, as our own attention's."""
    tokens = x.shape[1 if module.batch_first else 0]
    dim, size = module.embed_dim, element_bytes(x.dtype)
    in_proj = LayerCost(name, "linear", dim, 3 * dim, 1, (1, 1), (tokens,), (tokens,),
                        size, start - 0.5, False, module.compact_bits)
    per_sample = 3 * dim * tokens
    if module.backward_bits is None:
        return in_proj, KeptCost(name, per_sample, 8 * size, start - 0.25)
    groups = per_sample // (dim // module.num_heads)   # a (minimum, step) per token, q/k/v, head
    return in_proj, KeptCost(name, per_sample, module.backward_bits, start - 0.25,
                             extra_bytes_per_sample=2 * groups * size)


_NEW_KINDS = (A.TraDyHardsigmoid, A.TraDyDropout, P.TraDyMaxPool2d, X.TraDyLayerNorm,
              *_KEEP_INPUT, *_KEEP_OUTPUT, *_COSTED_CONTAINERS)


def _kept_costs(order, name, module, x, y, records, starts) -> list:
    """Cost entries of one converted module of activations.py / pooling.py."""
    per_sample = math.prod(x.shape[1:])
    bits = 8 * element_bytes(x.dtype)
    if isinstance(module, A.TraDyHardsigmoid):
        return [MaskCost(name, per_sample, order)]
    if isinstance(module, A.TraDyDropout):   # costed as in training; in eval it keeps nothing
        return [MaskCost(name, per_sample, order)] if 0.0 < module.p < 1.0 else []
    if isinstance(module, P.TraDyMaxPool2d):
        return [KeptCost(name, math.prod(y.shape[1:]), module.code_bits, order)]
    if isinstance(module, _KEEP_INPUT) and module.backward_bits is not None:   # derivative codes
        levels = 2 ** module.backward_bits * element_bytes(x.dtype)
        return [KeptCost(name, per_sample, module.backward_bits, order, fixed_bytes=levels)]
    if isinstance(module, _KEEP_INPUT):
        return [KeptCost(name, per_sample, bits, order, _layer_taking(records, x))]
    if isinstance(module, _KEEP_OUTPUT):
        return [KeptCost(name, math.prod(y.shape[1:]), bits, order, _layer_taking(records, y))]
    if isinstance(module, X.TraDyLayerNorm):
        return [_layer_norm_cost(order, name, module, x)]
    if isinstance(module, X.TraDyAttention):
        return [_attention_cost(name, module, records)]
    if isinstance(module, X.TraDyMLP):
        if module.activation_kind() is None:
            return []
        fc1 = _record(records, f"{name}.fc1")
        return [RecomputeCost(name, per_sample, element_bytes(x.dtype), fc1[1], fc1[0],
                              module.fc1.in_features)]
    return [_gate_cost(order, name, module, x, records, starts)]


def _layer_norm_cost(order, name, module, x) -> KeptCost:
    """x and, per normalised row, mean and 1/std; compressed: x as codes + per-row scales."""
    per_sample, size = math.prod(x.shape[1:]), element_bytes(x.dtype)
    rows = per_sample // math.prod(module.normalized_shape)
    if module.backward_bits is None:
        return KeptCost(name, per_sample + 2 * rows, 8 * size, order)
    return KeptCost(name, per_sample, module.backward_bits, order,
                    extra_bytes_per_sample=(2 + 2) * rows * size)


def _attention_cost(name, module, records) -> KeptCost:
    """The packed qkv; compressed: codes + a (minimum, step) per (token, q/k/v, head)."""
    _, _, _, _, qkv = _record(records, f"{name}.qkv")
    order = _record(records, f"{name}.qkv")[0] + 0.5   # the core runs just after qkv
    per_sample, size = math.prod(qkv.shape[1:]), element_bytes(qkv.dtype)
    if module.backward_bits is None:
        return KeptCost(name, per_sample, 8 * size, order)
    groups = per_sample // (qkv.shape[-1] // 3 // module.heads)
    return KeptCost(name, per_sample, module.backward_bits, order,
                    extra_bytes_per_sample=2 * groups * size)


def _class_name(module: nn.Module) -> str:
    """The user's class name (a swapped module that ran PyTorch's path is listed as such)."""
    origin = getattr(module, "_trady_origin", None)   # set by convert.swap_modules
    return (type(module) if origin is None else origin.cls).__name__


def _layer_taking(records, tensor) -> tuple[str, int] | None:
    """(name, input channels) of the first conv/linear whose input is ``tensor``.

    None when a Dropout takes ``tensor``: profiled in eval mode it passes the same tensor
    on, but in training the layer after it takes a new one (HF's pooler -> dropout ->
    classifier); None also when that layer keeps compressed codes (never the same storage)."""
    for _, name, module, x, _ in records:
        if x is tensor and isinstance(module, A.TraDyDropout) and 0.0 < module.p < 1.0:
            return None
        if x is tensor and isinstance(module, (nn.Conv2d, nn.Linear)):
            if getattr(module, "compact_bits", None) is not None:
                return None
            return name, module.weight.shape[1] * getattr(module, "groups", 1)
    return None


def _record(records, name):
    return next(r for r in records if r[1] == name)


def _gate_cost(order, name, module, x, records, starts) -> GateCost:
    producer = next((r for r in records if r[4] is x), None)
    keeps_input = producer is not None and isinstance(producer[2], _KEEP_INPUT) \
        and producer[2].backward_bits is None
    source = producer[0] if keeps_input else None
    return GateCost(name, math.prod(x.shape[1:]), x.shape[1], element_bytes(x.dtype),
                    starts[name], order, source,
                    isinstance(module.scale_activation, _KEEP_OUTPUT),
                    None if keeps_input or module.backward_bits is None
                    else summed_input_bits(module.backward_bits))


def _consumers(records, tensor, after: int) -> list:
    """Records after position ``after`` whose (first) input is ``tensor``."""
    return [r for r in records[after + 1:] if r[3] is tensor]


def _find_fusions(records) -> list[tuple[str, str, str]]:
    """BN whose output feeds exactly an activation whose output feeds a conv first."""
    fusions = []
    for i in range(len(records) - 2):
        _, bn_name, bn, _, bn_out = records[i]
        _, act_name, act, act_in, act_out = records[i + 1]
        if not isinstance(bn, nn.BatchNorm2d) or not isinstance(act, _ACTIVATIONS):
            continue
        if bn_out is None or act_in is not bn_out:
            continue
        consumers = _consumers(records, act_out, i + 1)
        if consumers and isinstance(consumers[0][2], nn.Conv2d):
            fusions.append((bn_name, act_name, consumers[0][1]))
    return fusions


def _find_conv_bn_folds(records, fusions) -> list[tuple[str, str]]:
    """Conv whose output feeds one BN and nothing else seen, that BN not already fused
    with its activation (a fused BN costs no pass of its own: folding it gains nothing).
    Functional uses of the conv output (not hooked) are not seen: the profiled models
    take residuals after the BN."""
    fused = {bn for bn, _, _ in fusions}
    folds = []
    for i in range(len(records) - 1):
        _, conv_name, conv, _, conv_out = records[i]
        if not isinstance(conv, nn.Conv2d) or conv_out is None:
            continue
        consumers = _consumers(records, conv_out, i)
        if len(consumers) == 1 and isinstance(consumers[0][2], nn.BatchNorm2d) \
                and consumers[0][1] not in fused and consumers[0][0] == i + 1:
            folds.append((conv_name, consumers[0][1]))
    return folds
