"""Double backward through any TraDy autograd Function raises a clear error naming the layer.

Their backward passes compute first-order gradients from compact copies and 1-bit masks, so
gradgradcheck used to fail with a Jacobian mismatch (silently wrong second derivatives).
"""

import importlib
import pkgutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Function

import trady_triton as tt
from trady_triton import autograd as fn

pytestmark = pytest.mark.filterwarnings("ignore:no layer ranking")

SECOND_ORDER = "second-order gradients are not supported"


def _r(*shape, grad=True):
    return torch.randn(*shape, dtype=torch.float64).requires_grad_(grad)


def _scale_shift(channels):
    return torch.rand(channels, dtype=torch.float64) + 0.5, torch.randn(channels, dtype=torch.float64)


def _conv_case(train_weight):
    x, w, b = _r(2, 4, 7, 6), _r(5, 4, 3, 3, grad=train_weight), _r(5)
    conv = ((1, 2), (1, 0), (1, 1), 1)
    if train_weight:
        args = (x, w, b, torch.arange(4), *conv, None)
        return fn.SelectedConv2d, args, (x, w, b), lambda: F.conv2d(x, w, b, *conv)
    return fn.FrozenConv2d, (x, w, b, *conv), (x, b), lambda: F.conv2d(x, w, b, *conv)


def _linear_case(train_weight):
    x, w, b = _r(3, 5, 6), _r(4, 6, grad=train_weight), _r(4)
    if train_weight:
        return fn.SelectedLinear, (x, w, b, torch.arange(6), None), (x, w, b), lambda: F.linear(x, w, b)
    return fn.FrozenLinear, (x, w, b), (x, b), lambda: F.linear(x, w, b)


def _affine_case():
    x = _r(2, 3, 4, 5)
    scale, shift = _scale_shift(3)
    reference = lambda: x * scale[:, None, None] + shift[:, None, None]   # noqa: E731
    return fn.FrozenAffine, (x, scale, shift), (x,), reference


def _clamp_case():
    x = _r(2, 3, 4, 5) * 4
    x = x.detach().requires_grad_()
    return fn.MaskedClamp, (x, 6.0, False), (x,), lambda: x.clamp(0, 6)


def _fused_case():
    x = _r(2, 3, 4, 5)
    scale, shift = _scale_shift(3)
    reference = lambda: torch.relu(x * scale[:, None, None] + shift[:, None, None])   # noqa: E731
    return fn.FusedAffineClamp, (x, scale, shift, None, torch.tensor([2, 0])), (x,), reference


CASES = {
    "SelectedConv2d": lambda: _conv_case(True), "FrozenConv2d": lambda: _conv_case(False),
    "SelectedLinear": lambda: _linear_case(True), "FrozenLinear": lambda: _linear_case(False),
    "FrozenAffine": _affine_case, "MaskedClamp": _clamp_case, "FusedAffineClamp": _fused_case,
}
LAYER = {"SelectedConv2d": "TraDyConv2d", "FrozenConv2d": "TraDyConv2d",
         "SelectedLinear": "TraDyLinear", "FrozenLinear": "TraDyLinear",
         "FrozenAffine": "TraDyBatchNorm2d", "MaskedClamp": "TraDyReLU",
         "FusedAffineClamp": "TraDyBatchNorm2d"}


def _first_output(outputs):
    return outputs[0] if isinstance(outputs, tuple) else outputs


@pytest.mark.parametrize("name", list(CASES))
def test_double_backward_through_each_function_raises_naming_the_layer(name):
    function, args, inputs, _ = CASES[name]()
    y = _first_output(function.apply(*args))
    weights = torch.randn_like(y)
    with pytest.raises(RuntimeError, match=SECOND_ORDER) as error:
        torch.autograd.grad((y * weights).sum(), inputs, create_graph=True)
    assert LAYER[name] in str(error.value) and name in str(error.value)


@pytest.mark.parametrize("name", list(CASES))
def test_first_order_gradients_of_each_function_are_unchanged(name):
    function, args, inputs, reference = CASES[name]()
    y = _first_output(function.apply(*args))
    weights = torch.randn_like(y)
    got = torch.autograd.grad((y * weights).sum(), inputs)
    expected = torch.autograd.grad((reference() * weights).sum(), inputs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def _backward_of(cls):
    backward = vars(cls)["backward"]
    return backward.__func__ if isinstance(backward, staticmethod) else backward


def test_every_trady_autograd_function_is_guarded():
    """A Function added anywhere in the package must decorate its backward too."""
    for info in pkgutil.walk_packages(tt.__path__, "trady_triton."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    found, pending = [], list(Function.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__.startswith("trady_triton") and "backward" in vars(cls):
            found.append(cls)
    assert set(CASES) <= {cls.__name__ for cls in found}
    unguarded = [cls.__qualname__ for cls in found
                 if not getattr(_backward_of(cls), "first_order_only", False)]
    assert not unguarded, f"autograd Functions without @first_order_only: {unguarded}"


def _issue_net():
    """The net of the report: conv, frozen BN, ReLU6, depthwise conv, ReLU, Linear."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU6(),
                        nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).double()
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    return net


def test_gradgradcheck_on_a_converted_net_raises_the_clear_error_and_gradcheck_passes():
    net = _issue_net()
    x = _r(2, 3, 6, 5)
    controller = tt.convert(net, 0.6, example_input=x.detach(), policy="d-fullrandom", seed=2)
    assert controller.selection
    net.train()
    head = net[7].weight
    call = lambda x, head_weight: F.linear(net[:7](x), head_weight, net[7].bias)   # noqa: E731
    assert torch.autograd.gradcheck(call, (x, head))
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        torch.autograd.gradgradcheck(call, (x, head))
    with pytest.raises(RuntimeError, match=SECOND_ORDER):   # a gradient penalty on the weights
        grad_x, = torch.autograd.grad(net(x).logsumexp(1).sum(), x, create_graph=True)
        grad_x.square().sum().backward()



def _modern_net(name):
    from trady_triton.models.efficientnet_b0 import EfficientNetB0
    from trady_triton.models.mobilenetv3 import MobileNetV3Small
    from trady_triton.models.transformers import VisionTransformer
    if name == "mobilenetv3-small":
        return MobileNetV3Small(num_classes=5, width_mult=0.25), (2, 3, 33, 31)
    if name == "efficientnet-b0":
        return EfficientNetB0(num_classes=5, width_mult=0.25, depth_mult=0.34), (2, 3, 33, 31)
    return VisionTransformer(num_classes=5, image_size=20, patch=4, dim=12, depth=2, heads=3,
                             mlp_ratio=2), (2, 3, 20, 20)


@pytest.mark.parametrize("name", ["mobilenetv3-small", "efficientnet-b0", "vit"])
def test_double_backward_through_converted_modern_nets_raises_naming_a_layer(name):
    """The modules of the modern architectures (SiLU, Hardswish, SE, LayerNorm, attention, ...)
    refuse create_graph=True too, instead of giving wrong second derivatives."""
    torch.manual_seed(0)
    net, shape = _modern_net(name)
    net = net.double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    tt.convert(net, 0.05, example_input=x.detach())
    loss = net(x).square().sum()
    with pytest.raises(RuntimeError, match=SECOND_ORDER) as err:
        torch.autograd.grad(loss, x, create_graph=True)
    assert "TraDy" in str(err.value)
