"""revert() gives back the user's model: their requires_grad and training flags, trained values,
their hooks, and nothing TraDy added (no hook, buffer or attribute)."""

import pytest
import torch
import torch.nn as nn

import trady_triton as tt
from trady_triton.convert import TRADY_TYPES

from helpers import assert_same_model_state, model_state, small_net

pytestmark = pytest.mark.filterwarnings("ignore:no layer ranking")

X = torch.randn(4, 3, 15, 13)
Y = torch.tensor([0, 1, 2, 3])


def _user_frozen_net():
    """small_net with the user's own choices: frozen parameters, a BN in eval, a hook."""
    net = small_net()
    net[5].bias.requires_grad_(False)
    net[3].conv[1].weight.requires_grad_(False)
    net[4].conv[0].weight.requires_grad_(False)
    net[4].conv[4].eval()
    net[3].conv[0].register_forward_hook(lambda module, args, output: None)
    return net


@pytest.mark.parametrize("through", ["controller", "model"])
def test_convert_then_revert_gives_back_the_users_flags_hooks_and_values(through):
    net = _user_frozen_net()
    before = model_state(net)
    controller = tt.convert(net, 0.3, example_input=X, policy="d-fullrandom", seed=1)
    assert not net[5].weight.requires_grad or "5" in controller.selection   # TraDy froze things
    reverted = tt.revert(controller if through == "controller" else net)
    assert reverted is net
    assert not any(isinstance(m, TRADY_TYPES) for m in net.modules())
    assert_same_model_state(before, model_state(net), same_module_objects=False)
    assert "_trady_controller" not in vars(net)


def test_a_trained_step_then_revert_keeps_the_trained_weights_and_the_users_flags():
    net = _user_frozen_net()
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    training = {n: m.training for n, m in net.named_modules()}
    controller = tt.convert(net, 0.3, example_input=X, policy="d-fullrandom", seed=1)
    net.train()   # as a training loop does: the user's eval BN is in train mode now
    untouched = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    nn.functional.cross_entropy(net(X), Y).backward()
    optimizer.step()
    trained = {k: v.clone() for k, v in net.state_dict().items()}
    assert any(not torch.equal(trained[k], untouched[k]) for k in trained)   # it did train
    controller.revert()
    for name, value in net.state_dict().items():
        assert torch.equal(value, trained[name]), name
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
    assert {n: m.training for n, m in net.named_modules()} == training


def test_revert_leaves_no_trady_hook_buffer_or_attribute():
    net = _user_frozen_net()
    before = model_state(net)
    controller = tt.convert(net, 0.3)          # lazy: profiles at the first forward
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    controller.mask_optimizer(optimizer)
    net(X)
    controller.revert()
    after = model_state(net)
    assert after["hooks"] == before["hooks"]
    assert after["attributes"] == before["attributes"]
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def test_a_users_hook_handle_still_removes_its_hook_while_converted():
    net = small_net()
    calls = []
    handle = net[5].register_forward_hook(lambda module, args, output: calls.append(1))
    tt.convert(net, 0.3, example_input=X)
    net(X)
    seen = len(calls)
    handle.remove()
    net(X)
    assert seen >= 1 and len(calls) == seen


@pytest.mark.parametrize("padding", ["same", "valid", 1])
def test_revert_gives_back_the_conv_padding_as_the_user_wrote_it(padding):
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=padding), nn.ReLU(), nn.Conv2d(6, 4, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    x = torch.randn(2, 3, 9, 9)
    expected = net(x)
    tt.revert(tt.convert(net, 0.5, example_input=x))
    assert net[0].padding == nn.Conv2d(3, 6, 3, padding=padding).padding
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)


def test_the_controller_refuses_to_act_after_revert_and_a_second_revert_does_nothing():
    net = _user_frozen_net()
    controller = tt.convert(net, 0.3, example_input=X)
    controller.revert()
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    with pytest.raises(RuntimeError, match="reverted"):
        controller.resample(1)
    with pytest.raises(RuntimeError, match="reverted"):
        controller.set_example_input(X)
    with pytest.raises(RuntimeError, match="reverted"):
        controller.mask_optimizer(torch.optim.SGD(net.parameters(), lr=0.1))
    controller.revert()
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags


def test_revert_of_something_else_names_the_parameter_and_the_allowed_types():
    with pytest.raises(TypeError, match="model_or_controller: expected a TraDyController or a "
                                        "torch.nn.Module, got dict"):
        tt.revert({})
