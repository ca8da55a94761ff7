"""Conv1d over token / sequence tensors ``[N, C, L]``, trained on selected input channels.

It runs as a Conv2d of height 1 through the Functions of :mod:`trady_triton.autograd`
(``SelectedConv2d`` keeps the compact copy of the selected channels, ``FrozenConv2d``
nothing), so it keeps, costs and computes exactly what a Conv2d does; in compressed mode
(``compact_bits``, set by :func:`~trady_triton.compressed.set_backward_bits`) the compact
copy is kept as codes with a scale per channel, as a Conv2d's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import autograd as fn


class TraDyConv1d(nn.Conv1d):
    """nn.Conv1d (zero padding, integer padding) that trains only ``selected_channels``."""

    compact_bits: int | None = None   # compressed mode: bits of the kept compact copy

    def _trady_setup(self) -> None:
        self.register_buffer("selected_channels",
                             torch.arange(self.in_channels, device=self.weight.device),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        needed = torch.is_grad_enabled() and (
            x.requires_grad or any(p is not None and p.requires_grad for p in (self.weight, self.bias)))
        if not needed:
            return F.conv1d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                            self.groups)
        if x.dim() == 2:   # unbatched [C, L]
            return self.forward(x.unsqueeze(0)).squeeze(0)
        geometry = ((1, self.stride[0]), (0, self.padding[0]), (1, self.dilation[0]), self.groups)
        x2d, w2d = x.unsqueeze(2), self.weight.unsqueeze(2)   # views: nothing copied
        if self.weight.requires_grad:
            y = fn.SelectedConv2d.apply(x2d, w2d, self.bias, self.selected_channels, *geometry, None,
                                        self.compact_bits)
        else:
            y = fn.FrozenConv2d.apply(x2d, w2d, self.bias, *geometry)
        return y.squeeze(2)
