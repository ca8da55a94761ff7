"""RGN, top-K coverage, ranking files and their validation."""

import json
import warnings

import pytest
import torch
import torch.nn as nn

import trady_triton as tt
from trady_triton.ranking import LayerRanking, channel_grad_norms

from helpers import small_net


@pytest.mark.parametrize("groups,cin,cout", [(1, 5, 7), (5, 5, 10), (2, 6, 4)])
def test_channel_grad_norms_match_a_loop_over_channels(groups, cin, cout):
    grad = torch.randn(cout, cin // groups, 3, 3, dtype=torch.float64)
    norms = channel_grad_norms(grad, groups)
    opg, cpg = cout // groups, cin // groups
    for c in range(cin):
        g = c // cpg
        expected = grad[g * opg:(g + 1) * opg, c % cpg].norm()
        torch.testing.assert_close(norms[c], expected)
    linear = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(channel_grad_norms(linear), linear.norm(dim=0))


def test_top_k_is_the_shortest_prefix_reaching_coverage():
    ranking = LayerRanking("net", {"a": 50.0, "b": 30.0, "c": 15.0, "d": 5.0}, 3)
    assert ranking.order() == ["a", "b", "c", "d"]
    assert ranking.top_k(0.80) == ["a", "b"]
    assert ranking.top_k(0.81) == ["a", "b", "c"]
    assert ranking.top_k(1.0) == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="coverage"):
        ranking.top_k(0)


def test_rank_layers_accumulates_rgn_and_leaves_the_model_untouched(tmp_path):
    net = small_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 15, 13), torch.randint(0, 5, (4,))) for _ in range(2)]
    ranking = tt.rank_layers(net, batches, steps=3, arch="small")
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(ranking.scores) == sorted(convs)
    assert all(v > 0 for v in ranking.scores.values())
    path = tmp_path / "rankings.json"
    tt.save_ranking(ranking, path)
    tt.save_ranking(LayerRanking("other", {"x": 1.0}, 1), path)
    loaded = tt.load_ranking(path, "small")
    assert loaded.scores == pytest.approx(ranking.scores) and loaded.steps == 3
    controller = tt.convert(net, 0.3, example_input=batches[0][0], ranking=path, arch="small")
    assert set(controller.selection) <= set(controller.pool)
    assert controller.pool == loaded.top_k()


def test_missing_ranking_warns_and_points_to_rank_layers():
    with pytest.warns(UserWarning, match="rank_layers"):
        tt.convert(small_net(), 0.3, example_input=torch.randn(1, 3, 15, 13))


def test_unknown_layer_in_ranking_is_refused():
    ranking = LayerRanking("small", {"0": 1.0, "no.such.layer": 2.0}, 1)
    with pytest.raises(ValueError, match="no.such.layer"):
        tt.convert(small_net(), 0.3, example_input=torch.randn(1, 3, 15, 13), ranking=ranking)


@pytest.mark.parametrize("content", ["{not json", json.dumps([1, 2]),
                                     json.dumps({"format": "other", "version": 1, "architectures": {}}),
                                     json.dumps({"format": "trady-ranking", "version": 1,
                                                 "architectures": {"small": {"scores": {"0": -1}}}}),
                                     json.dumps({"format": "trady-ranking", "version": 1,
                                                 "architectures": {"small": {"scores": "x"}}})])
def test_corrupted_ranking_file_is_refused_with_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="ranking file"):
        tt.load_ranking(path, "small")


def test_ranking_file_without_the_architecture_names_the_known_ones(tmp_path):
    path = tmp_path / "r.json"
    tt.save_ranking(LayerRanking("a", {"x": 1.0}, 1), path)
    with pytest.raises(ValueError, match=r"allowed values: \['a'\]"):
        tt.load_ranking(path, "b")


def test_convert_picks_the_shipped_ranking_made_at_the_input_resolution():
    from trady_triton.models.efficientnet_lite import efficientnet_lite0
    from trady_triton.ranking import load_ranking, shipped_rankings_path

    at_40 = load_ranking(shipped_rankings_path(), "efficientnet-lite0@40")
    default = load_ranking(shipped_rankings_path(), "efficientnet-lite0")
    assert at_40.scores != default.scores
    for size, expected in ((40, at_40), (48, default)):
        torch.manual_seed(0)
        net = efficientnet_lite0(pretrained=False, num_classes=10).eval()
        controller = tt.convert(net, 0.05, example_input=torch.randn(2, 3, size, size))
        assert controller.ranking.arch == expected.arch
        assert controller.ranking.scores == expected.scores
