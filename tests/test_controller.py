"""Controller: resampling, state_dict round trip, stats and report."""

import io

import pytest
import torch

import trady_triton as tt

from helpers import small_net

X = torch.randn(2, 3, 15, 13)


def make(policy="d-fullrandom", seed=3):
    net = small_net()
    return net, tt.convert(net, 0.25, example_input=X, policy=policy, seed=seed)


def lists(selection):
    return {k: v.tolist() for k, v in selection.items()}


def test_resample_applies_the_selection_to_the_layers():
    net, controller = make()
    selection = controller.resample(4)
    modules = dict(net.named_modules())
    for layer in controller.layers:
        module = modules[layer.name]
        if layer.is_classifier:
            assert module.weight.requires_grad
        elif layer.name in selection:
            assert module.weight.requires_grad
            assert module.selected_channels.tolist() == selection[layer.name].tolist()
        else:
            assert not module.weight.requires_grad


def test_same_seed_and_epoch_give_the_same_sets_in_another_controller():
    _, a = make(seed=11)
    _, b = make(seed=11)
    assert lists(a.resample(5)) == lists(b.resample(5))
    _, c = make(seed=12)
    assert lists(c.resample(5)) != lists(a.resample(5))


def test_static_policy_keeps_its_first_draw():
    _, controller = make("s-fullrandom")
    first = lists(controller.resample(0))
    assert all(lists(controller.resample(e)) == first for e in range(1, 4))


def test_restored_controller_continues_with_the_same_sets():
    _, controller = make("s-topk")
    for epoch in range(3):
        controller.resample(epoch)
    buffer = io.BytesIO()
    torch.save(controller.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    net2, restored = make("s-topk", seed=99)
    restored.load_state_dict(state)
    assert lists(restored.selection) == lists(controller.selection)
    assert restored.epoch == 2
    assert lists(restored.resample(3)) == lists(controller.resample(3))
    _, dynamic = make("d-topk")
    dynamic.resample(1)
    _, dynamic2 = make("d-topk", seed=50)
    dynamic2.load_state_dict(dynamic.state_dict())
    assert lists(dynamic2.resample(7)) == lists(dynamic.resample(7))
    with pytest.raises(ValueError, match="policy"):
        dynamic2.load_state_dict(controller.state_dict())


def test_detrgn_needs_scores_then_picks_by_rgn():
    net, controller = make("d-detrgn")   # convert() cannot draw yet: no scores
    with pytest.raises(RuntimeError, match="score_channels"):
        controller.resample(1)
    controller.score_channels([(X, torch.tensor([0, 1]))])
    selection = controller.resample(1)
    assert selection
    best = max(((n, s.max().item()) for n, s in controller.channel_scores.items()), key=lambda t: t[1])
    top_channel = int(controller.channel_scores[best[0]].argmax())
    assert top_channel in selection[best[0]].tolist()


def test_stats_and_report_give_the_sparsities():
    _, controller = make()
    stats = controller.stats()
    assert stats.selected_units <= controller.budget_units
    assert 0 < stats.activation_sparsity < 1 and 0 < stats.weight_sparsity < 1
    assert 0 < stats.flops_saved < 1
    text = controller.report(batch=4, measured_bytes=1234)
    assert "weight-derivative sparsity" in text and "(measured)" in text
    assert controller.classifier in text


def test_score_channels_scores_every_channel_of_depthwise_layers():
    """A depthwise weight is [C, 1, k, k]: every one of its C input channels gets a score."""
    net, controller = make("d-detrgn")
    controller.score_channels([(X, torch.tensor([0, 1]))])
    depthwise = [l for l in controller.layers if l.groups > 1]
    assert depthwise
    for layer in depthwise:
        scores = controller.channel_scores[layer.name]
        assert scores.shape == (layer.in_channels,)
        assert (scores > 0).sum() > 1, layer.name
