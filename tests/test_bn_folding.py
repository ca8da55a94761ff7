"""Folding a frozen BN into the frozen conv feeding it: same outputs and gradients as
the unfolded path (float64), found by the profile's data flow, state_dict untouched."""

import copy

import pytest
import torch

import trady_triton as tt
from helpers import small_net


def _converted(fold: bool, seed: int = 3):
    net = small_net().double()
    x = torch.randn(3, 3, 17, 15, dtype=torch.float64)
    controller = tt.convert(net, 0.03, example_input=x[:2], policy="d-fullrandom", seed=seed)
    controller.set_bn_folding(fold)
    return net, controller, x


def _step(net, x):
    x = x.clone().requires_grad_(True)
    out = net(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def test_profile_finds_conv_bn_pairs_not_fused_with_an_activation():
    _, controller, _ = _converted(False)
    folds = controller.profile.conv_bn_folds
    fused = {bn for bn, _, _ in controller.profile.fusions}
    assert folds, "small_net has conv -> BN pairs (the inverted residuals' projections)"
    assert all(bn not in fused for _, bn in folds)
    assert len({conv for conv, _ in folds}) == len(folds)


@pytest.mark.parametrize("epoch", [0, 2])   # epochs where a folded pair is frozen
def test_folded_step_matches_unfolded_in_float64(epoch):
    plain, c_plain, x = _converted(False)
    folded, c_folded, _ = _converted(True)
    for controller in (c_plain, c_folded):
        controller.resample(epoch)   # same seed: same selection in both
    used = [conv for conv, _ in c_folded.profile.conv_bn_folds
            if folded.get_submodule(conv)._foldable_bn() is not None]
    assert used, "at least one pair is frozen in this selection, so folding ran"
    out_p, gx_p, g_p = _step(plain, x)
    out_f, gx_f, g_f = _step(folded, x)
    torch.testing.assert_close(out_f, out_p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_f, gx_p, rtol=1e-12, atol=1e-12)
    assert g_f.keys() == g_p.keys() and g_f
    for name in g_p:
        torch.testing.assert_close(g_f[name], g_p[name], rtol=1e-12, atol=1e-12)


def test_fold_cache_follows_in_place_updates_of_the_bn():
    plain, c_plain, x = _converted(False)
    folded, c_folded, _ = _converted(True)
    conv_name, bn_name = c_folded.profile.conv_bn_folds[0]
    folded.eval(), plain.eval()
    folded(x)   # fills the cache
    with torch.no_grad():
        for net in (plain, folded):
            net.get_submodule(bn_name).running_var.mul_(1.7)
    torch.testing.assert_close(folded(x), plain(x), rtol=1e-12, atol=1e-12)


def test_convert_fold_resample_revert_leaves_state_dict_bit_identical():
    net = small_net()
    before = copy.deepcopy(net.state_dict())
    x = torch.randn(2, 3, 17, 15)
    controller = tt.convert(net, 0.3, example_input=x, policy="d-fullrandom", seed=1)
    controller.set_bn_folding(True)
    for epoch in range(3):
        controller.resample(epoch)
        with torch.no_grad():
            net(x)
    tt.revert(controller)
    after = net.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_set_bn_folding_rejects_a_non_bool():
    _, controller, _ = _converted(False)
    with pytest.raises(TypeError, match="enabled="):
        controller.set_bn_folding("yes")


def test_folding_is_on_by_default():
    net = small_net()
    x = torch.randn(2, 3, 17, 15)
    controller = tt.convert(net, 0.03, example_input=x, policy="d-fullrandom", seed=3)
    wired = [conv for conv, _ in controller.profile.conv_bn_folds
             if net.get_submodule(conv)._fold_into is not None]
    assert wired and len(wired) == len(controller.profile.conv_bn_folds)


@pytest.mark.parametrize("epoch", [0, 2])
def test_folded_step_saves_what_the_cost_model_counts(epoch):
    """The folded conv saves only its weight (a parameter) and keeps the BN's scale on
    ctx: measured saved bytes are the unfolded path's and the cost model's."""
    saved = {}
    for fold in (False, True):
        net, controller, x = _converted(fold)
        controller.resample(epoch)
        net.train()
        with tt.saved_tensor_bytes(net) as measured:
            out = net(x.clone().requires_grad_(False))
        out.square().sum().backward()
        saved[fold] = measured.total
        assert measured.total == controller.saved_bytes(batch=x.shape[0])["total"]
    folded_used = [c for c, _ in controller.profile.conv_bn_folds
                   if net.get_submodule(c)._foldable_bn() is not None]
    assert folded_used
    assert saved[True] == saved[False]
