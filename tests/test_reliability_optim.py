"""Optimizers with state and weight decay: unselected channels stay bit-identical.

controller.mask_optimizer(optimizer) (trady_triton/optim.py) holds the entries of
unselected input channels across optimizer.step(), for SGD with and without
momentum, Adam and AdamW with weight decay, for-loop / foreach / fused.
"""

import functools

import pytest
import torch
import torch.nn as nn

import trady_triton as tt
from trady_triton.optim import owned_entries

from helpers import small_net

X = torch.randn(4, 3, 15, 13, generator=torch.Generator().manual_seed(0))
T = torch.tensor([0, 1, 2, 3])


pytestmark = pytest.mark.usefixtures("one_thread")

OPTIMIZERS = {
    "sgd": functools.partial(torch.optim.SGD, lr=0.1),
    "sgd-momentum": functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
    "sgd-nesterov-wd": functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True,
                                         weight_decay=0.1),
    "adam-wd": functools.partial(torch.optim.Adam, lr=0.01, weight_decay=0.1),
    "adam-amsgrad-foreach": functools.partial(torch.optim.Adam, lr=0.01, amsgrad=True,
                                              foreach=True),
    "adamw-wd": functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1, foreach=False),
    "adamw-wd-foreach": functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1, foreach=True),
    "adamw-wd-fused": functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1, fused=True),
    "rmsprop-momentum": functools.partial(torch.optim.RMSprop, lr=0.01, momentum=0.9,
                                          weight_decay=0.1),
}


def _setup(policy="d-fullrandom"):
    net = small_net()
    controller = tt.convert(net, 0.3, example_input=X, policy=policy, seed=4)
    net.train()
    return net, controller


def _train(net, optimizer, steps, set_to_none=True):
    for step in range(steps):
        optimizer.zero_grad(set_to_none=set_to_none)
        x = X + 0.1 * step
        nn.functional.cross_entropy(net(x), T).backward()
        optimizer.step()


def _snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _check_only_selected_changed(net, controller, before, after):
    """Every entry not owned by a selected channel (or the classifier) is bit-identical."""
    modules = dict(net.named_modules())
    trained_layers = set(controller.selection)
    head = controller.classifier
    moved = 0
    for key, old in before.items():
        new = after[key]
        owner, _, leaf = key.rpartition(".")
        if owner == head:
            continue
        if leaf == "weight" and owner in trained_layers:
            owned = owned_entries(modules[owner], controller.selection[owner])
            assert torch.equal(new[~owned], old[~owned]), f"unselected entries of {key} moved"
            moved += int(not torch.equal(new[owned], old[owned]))
        else:
            assert torch.equal(new, old), f"{key} moved although it is frozen"
    assert moved, "no selected channel was trained"


def _epoch_selection(controller, fraction_layers, fraction_channels, rng_seed):
    """A hand-made selection: some layers with all channels, some with part."""
    g = torch.Generator().manual_seed(rng_seed)
    names = [l.name for l in controller.layers if not l.is_classifier]
    chosen = [n for i, n in enumerate(names) if i % fraction_layers == 0]
    selection = {}
    for name in chosen:
        channels = controller.modules[name].weight.shape[1] * controller.modules[name].groups
        k = max(1, int(channels * fraction_channels))
        selection[name] = torch.randperm(channels, generator=g)[:k].sort().values
    return selection


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_unselected_channels_stay_bit_identical_after_carrying_state(name):
    net, controller = _setup()
    optimizer = OPTIMIZERS[name](net.parameters())
    mask = controller.mask_optimizer(optimizer)
    # Epoch A: every channel of every other layer, so the optimizer builds state for them.
    everything = {l.name: torch.arange(l.in_channels) for l in controller.layers
                  if not l.is_classifier and controller.layers.index(l) % 2 == 0}
    controller.apply_selection(everything)
    _train(net, optimizer, 3)
    # Epoch B: part of those channels (state carried), other layers frozen.
    for epoch_selection in (_epoch_selection(controller, 2, 0.4, 1),
                            _epoch_selection(controller, 3, 0.5, 2)):
        controller.apply_selection(epoch_selection)
        before = _snapshot(net)
        _train(net, optimizer, 3, set_to_none=(name != "sgd-momentum"))
        _check_only_selected_changed(net, controller, before, _snapshot(net))
    # Epoch C: the controller's own draws.
    for epoch in (1, 2):
        controller.resample(epoch)
        before = _snapshot(net)
        _train(net, optimizer, 2)
        _check_only_selected_changed(net, controller, before, _snapshot(net))
    mask.remove()
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


