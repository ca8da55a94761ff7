"""transformer.py: LayerNorm, attention and MLP keep the least, exactly; ViT and BERT-style nets."""

import pytest
import torch
import torch.nn as nn

from helpers import check_exact_conversion, swapped_and_plain
from trady_triton.accounting import plain_and_converted_bytes
from trady_triton.models.transformer_blocks import MLP, Attention
from trady_triton.models.transformers import BertEncoder, VisionTransformer

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny shapes; the cores are shared

N, T, D = 2, 7, 12


def _frozen(module):
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _compare(module, x0, *args):
    """Bit-equal dX of a swapped copy of the frozen ``module``; returns the bytes it kept."""
    grad, grad_plain, saved, _, _ = swapped_and_plain(module, x0, *args)
    torch.testing.assert_close(grad, grad_plain, rtol=0, atol=0)
    return saved


@pytest.mark.parametrize("affine", [True, False])
def test_frozen_layer_norm_keeps_its_input_and_row_statistics(affine):
    torch.manual_seed(0)
    norm = _frozen(nn.LayerNorm(D, elementwise_affine=affine).double())
    if affine:
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.uniform_(-0.5, 0.5)
    saved = _compare(norm, torch.randn(N, T, D, dtype=torch.float64) * 3 + 1)
    assert saved == (N * T * D + 2 * N * T) * 8


@pytest.mark.parametrize("masked", [False, True])
def test_attention_core_keeps_only_qkv(masked):
    torch.manual_seed(1)
    mask = torch.rand(N, 1, T, T) > 0.3 if masked else None
    if masked:
        mask[..., 0] = True          # every query sees at least one key
    saved = _compare(_frozen(Attention(D, 3).double()), torch.randn(N, T, D, dtype=torch.float64),
                     mask)
    assert saved == N * T * 3 * D * 8   # frozen projections keep nothing


@pytest.mark.parametrize("act", [nn.GELU, nn.SiLU, nn.Hardswish, nn.ReLU])
def test_mlp_activation_keeps_the_narrow_fc1_input(act):
    torch.manual_seed(2)
    saved = _compare(_frozen(MLP(D, 4 * D, act).double()), torch.randn(N, T, D, dtype=torch.float64))
    narrow = N * T * D * 8 if act is not nn.ReLU else N * T * 4 * D // 8   # ReLU: its 1-bit mask
    assert saved == narrow


TINY = {
    "vit": (lambda: VisionTransformer(num_classes=5, image_size=20, patch=4, dim=12, depth=2,
                                      heads=3, mlp_ratio=3),
            lambda: torch.randn(2, 3, 20, 20, dtype=torch.float64)),
    "bert": (lambda: BertEncoder(num_classes=3, vocab_size=50, max_positions=16, dim=12, depth=2,
                                 heads=2, hidden=20, dropout=0.1),
             lambda: torch.randint(0, 50, (2, 9))),
}


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_transformers_are_exact_and_measured_bytes_equal_the_cost_model(name, seed):
    torch.manual_seed(seed)
    make, inputs = TINY[name]
    net = make()
    for m in net.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    controller, trady, plain = check_exact_conversion(net, inputs(), keep_ratio=0.1, seed=seed)
    assert not controller.profile.other_modules
    assert 0 < trady < plain


@pytest.mark.parametrize("make, x", [
    (VisionTransformer, torch.randn(2, 3, 224, 224)),
    (BertEncoder, torch.randint(0, 30522, (2, 128))),
])
def test_two_percent_of_full_units_saves_2_2x_below_plain_pytorch(make, x):
    """ViT-Tiny at 224 and the default BERT-style encoder at 128 tokens, float32."""
    torch.manual_seed(0)
    plain, trady, modelled = plain_and_converted_bytes(make(num_classes=10), x, 0.02)
    assert trady == modelled
    assert plain >= 2.2 * trady


def test_convert_keeps_state_dict_keys_and_revert_restores_the_plain_modules():
    import trady_triton as tt
    torch.manual_seed(3)
    net = TINY["bert"][0]()
    types, state = [type(m) for m in net.modules()], net.state_dict()
    controller = tt.convert(net, 0.1, example_input=TINY["bert"][1]())
    assert type(net.blocks[0].attn).__name__ == "TraDyAttention"
    assert list(net.state_dict()) == list(state)
    tt.revert(controller)
    assert [type(m) for m in net.modules()] == types
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
