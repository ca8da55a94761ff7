"""Budget-filling channel draws (docs/METHOD.md section 3 and 5).

Every policy is "walk a sequence of candidate channels, keep a channel when it
still fits the budget". The policies differ only in the candidate pool (the
top-K layers or the whole network), the order (uniformly random or by channel
RGN) and whether the draw is redone each epoch (D-) or made once (S-).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cost import LayerCost


@dataclass(frozen=True)
class Policy:
    name: str
    pool: str          # "topk" | "all" | "none" (classifier only) | "full" (everything)
    order: str         # "random" | "rgn"
    dynamic: bool

    @property
    def needs_scores(self) -> bool:
        return self.order == "rgn"


POLICIES = {
    "d-topk": Policy("d-topk", "topk", "random", True),       # TraDy
    "s-topk": Policy("s-topk", "topk", "random", False),
    "d-fullrandom": Policy("d-fullrandom", "all", "random", True),
    "s-fullrandom": Policy("s-fullrandom", "all", "random", False),
    "d-detrgn": Policy("d-detrgn", "all", "rgn", True),
    "s-detrgn": Policy("s-detrgn", "all", "rgn", False),
    "classifier-only": Policy("classifier-only", "none", "random", False),
    "full": Policy("full", "full", "random", False),
}
ALIASES = {"trady": "d-topk"}
POLICY_NAMES = tuple(POLICIES) + tuple(ALIASES)


def get_policy(name: str) -> Policy:
    key = ALIASES.get(name, name)
    if key not in POLICIES:
        raise ValueError(f"policy={name!r}: allowed values are {', '.join(POLICY_NAMES)}")
    return POLICIES[key]


def draw_seed(seed: int, epoch: int) -> int:
    """One generator seed per (seed, epoch): every process and every resume agree."""
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % (2 ** 62)


def _candidates(layers: list[LayerCost]) -> tuple[list[LayerCost], torch.Tensor]:
    """Flat index -> (layer, channel) via cumulative channel offsets."""
    offsets = torch.tensor([0] + [l.in_channels for l in layers]).cumsum(0)
    return layers, offsets


def fill_budget(layers: list[LayerCost], order: torch.Tensor, budget_units: int
                ) -> dict[str, torch.Tensor]:
    """Walk flat channel indices in ``order``; keep each one that still fits.

    Stops when the budget is met, i.e. no remaining channel could fit.
    Returns layer name -> sorted int64 tensor of selected channels.
    """
    _, offsets = _candidates(layers)
    costs = [l.units_per_channel for l in layers]
    cheapest = min(costs)
    layer_of = torch.bucketize(order, offsets[1:], right=True).tolist()
    flat = order.tolist()
    chosen: dict[int, list[int]] = {}
    used = 0
    for flat_index, layer_index in zip(flat, layer_of):
        if budget_units - used < cheapest:
            break
        cost = costs[layer_index]
        if used + cost <= budget_units:
            used += cost
            chosen.setdefault(layer_index, []).append(flat_index - int(offsets[layer_index]))
    return {layers[i].name: torch.tensor(sorted(c), dtype=torch.int64) for i, c in chosen.items()}


def random_order(layers: list[LayerCost], seed: int, epoch: int) -> torch.Tensor:
    total = sum(l.in_channels for l in layers)
    generator = torch.Generator().manual_seed(draw_seed(seed, epoch))
    return torch.randperm(total, generator=generator)


def rgn_order(layers: list[LayerCost], channel_scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Channels by decreasing RGN (ties by position, so the order is deterministic)."""
    missing = [l.name for l in layers if l.name not in channel_scores]
    if missing:
        raise ValueError(f"channel_scores: no scores for layers {missing[:5]}; "
                         "call controller.score_channels(...) first")
    scores = torch.cat([channel_scores[l.name].double().flatten().cpu() for l in layers])
    return torch.sort(scores, descending=True, stable=True).indices


def draw(policy: Policy, layers: list[LayerCost], pool_names: list[str], budget_units: int,
         seed: int, epoch: int, channel_scores: dict[str, torch.Tensor] | None = None
         ) -> dict[str, torch.Tensor]:
    """Selected channels per layer (layers absent from the result train nothing)."""
    body = [l for l in layers if not l.is_classifier]
    if policy.pool == "none":
        return {}
    if policy.pool == "full":
        return {l.name: torch.arange(l.in_channels) for l in body}
    pool = body if policy.pool == "all" else [l for l in body if l.name in set(pool_names)]
    if not pool:
        raise ValueError("the channel pool is empty: no convertible layer is in the ranking's top-K")
    if policy.order == "rgn":
        order = rgn_order(pool, channel_scores or {})
    else:
        order = random_order(pool, seed, epoch)
    return fill_budget(pool, order, budget_units)
