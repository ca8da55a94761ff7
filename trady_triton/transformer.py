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

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from .activations import _INPUT_KINDS, _SavedInputModule
from .compressed import compress, restore
from .models.transformer_blocks import MLP, Attention, attention_core
from .first_order import first_order_only


def _grad_needed(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class LayerNormKeepsInput(Function):
    """LayerNorm without trainable affine: keeps x, mean and 1/std.

    With ``bits`` (compressed mode) x is kept as ``bits``-bit integers scaled per row.
    """

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps, bits=None):
        y, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
        ctx.normalized_shape, ctx.weight, ctx.bias = normalized_shape, weight, bias
        ctx.bits, ctx.x_shape = bits, x.shape
        kept = (x, None) if bits is None else compress(x, bits, math.prod(normalized_shape))
        ctx.save_for_backward(*kept, mean, rstd)
        return y

    @staticmethod
    @first_order_only("TraDyLayerNorm")
    def backward(ctx, grad_y):
        x, scales, mean, rstd = ctx.saved_tensors
        if ctx.bits is not None:
            x = restore(x, scales.to(grad_y.dtype), ctx.bits, ctx.x_shape)
        grad_x = torch.ops.aten.native_layer_norm_backward(
            grad_y, x, ctx.normalized_shape, mean, rstd, ctx.weight, ctx.bias,
            [True, False, False])[0]
        return grad_x, None, None, None, None, None


class AttentionCore(Function):
    """:func:`attention_core` keeping only the packed ``qkv``.

    With ``bits`` (compressed mode) qkv is kept as ``bits``-bit integers scaled per
    (token, q/k/v, head); backward recomputes the attention from the decoded qkv.
    """

    @staticmethod
    def forward(ctx, qkv, heads, mask, bits=None):
        ctx.heads, ctx.mask, ctx.bits, ctx.shape = heads, mask, bits, qkv.shape
        group = qkv.shape[-1] // 3 // heads
        ctx.save_for_backward(*((qkv, None) if bits is None else compress(qkv, bits, group)))
        return attention_core(qkv, heads, mask)

    @staticmethod
    @first_order_only("TraDyAttention / TraDyMultiheadAttention")
    def backward(ctx, grad_o):
        qkv, scales = ctx.saved_tensors
        if ctx.bits is not None:
            qkv = restore(qkv, scales.to(grad_o.dtype), ctx.bits, ctx.shape)
        with torch.enable_grad():
            leaf = qkv.detach().requires_grad_(True)
            (grad_qkv,) = torch.autograd.grad(attention_core(leaf, ctx.heads, ctx.mask), leaf,
                                              grad_o)
        return grad_qkv, None, None, None


class RecomputedActivation(Function):
    """``act(u)`` with ``u = F.linear(x, weight, bias)``, keeping x instead of u."""

    @staticmethod
    def forward(ctx, u, x, weight, bias, kind):
        ctx.weight, ctx.bias, ctx.kind = weight, bias, kind
        ctx.save_for_backward(x)
        return _INPUT_KINDS[kind][0](u)

    @staticmethod
    @first_order_only("TraDyMLP")
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        u = F.linear(x, ctx.weight.to(x.dtype), None if ctx.bias is None else ctx.bias.to(x.dtype))
        return _INPUT_KINDS[ctx.kind][1](grad_y, u), None, None, None, None


class TraDyLayerNorm(nn.LayerNorm):
    """nn.LayerNorm; with a frozen (or no) affine, see :class:`LayerNormKeepsInput`."""

    backward_bits: int | None = None   # set by convert(): compressed mode

    def _trady_setup(self) -> None:
        pass

    def trainable_affine(self) -> bool:
        return any(p is not None and p.requires_grad for p in (self.weight, self.bias))

    def forward(self, x: Tensor) -> Tensor:
        if not _grad_needed(x) or self.trainable_affine():
            return super().forward(x)
        return LayerNormKeepsInput.apply(x, tuple(self.normalized_shape), self.weight, self.bias,
                                         self.eps, self.backward_bits)


class TraDyAttention(Attention):
    """Attention whose core keeps only ``qkv`` (see :class:`AttentionCore`)."""

    backward_bits: int | None = None   # set by convert(): compressed mode

    def _trady_setup(self) -> None:
        pass

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        qkv = self.qkv(x)
        if not _grad_needed(qkv):
            return self.proj(attention_core(qkv, self.heads, mask))
        return self.proj(AttentionCore.apply(qkv, self.heads, mask, self.backward_bits))


