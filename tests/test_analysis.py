"""The measurements behind the notebooks (trady_triton/analysis.py)."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trady_triton as tt
from trady_triton import analysis as A
from trady_triton.ranking import LayerRanking, channel_rgn

from helpers import small_net


def _task(n_train=24, n_test=8, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, 3, 15, 13, generator=g)
    y = torch.randint(0, classes, (n_train + n_test,), generator=g)
    return A.Task("small", "synthetic", 15, small_net(classes).eval(), x[:n_train], y[:n_train],
                  x[n_train:], y[n_train:], classes)


def _body(controller):
    return [l for l in controller.layers if not l.is_classifier]


def test_full_gradients_equal_plain_autograd_and_restore_the_selection():
    net = small_net()
    plain = copy.deepcopy(net).eval()
    x, y = torch.randn(4, 3, 15, 13), torch.randint(0, 5, (4,))
    controller = tt.convert(net, 0.2, example_input=x, policy="d-fullrandom")
    before = {k: v.clone() for k, v in controller.selection.items()}
    trained = {l.name: net.get_submodule(l.name).weight.requires_grad for l in _body(controller)}
    body, head, loss, _ = A.full_gradients(controller, x, y)
    modules = dict(plain.named_modules())
    names = [l.name for l in _body(controller)]
    ref_loss = F.cross_entropy(plain(x), y)
    ref = torch.autograd.grad(ref_loss, [modules[n].weight for n in names]
                              + list(plain[-1].parameters()))
    for name, g in zip(names, ref):
        torch.testing.assert_close(body[name], g, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(head["weight"], ref[len(names)])
    assert loss == pytest.approx(float(ref_loss.detach()), rel=1e-6)
    for layer in _body(controller):   # selection and frozen state restored
        module = net.get_submodule(layer.name)
        assert module.weight.requires_grad == trained[layer.name]
        if layer.name in before:
            assert torch.equal(module.selected_channels, before[layer.name])


def test_masked_full_gradient_is_what_the_converted_layers_compute():
    """One full backward gives the sparse gradient too: the analysis relies on it."""
    net = small_net()
    x, y = torch.randn(4, 3, 15, 13), torch.randint(0, 5, (4,))
    controller = tt.convert(net, 0.3, example_input=x, policy="d-fullrandom", seed=3)
    full, _, _, _ = A.full_gradients(controller, x, y)
    masks = A.selection_masks(controller)
    F.cross_entropy(net(x), y).backward()
    groups = set()
    for layer in _body(controller):
        weight = net.get_submodule(layer.name).weight
        groups.add(layer.groups)
        if layer.name in controller.selection:
            torch.testing.assert_close(weight.grad, full[layer.name] * masks[layer.name],
                                       atol=1e-6, rtol=1e-5)
            assert int(masks[layer.name].sum()) == \
                len(controller.selection[layer.name]) * layer.weight_units_per_channel
        else:
            assert weight.grad is None and not masks[layer.name].any()
    assert len(groups) > 1           # depthwise layers were covered


def test_score_channels_is_channel_rgn_of_the_summed_full_gradient_depthwise_included():
    net = small_net()
    plain = copy.deepcopy(net).eval()
    batches = [(torch.randn(4, 3, 15, 13), torch.randint(0, 5, (4,))) for _ in range(2)]
    controller = tt.convert(net, 0.3, example_input=batches[0][0], policy="d-detrgn")
    scores = A.score_channels(controller, batches)
    assert controller.channel_scores is scores
    modules = dict(plain.named_modules())
    body = _body(controller)
    total = None
    for x, y in batches:
        g = torch.autograd.grad(F.cross_entropy(plain(x), y), [modules[l.name].weight for l in body])
        total = g if total is None else [a + b for a, b in zip(total, g)]
    for layer, g in zip(body, total):
        torch.testing.assert_close(scores[layer.name], channel_rgn(layer, g), atol=1e-9, rtol=1e-5)
        if layer.groups > 1:      # every depthwise channel scored, not only channel 0
            assert int((scores[layer.name] > 0).sum()) > 1


def test_cosine_relative_error_norm():
    a = {"w": torch.tensor([3.0, 0.0]), "v": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([3.0, 4.0]), "v": torch.tensor([[0.0]])}
    assert A.norm(b) == pytest.approx(5.0)
    assert A.cosine(a, b) == pytest.approx(0.6)
    assert A.relative_error(a, b) == pytest.approx(0.8)
    assert A.cosine(b, b) == pytest.approx(1.0) and A.relative_error(b, b) == 0.0
    assert A.cosine({"w": torch.zeros(2)}, b) == 0.0


@pytest.mark.parametrize("alpha", [1.0, 1.5, 1.8, 2.0])
def test_alpha_stable_index_recovers_the_tail_index(alpha):
    from scipy.stats import levy_stable
    rng = np.random.default_rng(1)
    x = levy_stable.rvs(alpha, 0.0, size=200_000, random_state=rng)
    assert A.alpha_stable_index(x) == pytest.approx(alpha, abs=0.08)


def test_alpha_stable_index_on_gaussian_and_argument_checks():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert A.alpha_stable_index(x) == pytest.approx(2.0, abs=0.08)
    assert A.alpha_stable_index(x, k1=100) == pytest.approx(2.0, abs=0.1)
    with pytest.raises(ValueError, match="at least 4"):
        A.alpha_stable_index([1.0, 2.0])
    with pytest.raises(ValueError, match="k1"):
        A.alpha_stable_index(x, k1=1)


def test_top_share_and_energy_curve():
    energies = [torch.tensor([8.0, 1.0]), torch.tensor([1.0, 0.0, 0.0])]
    shares = A.top_share(energies, (0.2, 0.4, 1.0))
    assert shares == pytest.approx({0.2: 0.8, 0.4: 0.9, 1.0: 1.0})
    frac, share = A.energy_curve(energies)
    assert frac[0] == pytest.approx(0.2) and share[0] == pytest.approx(0.8)
    assert frac[-1] == pytest.approx(1.0) and share[-1] == pytest.approx(1.0)
    assert np.all(np.diff(share) >= 0)


def test_gradient_noise_probe_fields():
    net = small_net()
    batches = [(torch.randn(4, 3, 15, 13), torch.randint(0, 5, (4,))) for _ in range(3)]
    controller = tt.convert(net, policy="full", example_input=batches[0][0])
    probe = A.gradient_noise_probe(controller, batches, fractions=(0.1, 0.5))
    assert probe["n_minibatches"] == 3
    assert probe["n_coordinates"] == sum(net.get_submodule(l.name).weight.numel()
                                         for l in _body(controller))
    assert 0 < probe["share_top"][0.1] <= probe["share_top"][0.5] <= 1
    for key in ("alpha", "alpha_shuffled", "alpha_layer_std", "alpha_with_zeros"):
        assert math.isfinite(probe[key])
    assert 0.0 <= probe["zero_fraction"] < 1.0
    if probe["zero_fraction"] > 0:   # exact zeros drag the raw estimator down
        assert probe["alpha_with_zeros"] < probe["alpha"]
    assert probe["gaussian_alpha"] == pytest.approx(2.0, abs=0.3)


def test_tracking_full_and_classifier_only_are_the_two_ends():
    task = _task()
    full = A.track_sparse_training(task, "full", epochs=2, batch_size=8, lr=0.01)
    assert [r["epoch"] for r in full] == [1, 2]
    for row in full:
        assert row["cos_cum"] == pytest.approx(1.0) and row["relerr_cum"] == pytest.approx(0.0, abs=1e-9)
        assert row["step_cos"] == pytest.approx(1.0) and row["coverage"] == 1.0
        assert row["cos_cum_unit"] == pytest.approx(1.0) and row["full_epoch_norm"] > 0
        assert 0.0 <= row["test_accuracy"] <= 1.0
    head = A.track_sparse_training(task, "classifier-only", epochs=1, batch_size=8, lr=0.01)
    assert head[0]["coverage"] == 0.0 and head[0]["cos_cum"] == 0.0
    assert head[0]["relerr_cum"] == pytest.approx(1.0)
    # the task's own model is never trained
    assert torch.equal(task.model[0].weight, small_net()[0].weight)


def test_tracking_static_keeps_its_channels_dynamic_covers_more():
    task = _task()
    kw = dict(keep_ratio=0.1, epochs=3, batch_size=8, lr=0.01, seed=2)
    static = A.track_sparse_training(task, "s-fullrandom", **kw)
    dynamic = A.track_sparse_training(task, "d-fullrandom", **kw)
    assert len({r["coverage"] for r in static}) == 1
    assert dynamic[-1]["coverage"] > dynamic[0]["coverage"] == static[0]["coverage"]
    assert static[0]["cos_cum"] == pytest.approx(dynamic[0]["cos_cum"])   # same first draw
    for row in static + dynamic:
        assert 0 < row["cos_cum"] < 1 and row["selected_units"] <= row["budget_units"]
        assert row["relerr_cum"] >= math.sqrt(1 - row["cos_cum"] ** 2) - 1e-9
    detrgn = A.track_sparse_training(task, "d-detrgn", **kw)
    assert detrgn[0]["step_cos"] > 0


def test_replay_of_the_recorded_policy_reproduces_the_tracked_run():
    task = _task()
    ranking = LayerRanking("small", {n: float(i + 1) for i, (n, m) in enumerate(
        task.model.named_modules()) if isinstance(m, nn.Conv2d)}, steps=1)
    kw = dict(keep_ratio=0.15, ranking=ranking, epochs=3, batch_size=8, lr=0.01, seed=1)
    tracked = A.track_sparse_training(task, "d-topk", **kw)
    trajectory = A.reference_trajectory(task, policy="d-topk", **kw)
    replayed = A.replay_selection(trajectory, "d-topk", 0.15, seed=1)
    for t, r in zip(tracked, replayed):
        assert r["cos_cum"] == pytest.approx(t["cos_cum"], rel=1e-6)
        assert r["relerr_cum"] == pytest.approx(t["relerr_cum"], rel=1e-6)
        assert r["step_cos"] == pytest.approx(t["step_cos"], rel=1e-6)
        assert r["cos_cum_unit"] == pytest.approx(t["cos_cum_unit"], rel=1e-6)
        assert r["full_epoch_norm"] == pytest.approx(t["full_epoch_norm"], rel=1e-6)
    static = A.replay_selection(trajectory, "s-topk", 0.15, seed=1)
    assert static[0]["cos_cum"] == pytest.approx(replayed[0]["cos_cum"])
    assert A.replay_selection(trajectory, "d-detrgn", 0.15)[0]["step_cos"] > 0


def test_spearman_matrix_and_coverage_curve():
    m = A.spearman_matrix([{"a": 1, "b": 2, "c": 3}, {"a": 10, "b": 20, "c": 30},
                           {"a": 3, "b": 2, "c": 1, "d": 0}])
    np.testing.assert_allclose(m, [[1, 1, -1], [1, 1, -1], [-1, -1, 1]])
    ranking = LayerRanking("x", {"a": 1.0, "b": 3.0}, 1)
    np.testing.assert_allclose(A.coverage_curve(ranking), [0.75, 1.0])


def test_channel_agreement():
    a = {"l1": torch.arange(10.0), "l2": torch.tensor([1.0, 2.0]), "l3": torch.arange(10.0)}
    b = {"l1": torch.arange(10.0), "l2": torch.tensor([2.0, 1.0]), "l3": -torch.arange(10.0)}
    out = A.channel_agreement(a, b, top=0.2, min_channels=8)
    assert out["layers"] == 2                       # l2 has too few channels
    assert out["spearman"] == pytest.approx(0.0)     # +1 and -1
    assert out["top_overlap"] == pytest.approx(0.5)  # identical top-2, disjoint top-2


@pytest.mark.parametrize("groups,cin,cout", [(1, 5, 7), (5, 5, 10), (2, 6, 4)])
def test_channel_mask_matches_a_loop_over_channels(groups, cin, cout):
    from trady_triton.cost import LayerCost
    layer = LayerCost("x", "conv", cin, cout, groups, (3, 3), (4, 4), (4, 4), 4, 0)
    shape = (cout, cin // groups, 3, 3)
    channels = torch.tensor([cin - 1, 0, 1])
    expected = torch.zeros(shape, dtype=torch.bool)
    opg, ipg = cout // groups, cin // groups
    for c in channels.tolist():
        g, j = divmod(c, ipg)
        expected[g * opg:(g + 1) * opg, j] = True
    assert torch.equal(A.channel_mask(layer, shape, channels), expected)
    linear = LayerCost("y", "linear", 6, 3, 1, (1, 1), (), (), 4, 1)
    mask = A.channel_mask(linear, (3, 6), torch.tensor([2, 5]))
    assert mask[:, [2, 5]].all() and int(mask.sum()) == 6
