"""1-bit masks (kernels/masks.py): pack / unpack and the ReLU / ReLU6 backward vs. the reference.

ReLU and the clamp are exact in every dtype, so outputs must match bit for bit.
"""

import pytest
import torch

from trady_triton import reference as ref
from trady_triton.kernels import pack_mask, relu_backward_mask, unpack_mask
from trady_triton.kernels.testing import poisoned

from helpers import DTYPES, MASK_SHAPES as SHAPES, make_x

@pytest.mark.parametrize("numel", [1, 7, 8, 9, 100, 4096, 4097, 10001])
def test_pack_unpack(numel, device):
    g = torch.Generator().manual_seed(numel)
    passes = (torch.rand(numel, generator=g) > 0.5).to(device)
    with poisoned():
        packed = pack_mask(passes)
        unpacked = unpack_mask(packed, numel)
    assert packed.dtype == torch.uint8 and packed.shape == ((numel + 7) // 8,)
    assert torch.equal(packed, ref.pack_mask(passes))
    assert unpacked.dtype == torch.bool and torch.equal(unpacked, passes)
    # a longer buffer is accepted, as by the reference
    longer = torch.cat([packed, torch.full((3,), 255, dtype=torch.uint8, device=device)])
    with poisoned():
        assert torch.equal(unpack_mask(longer, numel), ref.unpack_mask(longer, numel))


def test_pack_shapes_and_views(device):
    g = torch.Generator().manual_seed(0)
    passes = (torch.rand(3, 5, 7, generator=g) > 0.3).to(device)
    for p in (passes, passes.transpose(0, 2), passes[:, ::2]):
        with poisoned():
            assert torch.equal(pack_mask(p), ref.pack_mask(p))
    empty = torch.zeros(0, dtype=torch.bool, device=device)
    assert pack_mask(empty).numel() == 0 and unpack_mask(pack_mask(empty), 0).numel() == 0


@pytest.mark.parametrize("shape,layout", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_backward_mask(shape, layout, dtype, device):
    x = make_x(shape, layout, dtype, device, seed=1)
    _, packed = ref.relu_forward_mask(x, 6.0)
    g = make_x(shape, layout, dtype, device, seed=2)     # NaN/inf gradients behind closed gates
    with poisoned():
        out = relu_backward_mask(g, packed)
    expected = ref.relu_backward_mask(g, packed)
    assert out.dtype == dtype and out.shape == g.shape
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    # and against autograd of the real activation
    # (NaN inputs left out: torch's scalar tail loop and its vector loop disagree there)
    xr = x.detach().clone().requires_grad_(True)
    torch.nn.functional.hardtanh(xr, 0.0, 6.0).backward(g)
    ok = ~torch.isnan(x)
    torch.testing.assert_close(out[ok], xr.grad[ok], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_roundtrip_random_masks(dtype, device):
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(4, 3, 5, 7, generator=g).to(dtype).to(device)
    passes = (torch.rand(grad.shape, generator=g) > 0.5).to(device)
    packed = ref.pack_mask(passes)
    with poisoned():
        out = relu_backward_mask(grad, packed)
    assert torch.equal(out, torch.where(passes, grad, torch.zeros_like(grad)))
