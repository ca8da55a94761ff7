"""Masked conv weight gradients (kernels/conv_weight_grad.py: groups=1, pointwise, general groups) vs. float64 autograd.

The reference is torch autograd in float64 on the upcast inputs: dW of the full
layer, restricted to the selected input channels, exact zeros elsewhere.
Workspaces are poisoned; the dense result must be finite, close to the
reference in the selected slices and exactly zero in the others.
"""

import pytest
import torch
import torch.nn.functional as F

from trady_triton import reference as ref
from trady_triton.kernels import conv2d_weight_grad_masked

from helpers import DTYPES, conv_case, conv_weight_grad64, make_idx, rand

@pytest.mark.parametrize("groups,O", [(1, 6), (5, 10), (2, 4)])
def test_oracle_matches_autograd(groups, O, device):
    x = rand((2, 10, 7, 6), torch.float64, device, seed=0)
    w = torch.zeros((O, 10 // groups, 3, 2), dtype=torch.float64, device=device,
                    requires_grad=True)
    y = F.conv2d(x, w, None, (2, 1), (1, 2), (2, 1), groups)
    dy = rand(tuple(y.shape), torch.float64, device, seed=1)
    y.backward(dy)
    got = conv_weight_grad64(x, dy, tuple(w.shape), (2, 1), (1, 2), (2, 1), groups)
    torch.testing.assert_close(got, w.grad, rtol=1e-12, atol=1e-12)


# (kernel, stride, padding, dilation): the last two go to the GEMM / conv kernels as 1x1
CONV_CASES = [
    ((3, 3), (1, 1), (1, 1), (1, 1)),
    ((3, 3), (2, 2), (1, 1), (1, 1)),
    ((5, 3), (2, 1), (2, 0), (1, 2)),
    ((2, 2), (1, 1), (0, 0), (1, 1)),
    ((3, 3), (1, 1), (0, 0), (2, 2)),
    ((1, 1), (1, 1), (0, 0), (1, 1)),
    ((1, 1), (2, 2), (0, 0), (1, 1)),
    ((1, 1), (1, 1), (1, 1), (1, 1)),
]


@pytest.fixture(params=[True, False], ids=["taps-in-columns", "tap-per-program"])
def taps_layout(request, monkeypatch):
    """Both layouts of the conv kernel's taps (the autotuner picks one on a GPU)."""
    from trady_triton.kernels import conv_weight_grad
    monkeypatch.setattr(conv_weight_grad, "TAPS_IN_N", request.param)
    return request.param


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "k{}s{}p{}d{}".format(*c))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_groups1(case, layout, dtype, device, taps_layout):
    kernel, stride, padding, dilation = case
    idx = make_idx("shuffled", 19, device)
    conv_case(2, 19, 9, 11, 37, kernel, stride, padding, dilation, 1, dtype, device, idx,
              layout, layout)


@pytest.mark.parametrize("order", ["first", "last", "reversed", "all", "repeated"])
@pytest.mark.parametrize("kernel", [(3, 3), (1, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_groups1_index_orders(order, kernel, dtype, device):
    idx = make_idx(order, 19, device, dtype=torch.int64)
    pad = (kernel[0] // 2, kernel[1] // 2)
    conv_case(2, 19, 7, 7, 21, kernel, (1, 1), pad, (1, 1), 1, dtype, device, idx)


@pytest.mark.parametrize("split_k", [1, 2, 5])
@pytest.mark.parametrize("kernel", [(3, 3), (1, 1)])
def test_conv_split_k(split_k, kernel, device, taps_layout):
    # odd split boundaries (198 rows in 2 or 5 parts), mixed layouts of x and dY
    idx = make_idx("shuffled", 19, device)
    pad = (kernel[0] // 2, kernel[1] // 2)
    for dtype in (torch.float32, torch.bfloat16):
        conv_case(2, 19, 9, 11, 37, kernel, (1, 1), pad, (1, 1), 1, dtype, device, idx,
                  "channels_last", "nchw", split_k=split_k)
        conv_case(2, 19, 9, 11, 37, kernel, (1, 1), pad, (1, 1), 1, dtype, device, idx,
                  "nchw", "channels_last", split_k=split_k)


def test_conv_larger_reduction(device):
    # a reduction long enough for the automatic split and several L blocks per split
    idx = make_idx("shuffled", 24, device)
    conv_case(4, 24, 20, 20, 40, (3, 3), (1, 1), (1, 1), (1, 1), 1, torch.float16, device, idx)


@pytest.mark.parametrize("groups", [2, 4])
def test_general_groups_fall_back_to_reference(groups, device):
    idx = make_idx("shuffled", 20, device)
    got = conv_case(2, 20, 7, 7, 12, (3, 3), (1, 1), (1, 1), (1, 1), groups, torch.float32,
                    device, idx)
    x = rand((2, 20, 7, 7), torch.float32, device, seed=0)
    dy = rand((2, 12, 7, 7), torch.float32, device, seed=1)
    expected = ref.conv2d_weight_grad_masked(x[:, idx.long()], dy, idx, tuple(got.shape),
                                             (1, 1), (1, 1), (1, 1), groups)
    torch.testing.assert_close(got, expected)


def test_conv_empty_idx_and_batch(device):
    idx = torch.zeros(0, dtype=torch.int32, device=device)
    x = rand((2, 0, 7, 7), torch.float32, device, seed=0)
    dy = rand((2, 5, 7, 7), torch.float32, device, seed=1)
    got = conv2d_weight_grad_masked(x, dy, idx, (5, 8, 3, 3), 1, 1, 1, 1)
    assert got.shape == (5, 8, 3, 3) and (got == 0).all()
    idx = make_idx("all", 8, device)
    got = conv2d_weight_grad_masked(rand((0, 8, 7, 7), torch.float32, device, seed=0),
                                    rand((0, 5, 7, 7), torch.float32, device, seed=1), idx,
                                    (5, 8, 3, 3), 1, 1, 1, 1)
    assert (got == 0).all()


@pytest.mark.parametrize("kernel,groups,O", [((3, 3), 1, 7), ((1, 1), 1, 7), ((3, 3), 5, 10)])
def test_wide_rows(kernel, groups, O, device):
    # rows wider than the longest run (BI = 32): several column blocks per row
    idx = make_idx("reversed", 5, device)
    pad = (kernel[0] // 2, kernel[1] // 2)
    for split_k in (None, 2):
        conv_case(2, 5, 3, 70, O, kernel, (1, 1), pad, (1, 1), groups, torch.float32, device,
                  idx, split_k=split_k)
