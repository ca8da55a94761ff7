"""MobileNetV3-Small, EfficientNet-B0, ResNet-18: exact when converted, as costed, and the saving."""

import pytest
import torch

from helpers import check_exact_conversion
from trady_triton.accounting import plain_and_converted_bytes
from trady_triton.models.efficientnet_b0 import EfficientNetB0
from trady_triton.models.mobilenetv3 import MobileNetV3Small
from trady_triton.models.resnet import ResNet18

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny shapes; the cores are shared

TINY = {
    "mobilenetv3-small": lambda: MobileNetV3Small(num_classes=5, width_mult=0.25),
    "efficientnet-b0": lambda: EfficientNetB0(num_classes=5, width_mult=0.25, depth_mult=0.34),
    "resnet18": lambda: ResNet18(num_classes=5, width=8),
}


def _randomise_batchnorm(net):
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("seed", [0, 1])
def test_tiny_architectures_are_exact_and_measured_bytes_equal_the_cost_model(name, seed):
    torch.manual_seed(seed)
    net = _randomise_batchnorm(TINY[name]())
    x = torch.randn(2, 3, 37, 41, dtype=torch.float64)
    controller, trady, plain = check_exact_conversion(net, x, keep_ratio=0.05, seed=seed)
    assert not controller.profile.other_modules
    assert 0 < trady < plain


@pytest.mark.parametrize("make, floor", [(MobileNetV3Small, 3.5), (EfficientNetB0, 3.5)])
def test_two_percent_of_full_units_saves_the_target_factor_below_plain_pytorch(make, floor):
    """Full-size nets at 160x160, float32: plain full fine-tuning over TraDy's saved bytes."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 160, 160)
    plain, trady, modelled = plain_and_converted_bytes(make(num_classes=10), x, 0.02)
    assert trady == modelled
    assert plain >= floor * trady
