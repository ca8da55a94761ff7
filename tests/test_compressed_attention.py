"""Compressed mode for the modules added after issue 14c: a converted nn.MultiheadAttention
(qkv and in_proj's compact copy), a Hugging Face self-attention (q, k, v) and Conv1d (its
compact copy). Each: close to float64 exact, bytes measured == cost model, fewer bytes."""

import copy
import math

import pytest
import torch
import torch.nn as nn

import trady_triton as tt
from _requirements import require_module
from test_conv1d import _sequence_net
from test_multihead_attention import _Encoder
from trady_triton.compressed import set_backward_bits
from trady_triton.hf_attention import exact_attention

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny shapes; the cores are shared


def _cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def _grads_and_bytes(net, x, bits, keep_ratio, seed):
    """(controller, trained layers' weight gradients, measured bytes by module, total)."""
    controller = tt.convert(net, keep_ratio, example_input=x, policy="d-fullrandom", seed=seed,
                            backward_bits=bits)
    net.eval()
    net(x).logsumexp(1).sum().backward()
    grads = {n: m.weight.grad for n, m in controller.modules.items()
             if getattr(m, "weight", None) is not None and m.weight.grad is not None}
    net.train()
    by_module = tt.saved_bytes_by_module(net, x)
    with tt.saved_tensor_bytes(net) as saved:
        net(x)
    return controller, grads, by_module, saved.total


def _check_against_exact(net, x, layers, modules, keep_ratio=0.5, seed=0):
    """At 4 bits: every trained layer's weight-gradient cosine vs exact >= 0.99, ``layers``
    among them; measured bytes == cost model; each of ``modules`` keeps fewer bytes."""
    net = net.double()
    exact_net, compressed_net = copy.deepcopy(net), copy.deepcopy(net)
    _, exact, exact_by_module, _ = _grads_and_bytes(exact_net, x, None, keep_ratio, seed)
    controller, compressed, by_module, total = _grads_and_bytes(compressed_net, x, 4, keep_ratio,
                                                                seed)
    assert exact.keys() == compressed.keys() and set(layers) <= exact.keys()
    for layer, g in exact.items():
        assert _cosine(g, compressed[layer]) >= 0.99, (layer, _cosine(g, compressed[layer]))
    assert total == controller.saved_bytes(x.shape[0])["total"]
    for name in modules:
        assert 0 < by_module[name] < exact_by_module[name], name
    return controller, compressed_net, by_module


# ------------------------------------------------------------------ nn.MultiheadAttention
@pytest.mark.parametrize("batch_first, padded", [(True, False), (False, True)])
def test_multihead_attention_qkv_and_in_proj_copy_compressed(batch_first, padded):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    controller, net, by_module = _check_against_exact(_Encoder(batch_first, padded=padded), x,
                                                      ["mha", "mha.out_proj"], ["mha"])
    assert (net.mha.backward_bits, net.mha.compact_bits, net.mha.out_proj.compact_bits) == (4, 8, 8)
    assert not controller.profile.other_modules
    report = controller.report(3, by_module)
    assert "qkv 4-bit, scale per head; in_proj compact copy 8-bit" in report


def test_multihead_attention_back_in_exact_mode_is_bit_identical():
    torch.manual_seed(0)
    net = _Encoder().double()
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    exact_net, switched = copy.deepcopy(net), copy.deepcopy(net)
    _, exact, _, _ = _grads_and_bytes(exact_net, x, None, 0.5, 0)
    switched_controller = tt.convert(switched, 0.5, example_input=x, policy="d-fullrandom",
                                     seed=0, backward_bits=4)
    set_backward_bits(switched, None)   # back to exact mode: the exact gradients, bit for bit
    switched.eval()
    switched(x).logsumexp(1).sum().backward()
    for name, g in exact.items():
        assert torch.equal(switched_controller.modules[name].weight.grad, g), name


# ------------------------------------------------------------------ Hugging Face attention
def _qkv(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 9, 10, dtype=torch.float64, generator=gen).requires_grad_(True)
            for _ in range(3)]


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_hf_core_keeps_qkv_codes_and_is_close_to_float64_exact(p):
    q, k, v = _qkv()
    grad = torch.randn(2, 3, 9, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(7)   # the same dropout keep mask for both calls
    with tt.saved_tensor_bytes(None) as saved:
        out = exact_attention(q, k, v, None, 10 ** -0.5, p, 4)
    reference = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    torch.manual_seed(7)
    expected = exact_attention(*reference, None, 10 ** -0.5, p)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)   # the forward is exact
    out.backward(grad)
    expected.backward(grad)
    for got, want in zip((q, k, v), reference):
        assert _cosine(got.grad, want.grad) >= 0.99
    rows = 2 * 3 * 9   # a (minimum, step) per (sample, head, token) of each tensor
    dropout_mask = math.ceil(rows * 9 / 8) if p else 0   # 1 bit per probability
    assert saved.total == 3 * (math.ceil(rows * 10 * 4 / 8) + rows * 2 * 8) + dropout_mask


@pytest.fixture
def tiny_bert():
    require_module("transformers", "pip install -e '.[hf]'")
    from test_hf_models import tiny_bert
    return tiny_bert


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_hf_bert_attention_qkv_compressed(tiny_bert, implementation):
    from test_hf_models import Logits, padding_mask, token_ids
    net = Logits(tiny_bert(implementation=implementation), "input_ids",
                 attention_mask=padding_mask())
    attention = "model.bert.encoder.layer.0.attention.self"
    controller, compressed, by_module = _check_against_exact(
        net, token_ids(), [f"{attention}.query", f"{attention}.value"], [attention])
    assert compressed.get_submodule(attention).backward_bits == 4
    assert "q, k, v 4-bit, scale per head" in controller.report(3, by_module)


# ------------------------------------------------------------------ Conv1d
def test_conv1d_compact_copies_compressed():
    x = torch.randn(3, 5, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    controller, net, by_module = _check_against_exact(_sequence_net(), x, ["0", "2", "4", "6"],
                                                      ["0", "2", "4", "6"], keep_ratio=0.3)
    assert [net[i].compact_bits for i in (0, 2, 4, 6)] == [8] * 4
    assert "compact copy 8-bit, scale per channel" in controller.report(3, by_module)
