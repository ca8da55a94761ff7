"""Transformer pieces written with plain nn modules (timm / BERT layout).

Projections are ``nn.Linear`` children (so each is converted like any Linear) and the
attention itself is ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def split_heads(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """``[N, T, 3 D]`` -> q, k, v of shape ``[N, heads, T, D / heads]`` (views)."""
    n, t, three_d = qkv.shape
    q, k, v = qkv.view(n, t, 3, heads, three_d // (3 * heads)).permute(2, 0, 3, 1, 4)
    return q, k, v


def attention_core(qkv: Tensor, heads: int, mask: Tensor | None = None) -> Tensor:
    """Multi-head scaled dot-product attention on a packed ``qkv``; returns ``[N, T, D]``."""
    q, k, v = split_heads(qkv, heads)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return o.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], -1)


class Attention(nn.Module):
    """``proj(attention(qkv(x)))`` with ``heads`` heads; ``mask`` is an SDPA attention mask."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads={heads}: must divide dim={dim}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.proj(attention_core(self.qkv(x), self.heads, mask))


class MLP(nn.Module):
    """``fc2(act(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int, activation: type[nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = activation()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))
