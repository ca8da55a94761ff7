"""compact_channels (kernels/compaction.py) vs. the reference.

Every launch runs with poisoned outputs (NaN / 0xA5) and every element is checked.
"""

import pytest
import torch

from trady_triton import reference as ref
from trady_triton.kernels import compact_channels
from trady_triton.kernels.testing import poisoned

from helpers import DTYPES, ORDERS, make_idx, rand

# ---------------------------------------------------------------- compact_channels
@pytest.mark.parametrize("shape", [(2, 19, 7, 9), (1, 21, 24, 40), (3, 19, 1, 1), (2, 5, 2, 3)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_conv_input(shape, layout, order, dtype, device):
    x = rand(shape, dtype, device, layout)
    idx = make_idx(order, shape[1], device)
    with poisoned():
        out = compact_channels(x, idx, 1)
    expected = ref.compact_channels(x, idx, 1)
    assert out.shape == expected.shape and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, expected)          # a copy: bit-exact, no NaN left


@pytest.mark.parametrize("shape,dim", [((13, 19), -1), ((2, 7, 19), -1), ((2, 7, 19), 2),
                                       ((3, 19, 5), 1), ((19,), 0), ((4, 19, 3, 2, 5), 1)])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_nd(shape, dim, order, dtype, device):
    x = rand(shape, dtype, device)
    idx = make_idx(order, shape[dim], device, dtype=torch.int64)
    with poisoned():
        out = compact_channels(x, idx, dim)
    assert torch.equal(out, ref.compact_channels(x, idx, dim))


@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_strided_inputs(dtype, device):
    base = rand((2, 23, 11, 18), dtype, device)
    idx = make_idx("shuffled", 23, device)
    cases = [
        base[:, :, :, ::2],                     # H, W not mergeable: falls back to a copy
        base[:, :, 1:8],                        # sliced rows: mergeable with gaps
        base.transpose(2, 3),                   # permuted spatial dims
        base.transpose(0, 1).contiguous().transpose(0, 1),   # C outermost in memory
    ]
    for x in cases:
        with poisoned():
            out = compact_channels(x, idx, 1)
        assert torch.equal(out, ref.compact_channels(x, idx, 1))
    xl = rand((19, 13), dtype, device).t()      # Linear input stored column-major
    idx = make_idx("reversed", 19, device)
    with poisoned():
        assert torch.equal(compact_channels(xl, idx, -1), ref.compact_channels(xl, idx, -1))


def test_compact_empty(device):
    x = rand((2, 19, 7, 9), torch.float32, device)
    out = compact_channels(x, torch.zeros(0, dtype=torch.int32, device=device), 1)
    assert out.shape == (2, 0, 7, 9)
    out = compact_channels(x[:0], make_idx("all", 19, device), 1)
    assert out.shape == (0, 19, 7, 9)
