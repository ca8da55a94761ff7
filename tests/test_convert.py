"""convert() / revert() on small models: keys, freezing, in-place activations, errors."""

import copy

import pytest
import torch
import torch.nn as nn

import trady_triton as tt
from trady_triton import layers as L
from trady_triton.convert import TRADY_TYPES

from helpers import small_net


def test_state_dict_keys_unchanged_both_ways_and_revert_gives_plain_modules():
    net = small_net()
    original = copy.deepcopy(net)
    x = torch.randn(2, 3, 15, 13)
    controller = tt.convert(net, 0.2, example_input=x)
    assert list(net.state_dict()) == list(original.state_dict())
    net.load_state_dict(original.state_dict())           # plain -> converted
    original.load_state_dict(net.state_dict())           # converted -> plain
    assert isinstance(net[0], L.TraDyConv2d) and isinstance(net[9], L.TraDyLinear)
    reverted = controller.revert()
    assert reverted is net
    assert not any(isinstance(m, TRADY_TYPES) for m in net.modules())
    assert {type(m) for m in net.modules()} == {type(m) for m in original.modules()}
    assert list(net.state_dict()) == list(original.state_dict())
    for (k, a), b in zip(net.state_dict().items(), original.state_dict().values()):
        assert torch.equal(a, b), k
    tt.convert(net, 0.2, example_input=x)   # convertible again after revert


def test_converted_gradients_equal_the_masked_full_gradient():
    """The real saving gives exactly the paper's simulation (full grad, then zeroed)."""
    net = small_net().double()
    reference = copy.deepcopy(net).eval()
    x = torch.randn(3, 3, 15, 13, dtype=torch.float64)
    target = torch.tensor([0, 3, 1])
    controller = tt.convert(net, 0.3, example_input=x, policy="d-fullrandom", seed=5)
    assert len(controller.selection) >= 2
    net.train()
    nn.functional.cross_entropy(net(x), target).backward()
    nn.functional.cross_entropy(reference(x), target).backward()
    modules = dict(net.named_modules())
    for name, ref_module in reference.named_modules():
        if not isinstance(ref_module, (nn.Conv2d, nn.Linear)):
            continue
        grad = modules[name].weight.grad
        if name in controller.selection:
            idx = controller.selection[name]
            groups = getattr(ref_module, "groups", 1)
            if groups == 1:
                torch.testing.assert_close(grad[:, idx], ref_module.weight.grad[:, idx],
                                           rtol=1e-10, atol=1e-12)
                rest = torch.ones(grad.shape[1], dtype=torch.bool)
                rest[idx] = False
                assert torch.all(grad[:, rest] == 0)
            else:   # depthwise: channel c owns dW[c]
                torch.testing.assert_close(grad[idx], ref_module.weight.grad[idx], rtol=1e-10, atol=1e-12)
        elif name == controller.classifier:
            torch.testing.assert_close(grad, ref_module.weight.grad, rtol=1e-10, atol=1e-12)
        else:
            assert grad is None, name


def test_frozen_parameters_stay_bit_identical_after_sgd_steps():
    net = small_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 3, 15, 13)
    controller = tt.convert(net, 0.1, example_input=x, policy="d-fullrandom")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    net.train()
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x), torch.tensor([0, 1, 2, 3])).backward()
        optimizer.step()
    after = net.state_dict()
    trained = {f"{n}.weight" for n in controller.selection} | {f"{controller.classifier}.weight",
                                                             f"{controller.classifier}.bias"}
    for key, value in before.items():
        if key in trained:
            continue
        assert torch.equal(after[key], value), key   # BN statistics included
    for name, idx in controller.selection.items():
        w0, w1 = before[f"{name}.weight"], after[f"{name}.weight"]
        if net.get_submodule(name).groups > 1:   # depthwise: channel c owns dW[c]
            w0, w1 = w0.transpose(0, 1), w1.transpose(0, 1)
        unselected = torch.ones(w0.shape[1], dtype=torch.bool)
        unselected[idx] = False
        assert torch.equal(w0[:, unselected], w1[:, unselected])
        assert not torch.equal(w0[:, idx], w1[:, idx])


def test_lazy_profiling_at_first_forward_draws_before_training():
    net = small_net()
    controller = tt.convert(net, 0.2)
    assert controller.profile is None
    x = torch.randn(2, 3, 15, 13)
    net(x).sum().backward()
    assert controller.epoch == 0 and controller.selection
    eager = tt.convert(small_net(), 0.2, example_input=x)
    assert {k: v.tolist() for k, v in eager.selection.items()} == \
        {k: v.tolist() for k, v in controller.selection.items()}


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), "0.5", True])
def test_keep_ratio_outside_range_is_refused(bad):
    with pytest.raises(ValueError, match="keep_ratio"):
        tt.convert(small_net(), bad, example_input=torch.randn(1, 3, 15, 13))


def test_budget_smaller_than_cheapest_channel_is_refused():
    with pytest.raises(ValueError, match="cheapest channel"):
        tt.convert(small_net(), budget_units=3, example_input=torch.randn(1, 3, 15, 13))


def test_model_with_nothing_to_convert_is_refused():
    with pytest.raises(ValueError, match="nothing to convert"):
        tt.convert(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), 0.5)
    with pytest.raises(ValueError, match="nothing to convert"):
        tt.convert(nn.Sequential(nn.Tanh()), 0.5)


def test_unknown_policy_and_double_conversion_are_refused():
    with pytest.raises(ValueError, match="policy='magic'"):
        tt.convert(small_net(), 0.5, policy="magic")
    net = small_net()
    tt.convert(net, 0.5, example_input=torch.randn(1, 3, 15, 13))
    with pytest.raises(ValueError, match="already converted"):
        tt.convert(net, 0.5)


def test_budget_in_bytes_equals_budget_in_units():
    x = torch.randn(1, 3, 15, 13)
    by_units = tt.convert(small_net(), budget_units=500, example_input=x)
    by_bytes = tt.convert(small_net(), budget_bytes=2000, example_input=x)
    assert by_units.budget_units == by_bytes.budget_units == 500


def test_unsupported_modules_are_listed_in_the_report():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ELU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 9, 2))
    controller = tt.convert(net, 0.5, example_input=torch.randn(1, 3, 7, 7))
    assert ("1", "ELU") in controller.profile.other_modules
    assert "ELU" in controller.report(2)
