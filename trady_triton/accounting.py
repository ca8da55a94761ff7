"""Bytes kept for backward, measured per module, functional calls included.

Each storage autograd saves is attributed to the innermost module whose forward was
running when it was saved: a converted layer's Function, a container's own functional
code (``nn.MultiheadAttention``, a squeeze-excitation product), or, under the name
``""``, the model's own forward (e.g. a ``torch.cat`` or ``F.gelu`` called there).
Parameters and buffers are excluded (resident anyway); a storage saved twice counts once,
for the module that saved it first.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .measure import saved_tensor_bytes


def saved_bytes_by_module(model: nn.Module, *inputs, **kwargs) -> dict[str, int]:
    """Run ``model(*inputs, **kwargs)`` with autograd on; module name -> bytes it kept.

    Only modules that kept something are listed; the values sum to
    ``saved_tensor_bytes(model)`` of the same forward. The output is dropped, so the
    graph (and what it kept) is freed on return.
    """
    names = {id(m): name for name, m in model.named_modules()}
    running = [""]
    by_module: dict[str, int] = {}

    def enter(module, args):
        running.append(names[id(module)])

    def leave(module, args, output):
        running.pop()

    def attribute(nbytes):
        by_module[running[-1]] = by_module.get(running[-1], 0) + nbytes

    handles = []
    for module in model.modules():
        if module is not model:
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        with torch.enable_grad(), saved_tensor_bytes(model, on_new_storage=attribute):
            model(*inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return by_module


def plain_and_converted_bytes(net: nn.Module, x, keep_ratio: float, seed: int = 0,
                              policy: str = "d-fullrandom", **convert_options
                              ) -> tuple[int, int, int]:
    """(plain PyTorch, converted measured, converted cost model) bytes kept by ``net(x)``.

    Plain = full fine-tuning of a copy, every parameter trained, in eval mode (BatchNorm
    keeps its statistics). ``net`` is converted in place (``convert_options`` passed on,
    e.g. ``backward_bits``) and measured in train mode.
    """
    from .api import convert

    net.eval()
    plain = copy.deepcopy(net)
    for p in plain.parameters():
        p.requires_grad_(True)
    with saved_tensor_bytes(plain) as saved_plain:
        plain(x)
    controller = convert(net, keep_ratio, example_input=x, policy=policy, seed=seed,
                         **convert_options)
    net.train()
    with saved_tensor_bytes(net) as saved:
        net(x)
    return saved_plain.total, saved.total, controller.saved_bytes(x.shape[0])["total"]
