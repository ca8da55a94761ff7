"""Double backward through a TraDy autograd Function raises a clear error.

The Functions' backward passes compute first-order gradients from what the
forward saved (a compact copy of some channels, a 1-bit mask, no activation at
all): differentiating them again would give wrong second derivatives. So a
backward run to build a graph of the gradient (``create_graph=True``, as
``gradgradcheck``, gradient penalties, MAML and Hessian-vector products do)
raises at once, naming the layer.

Why not ``torch.autograd.function.once_differentiable``: its message does not
name the layer, and its error is delayed to a node that ``torch.autograd.grad``
skips when it is not on the path to the requested inputs, so some second
derivatives would come back as silent zeros instead of an error.
"""

from __future__ import annotations

import functools

import torch


def second_order_message(layer: str, function: str) -> str:
    return (f"double backward through {layer} (autograd Function {function}): second-order "
            "gradients are not supported by TraDy layers, whose backward computes first-order "
            "gradients only; this backward ran with create_graph=True (as gradgradcheck, "
            "gradient penalties, MAML-style meta-learning and Hessian-vector products do). "
            "Revert the model with trady_triton.revert() to use plain torch.nn layers for that")


def first_order_only(layer: str):
    """Decorate a Function's ``backward``: running it with ``create_graph=True`` raises.

    ``layer`` names the layer type whose forward uses the Function. A plain
    first-order backward pays one ``torch.is_grad_enabled()``.
    """
    def decorate(backward):
        message = second_order_message(layer, backward.__qualname__.split(".")[0])
        grad_enabled = torch.is_grad_enabled   # bound once: this runs in every backward

        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if grad_enabled():   # autograd enables grad in backward only for create_graph=True
                raise RuntimeError(message)
            return backward(ctx, *grads)
        wrapper.first_order_only = True   # lets tests find an unguarded Function
        return wrapper
    return decorate