class TraDyMLP(MLP):
    """MLP whose activation keeps fc1's input, not its output (see :class:`RecomputedActivation`).

    In compressed mode (the activation's ``backward_bits`` set) the activation keeps its
    k-bit derivative codes instead (:mod:`trady_triton.compressed`).
    """

    def _trady_setup(self) -> None:
        pass

    def activation_kind(self) -> str | None:
        """The kind recomputed from fc1's input, or None when the activation runs itself."""
        if not isinstance(self.act, _SavedInputModule) or self.act.backward_bits is not None:
            return None
        return self.act.activation_kind()

    def forward(self, x: Tensor) -> Tensor:
        u = self.fc1(x)
        kind = self.activation_kind()
        if kind is None or not _grad_needed(u):
            return self.fc2(self.act(u))
        return self.fc2(RecomputedActivation.apply(u, x, self.fc1.weight, self.fc1.bias, kind))


class TraDyMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention whose self-attention keeps only what its backward needs.

    On the converted path the input projection (``in_proj_weight``, a layer of the pool
    under this module's name: ``weight`` and ``selected_channels`` as a TraDyLinear's)
    keeps nothing when frozen and the compact copy of its selected input features when
    trained; :class:`AttentionCore` keeps the packed qkv; ``out_proj`` is a converted
    Linear (its own layer). The path is taken for self-attention (``query is key is
    value``) with ``need_weights=False``, packed projections, no ``bias_k`` /
    ``add_zero_attn``, no attention dropout in training, and boolean or absent masks; any
    other call is PyTorch's own (and is then listed as not converted, its projections
    left out of the pool). ``took_converted_path`` tells which one the last call took
    (the profile reads it). In compressed mode (set by
    :func:`~trady_triton.compressed.set_backward_bits`) the core keeps qkv in
    ``backward_bits`` bits and the input projection its compact copy in ``compact_bits``,
    as :class:`TraDyAttention` and a TraDyLinear do.
    """

    backward_bits: int | None = None   # compressed mode: bits of the core's qkv
    compact_bits: int | None = None    # compressed mode: bits of in_proj's compact copy

    def _trady_setup(self) -> None:
        self.took_converted_path = False
        self.register_buffer("selected_channels",
                             torch.arange(self.embed_dim, device=self.out_proj.weight.device),
                             persistent=False)

    @property
    def weight(self):
        """The input projection, trained by input feature like a Linear's weight."""
        return self.in_proj_weight

    def _converted_path_applies(self, query, key, value, key_padding_mask, need_weights,
                                attn_mask, is_causal) -> bool:
        masks = [m for m in (key_padding_mask, attn_mask) if m is not None]
        return (query is key is value and not need_weights and not is_causal
                and self._qkv_same_embed_dim and self.bias_k is None and not self.add_zero_attn
                and (self.dropout == 0.0 or not self.training) and query.dim() == 3
                and all(m.dtype == torch.bool for m in masks)
                and (attn_mask is None or attn_mask.dim() == 2))

    def _in_projection(self, x: Tensor) -> Tensor:
        from .autograd import FrozenLinear, SelectedLinear
        if not _grad_needed(x, self.in_proj_weight):
            return F.linear(x, self.in_proj_weight, self.in_proj_bias)
        if self.in_proj_weight.requires_grad:
            return SelectedLinear.apply(x, self.in_proj_weight, self.in_proj_bias,
                                        self.selected_channels, None, self.compact_bits)
        return FrozenLinear.apply(x, self.in_proj_weight, self.in_proj_bias)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        self.took_converted_path = self._converted_path_applies(
            query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)
        if not self.took_converted_path:   # also under no_grad: the profile sees out_proj run
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        x = query if self.batch_first else query.transpose(0, 1)
        qkv = self._in_projection(x)
        mask = _sdpa_mask(key_padding_mask, attn_mask)
        o = AttentionCore.apply(qkv, self.num_heads, mask, self.backward_bits) \
            if _grad_needed(qkv) \
            else attention_core(qkv, self.num_heads, mask)
        out = self.out_proj(o)
        return (out if self.batch_first else out.transpose(0, 1)), None


def _sdpa_mask(key_padding_mask: Tensor | None, attn_mask: Tensor | None) -> Tensor | None:
    """MHA's boolean masks (True = masked out) as one SDPA mask (True = attends)."""
    allowed = None
    if key_padding_mask is not None:
        allowed = ~key_padding_mask[:, None, None, :]
    if attn_mask is not None:
        allowed = ~attn_mask if allowed is None else allowed & ~attn_mask
    return allowed
