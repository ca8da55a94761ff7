"""nn.MultiheadAttention: self-attention keeps the packed qkv; its projections are layers of
the pool (frozen: nothing kept; selected: the compact input, only the selected dW slices)."""

import pytest
import torch
import torch.nn as nn

import trady_triton as tt
from helpers import check_exact_conversion

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny shapes; the cores are shared


class _Encoder(nn.Module):
    """Linear -> self-attention (nn.MultiheadAttention) -> GELU MLP -> mean -> classifier."""

    def __init__(self, batch_first=True, need_weights=False, padded=False):
        super().__init__()
        self.batch_first, self.need_weights, self.padded = batch_first, need_weights, padded
        self.embed = nn.Linear(6, 12)
        self.mha = nn.MultiheadAttention(12, 3, batch_first=batch_first)
        self.norm = nn.LayerNorm(12)
        self.fc = nn.Linear(12, 10)
        self.act = nn.GELU()
        self.classifier = nn.Linear(10, 3)

    def forward(self, tokens):
        x = self.embed(tokens)
        padding = None
        if self.padded:
            padding = torch.zeros(x.shape[:2], dtype=torch.bool)
            padding[0, -2:] = True          # the first sequence has two padded tokens
        seq = x if self.batch_first else x.transpose(0, 1)
        a = self.mha(seq, seq, seq, key_padding_mask=padding, need_weights=self.need_weights)[0]
        x = self.norm(x + (a if self.batch_first else a.transpose(0, 1)))
        return self.classifier(self.act(self.fc(x)).mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_self_attention_is_exact_and_costed(batch_first, padded):
    torch.manual_seed(0)
    net = _Encoder(batch_first, padded=padded)
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    for seed in range(2):
        controller, trady, plain = check_exact_conversion(net, x, keep_ratio=0.3, seed=seed)
        assert not controller.profile.other_modules
        assert 0 < trady < plain
        tt.revert(controller)


def test_attention_weights_requested_stay_pytorch_and_are_reported():
    torch.manual_seed(1)
    net = _Encoder(need_weights=True).double()
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    controller = tt.convert(net, 0.3, example_input=x)
    assert ("mha", "MultiheadAttention") in controller.profile.other_modules
    net.train()
    by_module = tt.saved_bytes_by_module(net, x)
    assert by_module["mha"] > 0
    assert "not modelled" in controller.report(2, measured_bytes=by_module)


def test_revert_gives_back_plain_multihead_attention():
    net = _Encoder()
    controller = tt.convert(net, 0.3, example_input=torch.randn(2, 7, 6))
    assert type(net.mha).__name__ == "TraDyMultiheadAttention"
    tt.revert(controller)
    assert type(net.mha) is nn.MultiheadAttention and not hasattr(net.mha, "took_converted_path")
    assert type(net.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert "selected_channels" not in net.mha._buffers and "weight" not in vars(net.mha)


def _plain_weight_grads(net, x, dy):
    for p in net.parameters():
        p.requires_grad_(True)
    net(x).backward(dy)
    return {"mha": net.mha.in_proj_weight.grad, "mha.out_proj": net.mha.out_proj.weight.grad,
            "embed": net.embed.weight.grad, "fc": net.fc.weight.grad}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("selection", [
    {"mha": [0, 5, 11]},                        # in_proj alone: the earliest trained layer
    {"mha.out_proj": [1, 2, 3, 4, 7]},          # out_proj alone: q, k, v need no gradient
    {"mha": list(range(12)), "mha.out_proj": [9]},   # every input feature of in_proj
    {"embed": [2], "mha": [3, 4], "fc": [0, 6]},
])
def test_selected_projections_train_only_their_slices_and_keep_what_the_cost_model_says(
        batch_first, selection):
    import copy
    torch.manual_seed(2)
    net = _Encoder(batch_first, padded=True).double().eval()
    plain = copy.deepcopy(net)
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    controller = tt.convert(net, 0.3, example_input=x, policy="d-fullrandom")
    assert {"mha", "mha.out_proj"} <= {layer.name for layer in controller.layers}
    controller.apply_selection({k: torch.tensor(v) for k, v in selection.items()})
    net.train()
    with tt.saved_tensor_bytes(net) as saved:
        out = net(x)
    assert saved.total == controller.saved_bytes(3)["total"]
    assert tt.saved_bytes_by_module(net, x).get("mha", 0) == \
        tt.cost.saved_bytes_per_module(controller.layers, controller.profile.masks,
                                       controller.counts(), 3).get("mha", 0)
    dy = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))
    out.backward(dy)
    want = _plain_weight_grads(plain, x, dy)
    weights = {"mha": net.mha.in_proj_weight, "mha.out_proj": net.mha.out_proj.weight,
               "embed": net.embed.weight, "fc": net.fc.weight}
    for name, weight in weights.items():
        if name not in selection:
            assert weight.grad is None and not weight.requires_grad, name
            continue
        chosen = torch.zeros(weight.shape[1], dtype=torch.bool)
        chosen[selection[name]] = True
        torch.testing.assert_close(weight.grad[:, chosen], want[name][:, chosen], rtol=1e-10,
                                   atol=1e-12)
        assert torch.equal(weight.grad[:, ~chosen], torch.zeros_like(weight.grad[:, ~chosen]))


def test_a_trained_in_projection_keeps_only_its_compact_input():
    torch.manual_seed(3)
    net = _Encoder().double()
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    controller = tt.convert(net, 0.3, example_input=x)
    controller.apply_selection({"mha": torch.tensor([1, 4])})
    net.train()
    by_module = tt.saved_bytes_by_module(net, x)
    # compact input [2, 7, 2] + packed qkv [2, 7, 36], float64
    assert by_module["mha"] == (2 * 7 * 2 + 2 * 7 * 36) * 8
    assert "mha.out_proj" not in by_module   # frozen: keeps nothing


def test_rank_layers_ranks_the_projections_and_leaves_the_model_plain():
    torch.manual_seed(4)
    net = _Encoder()
    x = torch.randn(4, 7, 6)
    ranking = tt.rank_layers(net, [(x, torch.randint(0, 3, (4,)))], steps=2)
    assert {"mha", "mha.out_proj"} <= set(ranking.scores)
    assert all(score > 0 for score in ranking.scores.values())
    assert type(net.mha) is nn.MultiheadAttention
    controller = tt.convert(net, 0.5, example_input=x, ranking=ranking)
    assert {"mha", "mha.out_proj"} <= set(controller.pool)
