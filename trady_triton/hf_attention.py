"""Exact attention for Hugging Face self-attention modules, keeping only q, k, v.

HF's attention interface (``sdpa`` or ``eager``) keeps, through PyTorch's autograd, the
probabilities (eager) or q, k, v, the output and the log-sum-exp (sdpa). The
:class:`ExactAttention` Function keeps q, k and v only (plus, when attention dropout is
on in training, its keep mask in 1 bit per element) and its backward recomputes the
probabilities from q and k with the same ops, so the gradient is PyTorch's.

Masks are HF's own 4-d masks: boolean (True = attends, what ``sdpa`` gets) or additive
floats (what ``eager`` gets); ``None`` when every token attends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from .first_order import first_order_only
from .reference import pack_mask, unpack_mask

_HALF = (torch.float16, torch.bfloat16)


def _scores(q: Tensor, k: Tensor, mask: Tensor | None, scaling: float) -> Tensor:
    scores = torch.matmul(q, k.transpose(-2, -1)) * scaling
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask


def _dropped_attention(q, k, v, mask, scaling, keep: Tensor, p: float) -> Tensor:
    """softmax(q k^T * scaling + mask), dropout with the given keep mask, times v."""
    scores = _scores(q, k, mask, scaling)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32 if q.dtype in _HALF else None)
    probs = probs.to(q.dtype) * keep * (1.0 / (1.0 - p))
    return torch.matmul(probs, v)


def _attention(q, k, v, mask, scaling, keep: Tensor | None, p: float) -> Tensor:
    if keep is None:   # no dropout: PyTorch's fused attention, forward and recompute alike
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return _dropped_attention(q, k, v, mask, scaling, keep, p)


def _keep_mask(q: Tensor, k: Tensor, p: float) -> Tensor | None:
    """The dropout keep mask of the probabilities, drawn as ``F.dropout`` draws it."""
    if p == 0.0:
        return None
    shape = (*q.shape[:-1], k.shape[-2])
    return torch.empty(shape, dtype=torch.bool, device=q.device).bernoulli_(1.0 - p)


class ExactAttention(Function):
    """Attention on ``[N, heads, T, D]`` q, k, v keeping q, k, v (and a 1-bit dropout mask)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scaling, p):
        keep = _keep_mask(q, k, p)
        ctx.mask, ctx.scaling, ctx.p = mask, scaling, p
        ctx.keep_shape = None if keep is None else keep.shape
        packed = () if keep is None else (pack_mask(keep),)
        ctx.save_for_backward(q, k, v, *packed)
        return _attention(q, k, v, mask, scaling, keep, p)

    @staticmethod
    @first_order_only("TraDy HF self-attention")
    def backward(ctx, grad_o):
        q, k, v, *packed = ctx.saved_tensors
        keep = None
        if packed:
            numel = torch.Size(ctx.keep_shape).numel()
            keep = unpack_mask(packed[0], numel).reshape(ctx.keep_shape).to(q.device)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            out = _attention(*leaves, ctx.mask, ctx.scaling, keep, ctx.p)
            grads = torch.autograd.grad(out, leaves, grad_o)
        return (*grads, None, None, None)


def exact_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float,
                    p: float) -> Tensor:
    """``[N, heads, T, D]`` attention output; through :class:`ExactAttention` when a
    gradient is needed, else the same computation with nothing kept."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return ExactAttention.apply(q, k, v, mask, scaling, p)
    return _attention(q, k, v, mask, scaling, _keep_mask(q, k, p), p)
