"""The controller's later calls are transactional: one that cannot meet the budget raises and
leaves the profile, budget, pool, epoch and the current selection (and its layers) in force."""

import pytest
import torch
import torch.nn as nn

import trady_triton as tt
from trady_triton.ranking import LayerRanking

from helpers import small_net

pytestmark = pytest.mark.filterwarnings("ignore:no layer ranking")

X = torch.randn(2, 3, 15, 13)


def _controller_state(net, controller):
    return {
        "selection": {k: v.tolist() for k, v in controller.selection.items()},
        "epoch": controller.epoch, "budget": controller.budget_units, "pool": list(controller.pool),
        "profile": controller.profile,
        "trained": {n: p.requires_grad for n, p in net.named_parameters()},
        "channels": {n: m.selected_channels.tolist() for n, m in net.named_modules()
                     if hasattr(m, "selected_channels")},
    }


def _tight_budget_controller():
    """A budget that fits a few channels at 15x13 and none at 4x the pixels."""
    net = small_net()
    probe = tt.convert(net, 0.5, example_input=X, policy="d-fullrandom")
    cheapest = min(l.units_per_channel for l in probe.layers if not l.is_classifier)
    probe.revert()
    controller = tt.convert(net, budget_units=2 * cheapest, example_input=X, policy="d-fullrandom")
    controller.resample(3)
    return net, controller


def test_set_example_input_that_no_channel_fits_raises_and_keeps_everything():
    net, controller = _tight_budget_controller()
    before = _controller_state(net, controller)
    with pytest.raises(ValueError, match="smaller than the cheapest channel"):
        controller.set_example_input(torch.randn(2, 3, 30, 26))
    assert _controller_state(net, controller) == before
    net.train()
    net(X).sum().backward()             # the profiled shape is still the one checked
    with pytest.raises(RuntimeError, match="differs from the profiled"):
        net(torch.randn(2, 3, 30, 26))


def test_resample_that_fits_no_channel_raises_and_keeps_the_selection():
    net, controller = _tight_budget_controller()
    state = controller.state_dict()
    state["budget_units"] = 1           # e.g. a checkpoint of a smaller budget
    controller.load_state_dict(state)
    before = _controller_state(net, controller)
    with pytest.raises(ValueError, match="fits no channel"):
        controller.resample(4)
    assert _controller_state(net, controller) == before


def test_a_budget_that_fits_only_layers_outside_the_top_k_pool_is_refused():
    """The pool's cheapest channel counts, not the model's: else epoch 0 trains nothing."""
    net = small_net()
    probe = tt.convert(net, 0.5, example_input=X, policy="d-fullrandom")
    layers = sorted((l for l in probe.layers if not l.is_classifier), key=lambda l: l.units_per_channel)
    cheap, dear = layers[0], layers[-1]
    probe.revert()
    assert cheap.units_per_channel < dear.units_per_channel
    ranking = LayerRanking("small", {dear.name: 1.0, cheap.name: 1e-6}, steps=1)
    with pytest.raises(ValueError, match=f"cheapest channel \\({dear.units_per_channel} units"):
        tt.convert(net, budget_units=dear.units_per_channel - 1, example_input=X, ranking=ranking,
                   coverage=0.5)
    assert not any(p.requires_grad is False for p in net.parameters())   # left as it was


def test_a_lazy_first_forward_that_no_channel_fits_raises_at_every_forward():
    """Without example_input, the budget error comes at the first forward, and keeps coming:
    a second forward does not train a silently unprofiled model."""
    net = small_net()
    controller = tt.convert(net, budget_units=1)
    net.train()
    for _ in range(2):
        with pytest.raises(ValueError, match="smaller than the cheapest channel"):
            net(X)
    assert controller.profile is None and not controller.selection


def test_a_failed_lazy_profiling_keeps_the_training_flags():
    net = small_net()
    net[3].conv[1].eval()
    training = {n: m.training for n, m in net.named_modules()}
    tt.convert(net, budget_units=1)
    with pytest.raises(ValueError):
        net(X)
    assert {n: m.training for n, m in net.named_modules()} == training
    assert isinstance(net[3].conv[1], nn.BatchNorm2d)
