"""Budget-filling draws: budget met, determinism, static vs dynamic, pools, RGN order."""

import pytest
import torch

from trady_triton import sampling
from trady_triton.cost import LayerCost


def layer(name, cin, cout, k, hw, order, classifier=False):
    return LayerCost(name, "conv", cin, cout, 1, (k, k), (hw, hw), (hw, hw), 4, order, classifier)


LAYERS = [layer("a", 3, 8, 3, 16, 0), layer("b", 8, 16, 1, 8, 1), layer("c", 16, 5, 3, 4, 2),
          LayerCost("fc", "linear", 5, 10, 1, (1, 1), (), (), 4, 3, True)]


def units(selection):
    by_name = {l.name: l for l in LAYERS}
    return sum(len(ch) * by_name[n].units_per_channel for n, ch in selection.items())


@pytest.mark.parametrize("budget", [100, 300, 777, 2000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_draw_respects_and_meets_the_budget(budget, seed):
    policy = sampling.get_policy("d-fullrandom")
    selection = sampling.draw(policy, LAYERS, [], budget, seed, epoch=3)
    used = units(selection)
    assert used <= budget
    body = [l for l in LAYERS if not l.is_classifier]
    for l in body:   # met: no unselected channel would still fit
        left = l.in_channels - len(selection.get(l.name, []))
        if left:
            assert used + l.units_per_channel > budget
    assert "fc" not in selection
    for channels in selection.values():
        assert len(set(channels.tolist())) == len(channels)


def test_draws_are_deterministic_in_seed_and_epoch_and_change_across_epochs():
    policy = sampling.get_policy("d-topk")
    pool = ["a", "b", "c"]
    first = sampling.draw(policy, LAYERS, pool, 600, seed=7, epoch=2)
    again = sampling.draw(policy, LAYERS, pool, 600, seed=7, epoch=2)
    other = [sampling.draw(policy, LAYERS, pool, 600, seed=7, epoch=e) for e in range(3, 8)]
    as_lists = lambda s: {k: v.tolist() for k, v in s.items()}
    assert as_lists(first) == as_lists(again)
    assert any(as_lists(first) != as_lists(o) for o in other)


def test_topk_pool_limits_the_layers():
    selection = sampling.draw(sampling.get_policy("d-topk"), LAYERS, ["b"], 10_000, 0, 0)
    assert set(selection) == {"b"}


def test_rgn_order_takes_the_highest_channels_greedily():
    scores = {"a": torch.tensor([0.1, 5.0, 0.2]), "b": torch.zeros(8), "c": torch.arange(16.0) / 10}
    by_name = {l.name: l for l in LAYERS}
    budget = by_name["a"].units_per_channel + 2 * by_name["c"].units_per_channel
    selection = sampling.draw(sampling.get_policy("d-detrgn"), LAYERS, [], budget, 0, 0, scores)
    assert selection["a"].tolist() == [1]
    assert selection["c"].tolist() == [14, 15]


def test_classifier_only_and_full_policies():
    assert sampling.draw(sampling.get_policy("classifier-only"), LAYERS, [], None, 0, 0) == {}
    full = sampling.draw(sampling.get_policy("full"), LAYERS, [], None, 0, 0)
    assert {k: len(v) for k, v in full.items()} == {"a": 3, "b": 8, "c": 16}


def test_unknown_policy_names_the_allowed_values():
    with pytest.raises(ValueError, match="allowed values are d-topk"):
        sampling.get_policy("topk")
    assert sampling.get_policy("trady").name == "d-topk"
