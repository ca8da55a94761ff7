"""LayerNorm, attention and transformer MLPs that keep the least for backward.

* ``LayerNormKeepsInput`` (LayerNorm with a frozen or no affine): the input and the
  per-row mean and 1/std, as PyTorch; what changes is that the following projection,
  frozen, keeps nothing, or, trained, only its compact copy.
* ``AttentionCore`` (multi-head ``F.scaled_dot_product_attention`` on a packed
  ``qkv``): only ``qkv``. Backward recomputes the attention from it (as FlashAttention
  recomputes the probabilities) and differentiates that: the same ops, so PyTorch's
  gradient.
* ``RecomputedActivation`` (``act(fc1(x))`` in an MLP, act = GELU / SiLU / Hardswish):
  ``x``, the fc1 input, instead of fc1's output, 4x wider in a transformer; backward
  recomputes ``fc1(x)`` with the same op (the same bits). A trained fc1 that selects
  every feature keeps the same ``x`` (one storage).

The modules here replace the ``Attention`` and ``MLP`` of
:mod:`trady_triton.models.transformer_blocks` and ``nn.LayerNorm``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from .activations import _INPUT_KINDS, TraDyGELU, TraDyHardswish, TraDySiLU
from .models.transformer_blocks import MLP, Attention, attention_core


def _grad_needed(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class LayerNormKeepsInput(Function):
    """LayerNorm without trainable affine: keeps x, mean and 1/std."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps):
        y, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
        ctx.normalized_shape, ctx.weight, ctx.bias = normalized_shape, weight, bias
        ctx.save_for_backward(x, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, mean, rstd = ctx.saved_tensors
        grad_x = torch.ops.aten.native_layer_norm_backward(
            grad_y, x, ctx.normalized_shape, mean, rstd, ctx.weight, ctx.bias,
            [True, False, False])[0]
        return grad_x, None, None, None, None


class AttentionCore(Function):
    """:func:`attention_core` keeping only the packed ``qkv``."""

    @staticmethod
    def forward(ctx, qkv, heads, mask):
        ctx.heads, ctx.mask = heads, mask
        ctx.save_for_backward(qkv)
        return attention_core(qkv, heads, mask)

    @staticmethod
    def backward(ctx, grad_o):
        (qkv,) = ctx.saved_tensors
        with torch.enable_grad():
            leaf = qkv.detach().requires_grad_(True)
            (grad_qkv,) = torch.autograd.grad(attention_core(leaf, ctx.heads, ctx.mask), leaf,
                                              grad_o)
        return grad_qkv, None, None


class RecomputedActivation(Function):
    """``act(u)`` with ``u = F.linear(x, weight, bias)``, keeping x instead of u."""

    @staticmethod
    def forward(ctx, u, x, weight, bias, kind):
        ctx.weight, ctx.bias, ctx.kind = weight, bias, kind
        ctx.save_for_backward(x)
        return _INPUT_KINDS[kind][0](u)

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        u = F.linear(x, ctx.weight.to(x.dtype), None if ctx.bias is None else ctx.bias.to(x.dtype))
        return _INPUT_KINDS[ctx.kind][1](grad_y, u), None, None, None, None


class TraDyLayerNorm(nn.LayerNorm):
    """nn.LayerNorm; with a frozen (or no) affine, see :class:`LayerNormKeepsInput`."""

    def _trady_setup(self) -> None:
        pass

    def trainable_affine(self) -> bool:
        return any(p is not None and p.requires_grad for p in (self.weight, self.bias))

    def forward(self, x: Tensor) -> Tensor:
        if not _grad_needed(x) or self.trainable_affine():
            return super().forward(x)
        return LayerNormKeepsInput.apply(x, tuple(self.normalized_shape), self.weight, self.bias,
                                         self.eps)


class TraDyAttention(Attention):
    """Attention whose core keeps only ``qkv`` (see :class:`AttentionCore`)."""

    def _trady_setup(self) -> None:
        pass

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        qkv = self.qkv(x)
        if not _grad_needed(qkv):
            return self.proj(attention_core(qkv, self.heads, mask))
        return self.proj(AttentionCore.apply(qkv, self.heads, mask))


_RECOMPUTABLE_KINDS = {TraDySiLU: lambda m: "silu", TraDyHardswish: lambda m: "hardswish",
                       TraDyGELU: lambda m: "gelu" if m.approximate == "none" else "gelu-tanh"}


class TraDyMLP(MLP):
    """MLP whose activation keeps fc1's input, not its output (see :class:`RecomputedActivation`)."""

    def _trady_setup(self) -> None:
        pass

    def activation_kind(self) -> str | None:
        """The kind recomputed from fc1's input, or None when the activation runs itself."""
        kind = _RECOMPUTABLE_KINDS.get(type(self.act))
        return None if kind is None else kind(self.act)

    def forward(self, x: Tensor) -> Tensor:
        u = self.fc1(x)
        kind = self.activation_kind()
        if kind is None or not _grad_needed(u):
            return self.fc2(self.act(u))
        return self.fc2(RecomputedActivation.apply(u, x, self.fc1.weight, self.fc1.bias, kind))
