"""How closely sparse training follows full training, per epoch (``track_updates``).

Over the layers of the controller's top-K pool, after each epoch:

- ``coverage``: the share of the pool's input channels trained in at least one epoch so far;
- ``cosine_epoch``: the cosine between the epoch-summed sparse update
  ``sum_t lr_t * (m_e * g_t)`` and the epoch-summed full gradient step ``sum_t lr_t * g_t``
  (the quantity of the method's Eq. 9), and ``norm_ratio_epoch``, the ratio of their norms;
- ``cosine_cum``: the same cosine with both sums taken from the first epoch.

The sparse side is read off the weights (plain SGD: ``W_start - W_end``), so it is the update
that really happened. The full side costs one extra forward and a backward that stops at the
earliest pool layer, per step, at the same iterate and with the same random state (dropout
mask) as the training step, which it leaves unchanged: the selected slices of the full
gradient are the sparse gradient.
"""

from __future__ import annotations

import torch

from .analysis import Grads, cosine, full_gradients, norm


class UpdateTracker:
    """Accumulates the sparse and full updates of the pool layers of one run."""

    def __init__(self, controller, optimizer: torch.optim.Optimizer):
        self.controller, self.optimizer = controller, optimizer
        body = {l.name: l for l in controller.layers if not l.is_classifier}
        self.names = [name for name in controller.pool if name in body]
        if not self.names:
            raise ValueError("track_updates: the controller's pool has no body layer to track")
        self.trained = {n: torch.zeros(body[n].in_channels, dtype=torch.bool) for n in self.names}
        self.sparse_cum, self.full_cum = self._zeros(), self._zeros()
        self._start: Grads | None = None
        self._full_epoch: Grads | None = None

    def _weights(self) -> Grads:
        return {n: self.controller.modules[n].weight.detach() for n in self.names}

    def _zeros(self) -> Grads:
        return {n: torch.zeros_like(w, dtype=torch.float64) for n, w in self._weights().items()}

    def start_epoch(self, selection: dict[str, torch.Tensor]) -> None:
        """Mark the epoch's channels as trained; remember where the weights start."""
        for name in self.names:
            if name in selection and selection[name].numel():
                self.trained[name][selection[name].cpu().long()] = True
        self._start = {n: w.double().clone() for n, w in self._weights().items()}
        self._full_epoch = self._zeros()

    def before_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add ``lr * full gradient`` at the current weights; the RNG state is restored after,
        so that the training step draws the same dropout mask."""
        rate = self.optimizer.param_groups[0]["lr"]
        with torch.random.fork_rng(devices=[]):
            grads = full_gradients(self.controller, x, y, with_classifier=False,
                                   layers=self.names)[0]
        for name, grad in grads.items():
            self._full_epoch[name].add_(grad.double(), alpha=rate)

    def end_epoch(self) -> dict:
        """The epoch's figures (see the module docstring)."""
        if self._start is None:
            raise RuntimeError("UpdateTracker.end_epoch() before start_epoch()")
        sparse = {n: self._start[n] - w.double() for n, w in self._weights().items()}
        for name in self.names:
            self.sparse_cum[name].add_(sparse[name])
            self.full_cum[name].add_(self._full_epoch[name])
        full_norm = norm(self._full_epoch)
        covered = sum(int(t.sum()) for t in self.trained.values())
        total = sum(t.numel() for t in self.trained.values())
        figures = {"pool_layers": len(self.names), "pool_channels": total,
                   "coverage": covered / total,
                   "cosine_epoch": cosine(sparse, self._full_epoch),
                   "cosine_cum": cosine(self.sparse_cum, self.full_cum),
                   "norm_ratio_epoch": norm(sparse) / full_norm if full_norm else None}
        self._start = self._full_epoch = None
        return figures

    def state_dict(self) -> dict:
        return {"names": list(self.names), "trained": dict(self.trained),
                "sparse_cum": dict(self.sparse_cum), "full_cum": dict(self.full_cum)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != self.names:
            raise ValueError(f"update tracker state: pool layers {state['names']} differ from "
                             f"this run's {self.names}")
        self.trained = {n: t.clone() for n, t in state["trained"].items()}
        self.sparse_cum = {n: t.clone() for n, t in state["sparse_cum"].items()}
        self.full_cum = {n: t.clone() for n, t in state["full_cum"].items()}
