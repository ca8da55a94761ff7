"""The fused BN -> ReLU/ReLU6 -> mask + compaction kernel and the ReLU/ReLU6 forward with a
1-bit mask (kernels/activation.py) vs. the reference.

Every launch runs with poisoned outputs (NaN / 0xA5) and every element is checked; ReLU and
the clamp are exact in every dtype, so the mask kernel's outputs must match bit for bit.
"""

import pytest
import torch

from trady_triton import reference as ref
from trady_triton.kernels import affine_relu_compact, relu_forward_mask, unpack_mask
from trady_triton.kernels.testing import poisoned, tolerances

from helpers import DTYPES, MASK_SHAPES as SHAPES, ORDERS, make_idx, make_x, rand

# ------------------------------------------------------------- affine_relu_compact
def _check_fused(x, scale, shift, upper, idx):
    with poisoned():
        y, packed, xc = affine_relu_compact(x, scale, shift, upper, idx)
    out_dtype = torch.promote_types(x.dtype, torch.promote_types(scale.dtype, shift.dtype))
    pre = x.double() * scale.double()[None, :, None, None] + shift.double()[None, :, None, None]
    y64, packed64 = ref.relu_forward_mask(pre, upper)
    tol = tolerances(out_dtype)
    # y: close to the float64 activation, same layout as x
    assert y.dtype == out_dtype and y.shape == x.shape
    if x.is_contiguous(memory_format=torch.channels_last):
        assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), y64, **tol)
    # mask: exact, except where the float64 pre-activation sits on a kink within rounding
    assert packed.dtype == torch.uint8 and packed.shape == packed64.shape
    got = unpack_mask(packed, x.numel()).cpu()
    want = ref.unpack_mask(packed64, x.numel()).cpu()
    p = pre.reshape(-1).cpu()
    near = p.abs() <= 1e-5 * (1 + p.abs())
    if upper is not None:
        near |= (p - upper).abs() <= 1e-5 * (1 + abs(upper))
    assert torch.equal(got[~near], want[~near])
    # padding bits of the last byte are zero
    assert torch.equal(ref.unpack_mask(packed, 8 * packed.numel())[x.numel():].cpu(),
                       torch.zeros(8 * packed.numel() - x.numel(), dtype=torch.bool))
    # compact copy: exactly the selected channels of y, contiguous
    assert xc.is_contiguous() and xc.dtype == out_dtype
    assert torch.equal(xc, y.index_select(1, idx.long()).contiguous())


@pytest.mark.parametrize("shape,layout", [((2, 19, 7, 9), "nchw"), ((2, 19, 8, 8), "nchw"),
                                          ((2, 19, 8, 8), "channels_last"),
                                          ((2, 19, 7, 9), "channels_last"),
                                          ((2, 70, 4, 6), "channels_last"),
                                          ((3, 5, 1, 3), "nchw"), ((3, 5, 1, 3), "channels_last"),
                                          ((2, 6, 2, 2), "nchw"),
                                          # H*W % 8 == 0: the rows kernel (several rows
                                          # per tile; a row over two tiles)
                                          ((3, 7, 4, 6), "nchw"), ((1, 3, 72, 64), "nchw")])
@pytest.mark.parametrize("upper", [None, 6.0])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_relu_compact(shape, layout, upper, order, dtype, device):
    x = rand(shape, dtype, device, layout, scale=4.0)
    scale = rand((shape[1],), dtype, device, seed=1)
    shift = rand((shape[1],), dtype, device, seed=2)
    _check_fused(x, scale, shift, upper, make_idx(order, shape[1], device))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_affine_relu_compact_int64_index_path(layout, device, monkeypatch):
    """The flat kernel's int64 arithmetic (tensors past 2**31 elements) on a small tensor."""
    from trady_triton.kernels import activation
    monkeypatch.setattr(activation, "FORCE_INT64_INDEX", True)
    x = rand((2, 19, 7, 9), torch.float32, device, layout, scale=4.0)
    scale = rand((19,), torch.float32, device, seed=1)
    shift = rand((19,), torch.float32, device, seed=2)
    _check_fused(x, scale, shift, 6.0, make_idx("shuffled", 19, device))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_affine_relu_compact_promotes_and_edge_values(layout, device):
    # float16 activations with float32 BN buffers give float32 outputs, as in torch
    x = rand((2, 19, 7, 9), torch.float16, device, layout, scale=4.0)
    x[0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, 0.0], dtype=x.dtype)
    scale = rand((19,), torch.float32, device, seed=1)
    scale[0] = 1.0
    shift = rand((19,), torch.float32, device, seed=2)
    shift[0] = 0.0
    idx = make_idx("shuffled", 19, device)
    idx[0] = 0
    with poisoned():
        y, packed, xc = affine_relu_compact(x, scale, shift, 6.0, idx)
    ry, rpacked, rxc = ref.affine_relu_compact(x, scale, shift, 6.0, idx)
    assert y.dtype == torch.float32 == ry.dtype
    torch.testing.assert_close(y, ry, equal_nan=True)
    assert torch.equal(packed, rpacked)
    torch.testing.assert_close(xc, rxc, equal_nan=True)
    _check_fused(x.nan_to_num(0.0, 0.0, 0.0), scale, shift, None, idx)


def test_affine_relu_compact_empty_idx(device):
    x = rand((2, 19, 7, 9), torch.float32, device)
    s = torch.ones(19, device=device)
    y, packed, xc = affine_relu_compact(x, s, s, None, torch.zeros(0, dtype=torch.int64,
                                                                   device=device))
    assert xc.shape == (2, 0, 7, 9)
    torch.testing.assert_close(y, torch.relu(x + 1))


@pytest.mark.parametrize("shape,layout", SHAPES)
@pytest.mark.parametrize("upper", [None, 6.0, 0.75])
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_forward_mask(shape, layout, upper, dtype, device):
    x = make_x(shape, layout, dtype, device)
    with poisoned():
        y, packed = relu_forward_mask(x, upper)
    ry, rpacked = ref.relu_forward_mask(x, upper)
    assert y.dtype == dtype and y.shape == x.shape
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ry, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(packed, rpacked)
