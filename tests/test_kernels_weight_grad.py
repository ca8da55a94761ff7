"""Masked weight gradients (conv groups=1, pointwise, depthwise, Linear) vs. float64 autograd.

The reference is torch autograd in float64 on the upcast inputs: dW of the full
layer, restricted to the selected input channels, exact zeros elsewhere.
Workspaces are poisoned; the dense result must be finite, close to the
reference in the selected slices and exactly zero in the others.
"""

import pytest
import torch
import torch.nn.functional as F

from trady_triton import reference as ref
from trady_triton.kernels import conv2d_weight_grad_masked, linear_weight_grad_masked
from trady_triton.kernels.testing import poisoned, tolerances

from helpers import make_idx

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rand(shape, dtype, device, seed, layout="nchw"):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t.to(device)


def conv_weight_grad64(x, dy, weight_shape, stride, padding, dilation, groups):
    """Full float64 dW of a conv via unfold + einsum (fast on CPU, unlike float64
    dilated/grouped autograd); checked against autograd in test_oracle_matches_autograd."""
    O, ipg, KH, KW = weight_shape
    N, C = x.shape[:2]
    cols = F.unfold(x.double(), (KH, KW), dilation, padding, stride)      # [N, C*T, P*Q]
    cols = cols.reshape(N, groups, ipg * KH * KW, -1)
    d = dy.double().reshape(N, groups, O // groups, -1)
    w = torch.einsum("ngol,ngil->goi", d, cols)
    return w.reshape(weight_shape)


def conv_case(N, C, H, W, O, kernel, stride, padding, dilation, groups, dtype, device,
              idx, x_layout="nchw", dy_layout="nchw", split_k=None):
    x = _rand((N, C, H, W), dtype, device, 0, x_layout)
    weight_shape = (O, C // groups, *kernel)
    P = (H + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    Q = (W + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    dy = _rand((N, O, P, Q), dtype, device, 1, dy_layout)
    # float64 reference on the upcast inputs
    full = conv_weight_grad64(x, dy, weight_shape, stride, padding, dilation, groups)
    # what the layer's forward saves: x[:, idx] (kept in x's layout when channels_last)
    x_compact = x.index_select(1, idx.long())
    if x_layout == "channels_last":
        x_compact = x_compact.contiguous(memory_format=torch.channels_last)
    with poisoned():
        got = conv2d_weight_grad_masked(x_compact, dy, idx, weight_shape, stride, padding,
                                        dilation, groups, split_k=split_k)
    assert got.shape == weight_shape and got.dtype == dtype and got.device == dy.device
    # selected slices: input channel c of group g -> dW[g*opg:(g+1)*opg, c % ipg]
    ipg, opg = C // groups, O // groups
    selected = torch.zeros(weight_shape, dtype=torch.bool, device=device)
    for c in set(idx.tolist()):
        g = c // ipg
        selected[g * opg:(g + 1) * opg, c % ipg] = True
    assert torch.isfinite(got).all()
    assert (got[~selected] == 0).all()
    L = N * P * Q
    torch.testing.assert_close(got.double()[selected], full[selected], **tolerances(dtype, L))
    return got


@pytest.mark.parametrize("groups,O", [(1, 6), (5, 10), (2, 4)])
def test_oracle_matches_autograd(groups, O, device):
    x = _rand((2, 10, 7, 6), torch.float64, device, 0)
    w = torch.zeros((O, 10 // groups, 3, 2), dtype=torch.float64, device=device,
                    requires_grad=True)
    y = F.conv2d(x, w, None, (2, 1), (1, 2), (2, 1), groups)
    dy = _rand(tuple(y.shape), torch.float64, device, 1)
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


DW_CASES = [
    ((3, 3), (1, 1), (1, 1), (1, 1)),
    ((3, 3), (2, 2), (1, 1), (1, 1)),
    ((5, 5), (1, 1), (2, 2), (1, 1)),
    ((3, 3), (1, 1), (2, 2), (2, 2)),
    ((3, 1), (2, 1), (0, 0), (1, 1)),
]


@pytest.mark.parametrize("case", DW_CASES, ids=lambda c: "k{}s{}p{}d{}".format(*c))
@pytest.mark.parametrize("mult", [1, 2])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_depthwise(case, mult, layout, dtype, device):
    kernel, stride, padding, dilation = case
    idx = make_idx("shuffled", 19, device)
    conv_case(2, 19, 9, 11, 19 * mult, kernel, stride, padding, dilation, 19, dtype, device,
              idx, layout, layout)


@pytest.mark.parametrize("order", ["first", "last", "reversed", "all", "repeated"])
@pytest.mark.parametrize("split_k", [None, 1, 3])
def test_depthwise_orders_and_splits(order, split_k, device):
    idx = make_idx(order, 21, device)
    conv_case(2, 21, 7, 7, 42, (3, 3), (1, 1), (1, 1), (1, 1), 21, torch.float32, device,
              idx, split_k=split_k)


@pytest.mark.parametrize("groups", [2, 4])
def test_general_groups_fall_back_to_reference(groups, device):
    idx = make_idx("shuffled", 20, device)
    got = conv_case(2, 20, 7, 7, 12, (3, 3), (1, 1), (1, 1), (1, 1), groups, torch.float32,
                    device, idx)
    x = _rand((2, 20, 7, 7), torch.float32, device, 0)
    dy = _rand((2, 12, 7, 7), torch.float32, device, 1)
    expected = ref.conv2d_weight_grad_masked(x[:, idx.long()], dy, idx, tuple(got.shape),
                                             (1, 1), (1, 1), (1, 1), groups)
    torch.testing.assert_close(got, expected)


def test_conv_empty_idx_and_batch(device):
    idx = torch.zeros(0, dtype=torch.int32, device=device)
    x = _rand((2, 0, 7, 7), torch.float32, device, 0)
    dy = _rand((2, 5, 7, 7), torch.float32, device, 1)
    got = conv2d_weight_grad_masked(x, dy, idx, (5, 8, 3, 3), 1, 1, 1, 1)
    assert got.shape == (5, 8, 3, 3) and (got == 0).all()
    idx = make_idx("all", 8, device)
    got = conv2d_weight_grad_masked(_rand((0, 8, 7, 7), torch.float32, device, 0),
                                    _rand((0, 5, 7, 7), torch.float32, device, 1), idx,
                                    (5, 8, 3, 3), 1, 1, 1, 1)
    assert (got == 0).all()


# -------------------------------------------------------------------------- Linear
@pytest.mark.parametrize("lead", [(13,), (2, 7), (1,)])
@pytest.mark.parametrize("order", ["first", "last", "reversed", "shuffled", "all", "repeated"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear(lead, order, dtype, device):
    F_in, F_out = 19, 37
    idx = make_idx(order, F_in, device)
    x = _rand((*lead, F_in), dtype, device, 0)
    dy = _rand((*lead, F_out), dtype, device, 1)
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
    x = _rand((45, 40), torch.float32, device, 0)
    dy = _rand((37, 45), torch.float32, device, 1).t()          # column-major grad_output
    with poisoned():
        got = linear_weight_grad_masked(x[:, idx.long()], dy, idx, 40, split_k=split_k)
    expected = ref.linear_weight_grad_masked(x[:, idx.long()], dy, idx, 40)
    torch.testing.assert_close(got, expected, **tolerances(torch.float32, 45))
    assert torch.equal(got == 0, expected == 0)


@pytest.mark.parametrize("kernel,groups,O", [((3, 3), 1, 7), ((1, 1), 1, 7), ((3, 3), 5, 10)])
def test_wide_rows(kernel, groups, O, device):
    # rows wider than the longest run (BI = 32): several column blocks per row
    idx = make_idx("reversed", 5, device)
    pad = (kernel[0] // 2, kernel[1] // 2)
    for split_k in (None, 2):
        conv_case(2, 5, 3, 70, O, kernel, (1, 1), pad, (1, 1), groups, torch.float32, device,
                  idx, split_k=split_k)
