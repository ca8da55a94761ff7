"""ExactAttention (the core of the HF adapters): float64 gradients of plain autograd, and
it keeps q, k, v plus, with dropout, a 1-bit keep mask. No transformers needed."""

import math

import pytest
import torch
import torch.nn.functional as F

import trady_triton as tt
from trady_triton.hf_attention import exact_attention

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (3, 5, 7, 8)   # batch, heads, tokens, head size


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, dtype=torch.float64, generator=g).requires_grad_(True)
            for _ in range(3)]


def masks():
    allowed = torch.ones(3, 1, 7, 7, dtype=torch.bool)
    allowed[1, ..., -3:] = False                  # padded keys, as HF's sdpa mask
    additive = torch.zeros(3, 1, 7, 7, dtype=torch.float64)
    additive[~allowed] = torch.finfo(torch.float64).min   # as HF's eager mask
    return {"none": None, "bool": allowed, "additive": additive}


def reference(q, k, v, mask, scaling, keep, p):
    """HF's eager attention on float64: softmax, dropout with the given mask, times v."""
    scores = q @ k.transpose(-2, -1) * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool \
            else scores + mask
    probs = F.softmax(scores, dim=-1)
    if keep is not None:
        probs = probs * keep / (1.0 - p)
    return probs @ v


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradients_equal_plain_autograd_and_bytes_are_qkv_plus_mask(mask_kind, p):
    mask, scaling = masks()[mask_kind], 8 ** -0.5
    q, k, v = qkv()
    torch.manual_seed(3)
    with tt.saved_tensor_bytes() as saved:
        out = exact_attention(q, k, v, mask, scaling, p)
    torch.manual_seed(3)   # the keep mask is drawn as F.dropout draws it
    keep = None if p == 0.0 else torch.empty(3, 5, 7, 7, dtype=torch.bool).bernoulli_(1 - p)
    a, b, c = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    want = reference(a, b, c, mask, scaling, keep, p)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    grad = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(4))
    out.backward(grad)
    want.backward(grad)
    for got, expected in ((q, a), (k, b), (v, c)):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-10, atol=1e-12)
    mask_bytes = 0 if p == 0.0 else math.ceil(3 * 5 * 7 * 7 / 8)
    assert saved.total == 3 * q.numel() * 8 + mask_bytes


def test_nothing_kept_without_gradients():
    q, k, v = (t.detach() for t in qkv())
    with tt.saved_tensor_bytes() as saved:
        out = exact_attention(q, k, v, None, 0.3, 0.0)
    assert saved.total == 0
    torch.testing.assert_close(out, reference(q, k, v, None, 0.3, None, 0.0), rtol=1e-10,
                               atol=1e-12)


def test_double_backward_is_refused():
    q, k, v = qkv()
    out = exact_attention(q, k, v, None, 0.3, 0.0)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
