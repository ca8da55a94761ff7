"""Masked Linear weight gradients (kernels/gemm_weight_grad.py) vs. float64 autograd.

The reference is torch autograd in float64 on the upcast inputs: dW of the full
layer, restricted to the selected input channels, exact zeros elsewhere.
Workspaces are poisoned; the dense result must be finite, close to the
reference in the selected slices and exactly zero in the others.
"""

import pytest
import torch
import torch.nn.functional as F

from trady_triton import reference as ref
from trady_triton.kernels import linear_weight_grad_masked
from trady_triton.kernels.testing import poisoned, tolerances

from helpers import DTYPES, make_idx, rand

# -------------------------------------------------------------------------- Linear
@pytest.mark.parametrize("lead", [(13,), (2, 7), (1,)])
@pytest.mark.parametrize("order", ["first", "last", "reversed", "shuffled", "all", "repeated"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear(lead, order, dtype, device):
    F_in, F_out = 19, 37
    idx = make_idx(order, F_in, device)
    x = rand((*lead, F_in), dtype, device, seed=0)
    dy = rand((*lead, F_out), dtype, device, seed=1)
    w64 = torch.zeros(F_out, F_in, dtype=torch.float64, device=device, requires_grad=True)
    F.linear(x.double(), w64).backward(dy.double())
    with poisoned():
        got = linear_weight_grad_masked(x[..., idx.long()], dy, idx, F_in)
    assert got.shape == (F_out, F_in) and got.dtype == dtype
    sel = torch.zeros(F_in, dtype=torch.bool, device=device)
    sel[idx.long()] = True
    assert torch.isfinite(got).all() and (got[:, ~sel] == 0).all()
    rows = x.numel() // F_in
    torch.testing.assert_close(got.double()[:, sel], w64.grad[:, sel], **tolerances(dtype, rows))


@pytest.mark.parametrize("split_k", [1, 2, 7])
def test_linear_split_k_and_strides(split_k, device):
    idx = make_idx("shuffled", 40, device)
    x = rand((45, 40), torch.float32, device, seed=0)
    dy = rand((37, 45), torch.float32, device, seed=1).t()          # column-major grad_output
    with poisoned():
        got = linear_weight_grad_masked(x[:, idx.long()], dy, idx, 40, split_k=split_k)
    expected = ref.linear_weight_grad_masked(x[:, idx.long()], dy, idx, 40)
    torch.testing.assert_close(got, expected, **tolerances(torch.float32, 45))
    assert torch.equal(got == 0, expected == 0)