@pytest.mark.parametrize("name", ["sgd-momentum", "adamw-wd"])
def test_without_the_mask_unselected_channels_move(name):
    """The failure the mechanism prevents (so the test above can fail)."""
    net, controller = _setup()
    optimizer = OPTIMIZERS[name](net.parameters())
    everything = {l.name: torch.arange(l.in_channels) for l in controller.layers
                  if not l.is_classifier}
    controller.apply_selection(everything)
    _train(net, optimizer, 2)
    controller.apply_selection(_epoch_selection(controller, 1, 0.3, 3))
    before = _snapshot(net)
    _train(net, optimizer, 2)
    with pytest.raises(AssertionError, match="unselected entries"):
        _check_only_selected_changed(net, controller, before, _snapshot(net))


def _state_of(optimizer, p, key):
    return optimizer.state[p][key].clone()


@pytest.mark.parametrize("mode", ["freeze", "reset", "keep"])
def test_optimizer_state_of_unselected_channels(mode):
    net, controller = _setup()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    controller.mask_optimizer(optimizer, state=mode)
    name = next(l.name for l in controller.layers if not l.is_classifier
                and controller.modules[l.name].groups == 1 and l.in_channels >= 4)
    layer = controller.modules[name]
    controller.apply_selection({name: torch.arange(layer.weight.shape[1])})
    _train(net, optimizer, 2)
    controller.apply_selection({name: torch.tensor([0, 2])})
    owned = owned_entries(layer, torch.tensor([0, 2]))
    m0 = _state_of(optimizer, layer.weight, "exp_avg")
    w0 = layer.weight.detach().clone()
    _train(net, optimizer, 2)
    m1 = _state_of(optimizer, layer.weight, "exp_avg")
    assert torch.equal(layer.weight[~owned], w0[~owned])      # weights held in every mode
    if mode == "freeze":
        assert torch.equal(m1[~owned], m0[~owned])
    elif mode == "reset":
        assert torch.all(m1[~owned] == 0) and torch.any(m0[~owned] != 0)
    else:
        assert not torch.equal(m1[~owned], m0[~owned])        # decayed by the optimizer
    # Wholly frozen layer: untouched by the optimizer, or zeroed with "reset".
    controller.apply_selection({})
    _train(net, optimizer, 1)
    m2 = _state_of(optimizer, layer.weight, "exp_avg")
    if mode == "reset":
        assert torch.all(m2 == 0)
    else:
        assert torch.equal(m2, m1)


def test_owned_entries_match_the_masked_gradient_for_grouped_convs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(6, 8, 3, groups=2), nn.Conv2d(8, 8, 3, groups=8, padding=1),
                        nn.Flatten(), nn.Linear(8 * 16, 3))
    x = torch.randn(2, 6, 6, 6)
    controller = tt.convert(net, 1.0, example_input=x, policy="d-fullrandom")
    selection = {"0": torch.tensor([1, 4, 5]), "1": torch.tensor([0, 7])}
    controller.apply_selection(selection)
    net(x).square().sum().backward()
    for name, channels in selection.items():
        module = controller.modules[name]
        owned = owned_entries(module, channels)
        assert torch.all(module.weight.grad[~owned] == 0)
        assert torch.all(module.weight.grad[owned] != 0)


def test_mask_is_removed_by_revert_and_rejects_bad_arguments():
    net, controller = _setup()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="state="):
        controller.mask_optimizer(optimizer, state="magic")
    with pytest.raises(TypeError, match="optimizer"):
        controller.mask_optimizer(object())
    mask = controller.mask_optimizer(optimizer)
    assert mask.active and optimizer._optimizer_step_pre_hooks
    controller.revert()
    assert not mask.active
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
