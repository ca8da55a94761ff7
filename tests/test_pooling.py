"""pooling.py: max pooling keeps window codes in a few bits, average pooling nothing."""

import math

import pytest
import torch
import torch.nn as nn

from trady_triton.convert import swap_modules
from helpers import swapped_and_plain
from trady_triton.pooling import code_bits, pack_codes, unpack_codes

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny shapes; the cores are shared

MAX_POOLS = [
    (dict(kernel_size=3, stride=2, padding=1), 4),
    (dict(kernel_size=2), 2),
    (dict(kernel_size=(3, 2), stride=(1, 2), dilation=(2, 1), ceil_mode=True), 4),
    (dict(kernel_size=5, stride=3, padding=2, ceil_mode=True), 8),
    (dict(kernel_size=(1, 2), stride=1), 1),
]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_codes_round_trip_through_packing(bits):
    codes = torch.randint(0, 2 ** bits, (3 * 8 + 5,))
    packed = pack_codes(codes, bits)
    assert packed.numel() == math.ceil(codes.numel() * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, codes.numel()), codes)


def test_code_bits_are_the_fewest_that_pack_evenly():
    assert [code_bits(n) for n in (2, 4, 5, 9, 16, 17, 256, 257)] == [1, 2, 4, 4, 4, 8, 8, None]


@pytest.mark.parametrize("config, bits", MAX_POOLS)
@pytest.mark.parametrize("shape", [(2, 3, 11, 9), (3, 8, 7)])
def test_max_pool_gradient_equals_pytorch_and_keeps_window_codes(config, bits, shape):
    torch.manual_seed(5)
    x0 = torch.randn(shape, dtype=torch.float64)
    grad, grad_ref, saved, y, model = swapped_and_plain(nn.MaxPool2d(**config), x0)
    assert model[0].code_bits == bits
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0)
    assert saved == math.ceil(y.numel() * bits / 8)


def test_max_pool_with_indices_or_huge_windows_is_not_converted():
    model = nn.Sequential(nn.MaxPool2d(2, return_indices=True), nn.MaxPool2d(17))
    swap_modules(model)
    assert [type(m) for m in model] == [nn.MaxPool2d, nn.MaxPool2d]


@pytest.mark.parametrize("config", [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=1, count_include_pad=False, ceil_mode=True),
    dict(kernel_size=(2, 3), divisor_override=5),
])
@pytest.mark.parametrize("shape", [(2, 3, 11, 9), (3, 8, 7)])
def test_avg_pool_gradient_equals_pytorch_and_keeps_nothing(config, shape):
    torch.manual_seed(6)
    x0 = torch.randn(shape, dtype=torch.float64)
    grad, grad_ref, saved, _, _ = swapped_and_plain(nn.AvgPool2d(**config), x0)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0)
    assert saved == 0
