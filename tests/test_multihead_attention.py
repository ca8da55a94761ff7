"""nn.MultiheadAttention with frozen projections: self-attention keeps only the packed qkv."""

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
