"""ViT / DeiT-Tiny and a BERT-style encoder as plain nn modules, random init.

Both are built from :class:`TransformerBlock` (pre-norm for ViT, post-norm for BERT),
whose projections are ``nn.Linear`` over token tensors ``[N, T, D]`` and whose
attention is ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .transformer_blocks import MLP, Attention


class TransformerBlock(nn.Module):
    """Pre-norm ``x + attn(norm1(x)); x + mlp(norm2(x))`` or post-norm ``norm1(x + attn(x))...``."""

    def __init__(self, dim: int, heads: int, hidden: int, pre_norm: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.pre_norm = pre_norm
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = MLP(dim, hidden)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.pre_norm:
            x = x + self.drop1(self.attn(self.norm1(x), mask))
            return x + self.drop2(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.drop1(self.attn(x, mask)))
        return self.norm2(x + self.drop2(self.mlp(x)))


class VisionTransformer(nn.Module):
    """Patch embedding (a strided Conv2d), class token, position embedding, blocks, head.

    Defaults are ViT/DeiT-Tiny: patch 16, dim 192, depth 12, 3 heads, MLP 768.
    """

    arch_name = "vit-tiny"

    def __init__(self, num_classes: int = 1000, image_size: int = 224, patch: int = 16,
                 dim: int = 192, depth: int = 12, heads: int = 3, mlp_ratio: int = 4):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        tokens = (image_size // patch) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp_ratio * dim)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks(x)
        # LayerNorm is per token: normalise the class token only; the clone keeps backward
        # from holding the whole sequence's storage through a view
        return self.classifier(self.norm(x[:, 0].clone()))


class BertEncoder(nn.Module):
    """Word + position embeddings, LayerNorm, post-norm blocks, tanh pooler, classifier.

    ``forward(input_ids, attention_mask=None)``: ``attention_mask`` ``[N, T]`` is 1 for
    tokens to attend to, 0 for padding. Defaults are a small BERT (dim 256, 4 layers).
    """

    arch_name = "bert-encoder"

    def __init__(self, num_classes: int = 2, vocab_size: int = 30522, max_positions: int = 512,
                 dim: int = 256, depth: int = 4, heads: int = 4, hidden: int = 1024,
                 dropout: float = 0.1):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(max_positions, dim)
        self.embedding_norm = nn.LayerNorm(dim)
        self.embedding_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([TransformerBlock(dim, heads, hidden, False, dropout)
                                     for _ in range(depth)])
        self.pooler = nn.Linear(dim, dim)
        self.pooler_activation = nn.Tanh()
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = self.embedding_dropout(self.embedding_norm(x))
        mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()
        for block in self.blocks:
            x = block(x, mask)
        return self.classifier(self.pooler_activation(self.pooler(x[:, 0].clone())))
