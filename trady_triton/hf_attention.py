"""Exact attention for Hugging Face self-attention modules, keeping only q, k, v.

HF's attention interface (``sdpa`` or ``eager``) keeps, through PyTorch's autograd, the
probabilities (eager) or q, k, v, the output and the log-sum-exp (sdpa). The
:class:`ExactAttention` Function keeps q, k and v only (plus, when attention dropout is
on in training, its keep mask in 1 bit per element) and its backward recomputes the
probabilities from q and k with the same ops, so the gradient is PyTorch's.

In compressed mode (``bits``, from the module's ``backward_bits``) q, k and v are kept as
``bits``-bit integers with a (minimum, step) per (token, head), as our own attention core
keeps its qkv (:func:`~trady_triton.compressed.compress`), and backward recomputes from
the decoded q, k, v.

Masks are HF's own 4-d masks: boolean (True = attends, what ``sdpa`` gets) or additive
floats (what ``eager`` gets); ``None`` when every token attends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from .compressed import compress, restore
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


def _kept_qkv(q: Tensor, k: Tensor, v: Tensor, bits: int | None) -> tuple:
    """What the core saves for q, k, v: themselves, or (codes, scales) per tensor."""
    if bits is None:
        return q, k, v
    return tuple(part for t in (q, k, v) for part in compress(t, bits, t.shape[-1]))


def _restored_qkv(saved, bits: int | None, shapes, dtype) -> list:
    if bits is None:
        return list(saved)
    return [restore(saved[2 * i], saved[2 * i + 1].to(dtype), bits, shapes[i]) for i in range(3)]


class ExactAttention(Function):
    """Attention on ``[N, heads, T, D]`` q, k, v keeping q, k, v (and a 1-bit dropout mask);
    with ``bits``, q, k, v as codes."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scaling, p, bits=None):
        keep = _keep_mask(q, k, p)
        ctx.mask, ctx.scaling, ctx.p, ctx.bits = mask, scaling, p, bits
        ctx.shapes = (q.shape, k.shape, v.shape)
        ctx.keep_shape = None if keep is None else keep.shape
        packed = () if keep is None else (pack_mask(keep),)
        ctx.save_for_backward(*_kept_qkv(q, k, v, bits), *packed)
        return _attention(q, k, v, mask, scaling, keep, p)

    @staticmethod
    @first_order_only("TraDy HF self-attention")
    def backward(ctx, grad_o):
        saved = ctx.saved_tensors
        kept = 3 if ctx.bits is None else 6
        q, k, v = _restored_qkv(saved[:kept], ctx.bits, ctx.shapes, grad_o.dtype)
        keep = None
        if len(saved) > kept:
            numel = torch.Size(ctx.keep_shape).numel()
            keep = unpack_mask(saved[kept], numel).reshape(ctx.keep_shape).to(q.device)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            out = _attention(*leaves, ctx.mask, ctx.scaling, keep, ctx.p)
            grads = torch.autograd.grad(out, leaves, grad_o)
        return (*grads, None, None, None, None)


def exact_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float,
                    p: float, bits: int | None = None) -> Tensor:
    """``[N, heads, T, D]`` attention output; through :class:`ExactAttention` when a
    gradient is needed (``bits``: compressed mode), else the same computation with
    nothing kept."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return ExactAttention.apply(q, k, v, mask, scaling, p, bits)
    return _attention(q, k, v, mask, scaling, _keep_mask(q, k, p), p)
