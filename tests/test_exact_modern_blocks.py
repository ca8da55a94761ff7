"""Converted nets with SiLU / Hardswish / GELU / SE / pooling / Dropout: exact and as costed."""

import pytest
import torch
import torch.nn as nn

from helpers import check_exact_conversion
from trady_triton.models.blocks import SqueezeExcitation

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny shapes; the cores are shared


def _se_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 10, 3, padding=1), nn.BatchNorm2d(10), nn.Hardswish(),
        nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(10, 14, 1), nn.BatchNorm2d(14), nn.SiLU(),
        nn.Conv2d(14, 14, 3, padding=1, groups=14), nn.BatchNorm2d(14), nn.SiLU(),
        SqueezeExcitation(14, 5, nn.SiLU, nn.Sigmoid),
        nn.Conv2d(14, 9, 1), nn.BatchNorm2d(9), nn.GELU(), nn.AvgPool2d(2, ceil_mode=True),
        nn.Conv2d(9, 7, 1), nn.ReLU(), SqueezeExcitation(7, 3), nn.Tanh(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(7, 4))


def test_modern_blocks_are_exact_and_measured_bytes_equal_the_cost_model():
    x = torch.randn(3, 3, 13, 11, dtype=torch.float64)
    for seed in range(4):
        controller, trady, plain = check_exact_conversion(_se_net(), x, keep_ratio=0.1, seed=seed)
        assert not controller.profile.other_modules
        assert 0 < trady < plain


def test_revert_gives_back_the_plain_modules_with_the_same_state_dict():
    import trady_triton as tt
    net = _se_net()
    plain_types = [type(m) for m in net.modules()]
    keys = list(net.state_dict())
    controller = tt.convert(net, 0.1, example_input=torch.randn(1, 3, 13, 11))
    assert type(net[10]).__name__ == "TraDySqueezeExcitation"
    tt.revert(controller)
    assert [type(m) for m in net.modules()] == plain_types
    assert list(net.state_dict()) == keys
    assert not hasattr(net[3], "code_bits")
