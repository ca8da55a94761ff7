"""UpdateTracker: pool coverage and the Eq. 9 cosine against a float64 autograd reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import small_net
from trady_triton import convert
from trady_triton.ranking import LayerRanking
from trady_triton.update_tracking import UpdateTracker


def _net_with_dropout() -> nn.Module:
    layers = list(small_net().children())
    torch.manual_seed(3)
    return nn.Sequential(*layers[:-1], nn.Dropout(0.5), nn.Linear(12, 5))


def _converted(net: nn.Module, policy: str, x: torch.Tensor):
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    # the last four convs carry most of the "RGN": a top-K pool smaller than the body
    ranking = LayerRanking("small", {n: (100.0 if i >= len(convs) - 4 else 0.1)
                                     for i, n in enumerate(convs)}, steps=1)
    return convert(net, keep_ratio=0.2, example_input=x, policy=policy, ranking=ranking,
                   seed=1)


def _batches(seed: int, count: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, 11, 13, generator=g), torch.randint(0, 5, (6,), generator=g))
            for _ in range(count)]


def _reference_full_step(plain: nn.Module, model: nn.Module, names, x, y) -> dict:
    """Full gradient of the pool weights in float64 on an unconverted copy (same weights,
    BatchNorm on its running statistics)."""
    plain.load_state_dict(model.state_dict())
    ref = copy.deepcopy(plain).double().eval()
    weights = [ref.get_submodule(n).weight for n in names]
    loss = F.cross_entropy(ref(x.double()), y)
    return dict(zip(names, torch.autograd.grad(loss, weights)))


def _train(model, controller, tracker, epochs, lr, plain=None, reference=None):
    """Plain SGD; the tracker's figures per epoch, and (with ``plain``) the reference sums."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    if tracker:
        tracker.optimizer = opt                 # the tracker reads the step's rate off it
    rows = []
    for epoch in range(epochs):
        selection = controller.resample(epoch)
        start = {n: controller.modules[n].weight.detach().double().clone()
                 for n in controller.pool}
        full = {n: torch.zeros_like(w) for n, w in start.items()}
        if tracker:
            tracker.start_epoch(selection)
        for x, y in _batches(epoch):
            opt.zero_grad(set_to_none=True)
            if plain is not None:
                for n, g in _reference_full_step(plain, model, list(full), x, y).items():
                    full[n] += lr * g
            if tracker:
                tracker.before_step(x, y)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        row = tracker.end_epoch() if tracker else {}
        if reference is not None:
            sparse = {n: start[n] - controller.modules[n].weight.detach().double() for n in start}
            reference.append((selection, sparse, full))
        rows.append(row)
    return rows


def _cos(a: dict, b: dict) -> float:
    dot = sum(float((a[k] * b[k]).sum()) for k in a)
    na = math.sqrt(sum(float(v.pow(2).sum()) for v in a.values()))
    nb = math.sqrt(sum(float(v.pow(2).sum()) for v in b.values()))
    return dot / (na * nb)


@pytest.mark.parametrize("policy", ["d-topk", "s-topk", "d-fullrandom"])
def test_coverage_and_cosines_match_a_float64_reference(policy):
    plain = small_net()      # no dropout: a float64 copy would draw another mask
    model = copy.deepcopy(plain)
    controller = _converted(model, policy, _batches(99)[0][0])
    assert 0 < len(controller.pool) < 7
    tracker = UpdateTracker(controller, None)
    reference = []
    rows = _train(model, controller, tracker, 3, 0.05, plain=plain, reference=reference)
    trained, sparse_cum, full_cum = {}, None, None
    for (selection, sparse, full), row in zip(reference, rows):
        for name in controller.pool:
            channels = selection.get(name, torch.empty(0, dtype=torch.long))
            trained.setdefault(name, set()).update(channels.tolist())
        sparse_cum = sparse if sparse_cum is None else {k: sparse_cum[k] + sparse[k] for k in sparse}
        full_cum = full if full_cum is None else {k: full_cum[k] + full[k] for k in full}
        total = sum(controller.modules[n].in_channels for n in controller.pool)
        assert row["coverage"] == sum(map(len, trained.values())) / total
        assert row["cosine_epoch"] == pytest.approx(_cos(sparse, full), rel=1e-4)
        assert row["cosine_cum"] == pytest.approx(_cos(sparse_cum, full_cum), rel=1e-4)
        assert 0.0 < row["cosine_epoch"] < 1.0
    if policy.startswith("s-"):
        assert rows[0]["coverage"] == rows[-1]["coverage"]
    elif policy == "d-topk":
        assert rows[-1]["coverage"] > rows[0]["coverage"]


def test_sparse_update_is_the_selected_slice_of_the_full_one():
    """What makes the cosine cheap: the trained slices of the full gradient are the sparse
    gradient, so the epoch's cosine equals the norm ratio of the two sums."""
    plain = small_net()
    model = copy.deepcopy(plain)
    controller = _converted(model, "d-topk", _batches(99)[0][0])
    tracker = UpdateTracker(controller, torch.optim.SGD(model.parameters(), lr=0.05))
    reference = []
    rows = _train(model, controller, tracker, 2, 0.05, plain=plain, reference=reference)
    for row in rows:
        assert row["norm_ratio_epoch"] == pytest.approx(row["cosine_epoch"], rel=1e-5)
    selection, sparse, full = reference[-1]
    name = next(n for n in controller.pool if n in selection)
    channels = selection[name]
    mask = torch.zeros_like(sparse[name], dtype=torch.bool)
    layer = controller.modules[name]
    if layer.groups == 1:
        mask[:, channels] = True
    else:                                   # depthwise: input channel c owns output row c
        mask[channels] = True
    assert torch.equal(sparse[name][~mask], torch.zeros_like(sparse[name][~mask]))
    torch.testing.assert_close(sparse[name][mask], full[name][mask], rtol=1e-4, atol=1e-7)


def test_tracking_leaves_the_training_trajectory_unchanged():
    """Same weights, bit for bit, with and without the tracker (its forward restores the RNG,
    so that the training step draws the same dropout mask)."""
    finals = []
    for track in (False, True):
        torch.manual_seed(0)
        model = _net_with_dropout()
        controller = _converted(model, "d-topk", _batches(99)[0][0])
        tracker = None
        if track:
            tracker = UpdateTracker(controller, None)
        torch.manual_seed(5)
        _train(model, controller, tracker, 2, 0.05)
        finals.append({k: v.clone() for k, v in model.state_dict().items()})
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key]), key


def test_state_round_trips_and_checks_the_pool():
    model = _net_with_dropout()
    controller = _converted(model, "d-topk", _batches(99)[0][0])
    tracker = UpdateTracker(controller, torch.optim.SGD(model.parameters(), lr=0.05))
    _train(model, controller, tracker, 1, 0.05)
    state = tracker.state_dict()
    other = UpdateTracker(controller, tracker.optimizer)
    other.load_state_dict(state)
    for name in tracker.names:
        assert torch.equal(other.trained[name], tracker.trained[name])
        assert torch.equal(other.full_cum[name], tracker.full_cum[name])
    with pytest.raises(ValueError, match="pool layers"):
        other.load_state_dict({**state, "names": state["names"][:-1]})
    with pytest.raises(RuntimeError, match="before start_epoch"):
        other.end_epoch()
