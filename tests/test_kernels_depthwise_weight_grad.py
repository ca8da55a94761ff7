"""Masked depthwise conv weight gradients (kernels/depthwise_weight_grad.py) vs. float64 autograd.

The reference is torch autograd in float64 on the upcast inputs: dW of the full
layer, restricted to the selected input channels, exact zeros elsewhere.
Workspaces are poisoned; the dense result must be finite, close to the
reference in the selected slices and exactly zero in the others.
"""

import pytest
import torch

from helpers import DTYPES, conv_case, make_idx

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
