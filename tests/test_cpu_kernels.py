"""The one-pass CPU loops (trady_triton.cpu_kernels) against reference.py, the oracle.

Masks bit for bit (NaN, +-inf, -0.0, values exactly at 0 and 6), outputs exactly (torch's
values, -0.0 == 0.0), gradients exactly too (the loops make the same float operations
as the reference); whole converted networks to float64 tolerance of plain autograd.
"""

import copy

import pytest
import torch
import torch.nn as nn

import trady_triton as tt
from trady_triton import cpu_kernels, dispatch, reference
from trady_triton.models import build_model, tinyml_weights_path

from _requirements import require_file

SPECIALS = [float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 6.0, -6.0,
            5.9999995, 6.0000005, 1e-45, -1e-45]
# odd shapes: planes that are not whole bytes (49, 3*5), a tail byte, 1-D and 2-D inputs
SHAPES = [(3, 5, 7, 7), (2, 7, 3, 5), (1, 3, 1, 1), (4, 9), (37,), (5, 16, 8, 8)]


def _random_with_specials(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(dtype)
    flat = x.view(-1)
    spots = torch.randperm(flat.numel(), generator=g)[:len(SPECIALS)]
    flat[spots] = torch.tensor(SPECIALS[:len(spots)], dtype=torch.float64).to(dtype)
    return x


def _poisoned_like(x):
    return torch.full_like(x, float("nan"))


def _assert_same(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def test_loops_are_in_use():
    assert cpu_kernels.available(torch.randn(2, 3))
    with dispatch.backend("auto"):
        assert dispatch.ops_for(torch.randn(2)) is cpu_kernels
    with dispatch.backend("reference"):
        assert dispatch.ops_for(torch.randn(2)) is reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("upper", [None, 6.0])
def test_clamp_mask_equals_reference_bit_for_bit(shape, dtype, upper):
    x = _random_with_specials(shape, dtype, seed=len(shape))
    y_ref, mask_ref = reference.relu_forward_mask(x, upper)
    y, mask = cpu_kernels.relu_forward_mask(x, upper)
    assert mask.dtype == torch.uint8 and torch.equal(mask, mask_ref)
    _assert_same(y, y_ref)


@pytest.mark.parametrize("upper", [None, 6.0])
def test_in_place_clamp_writes_the_input_and_gives_the_same_mask(upper):
    x = _random_with_specials((3, 5, 7, 7), torch.float32, seed=1)
    y_ref, mask_ref = reference.relu_forward_mask(x.clone(), upper)
    y, mask = cpu_kernels.relu_forward_mask(x, upper, inplace=True)
    assert y.data_ptr() == x.data_ptr()
    assert torch.equal(mask, mask_ref)
    _assert_same(x, y_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) >= 2])
@pytest.mark.parametrize("upper", [None, 6.0])
def test_fused_affine_clamp_equals_reference(shape, dtype, upper):
    x = _random_with_specials(shape, dtype, seed=7)
    g = torch.Generator().manual_seed(3)
    scale = torch.randn(shape[1], generator=g, dtype=dtype)
    scale[0] = -scale[0].abs()             # a negative BN scale flips which side clamps
    shift = torch.randn(shape[1], generator=g, dtype=dtype)
    y_ref, mask_ref = reference.affine_clamp_mask(x, scale, shift, upper)
    y, mask = cpu_kernels.affine_clamp_mask(x, scale, shift, upper)
    assert torch.equal(mask, mask_ref)
    _assert_same(y, y_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) >= 2])
@pytest.mark.parametrize("scaled", [False, True])
def test_mask_scale_backward_equals_reference(shape, dtype, scaled):
    _, mask = reference.relu_forward_mask(_random_with_specials(shape, dtype, seed=5), 6.0)
    grad = _random_with_specials(shape, dtype, seed=11)   # NaN / inf gradients kept or blocked
    scale = torch.randn(shape[1], dtype=dtype) if scaled else None
    expected = reference.mask_scale_backward(grad, mask, scale)
    _assert_same(cpu_kernels.mask_scale_backward(grad, mask, scale), expected)
    if not scaled:
        _assert_same(cpu_kernels.relu_backward_mask(grad, mask), expected)


def test_reference_mask_scale_backward_is_mask_then_scale():
    """The oracle itself, against torch.where and a broadcast multiply."""
    x = torch.randn(2, 3, 5, 5)
    grad, scale = torch.randn_like(x), torch.randn(3)
    _, mask = reference.relu_forward_mask(x, 6.0)
    passes = (x > 0) & (x < 6)
    expected = torch.where(passes, grad, torch.zeros(())) * scale[None, :, None, None]
    _assert_same(reference.mask_scale_backward(grad, mask, scale), expected)


def test_fused_compaction_equals_reference():
    x = torch.randn(3, 10, 7, 7)
    scale, shift = torch.rand(10) + 0.5, torch.randn(10)
    idx = torch.tensor([7, 2, 9], dtype=torch.int32)
    expected = reference.affine_relu_compact(x, scale, shift, 6.0, idx)
    actual = cpu_kernels.affine_relu_compact(x, scale, shift, 6.0, idx)
    for a, e in zip(actual, expected):
        _assert_same(a, e)


def test_unserved_inputs_fall_back_to_the_reference():
    x = torch.randn(4, 6, 5, 5).to(torch.bfloat16)
    strided = torch.randn(4, 5, 6, 5).transpose(1, 2)
    empty = torch.randn(0, 6, 5, 5)
    for t in (x, strided, empty):
        assert not cpu_kernels.available(t)
        y, mask = cpu_kernels.relu_forward_mask(t, 6.0)
        y_ref, mask_ref = reference.relu_forward_mask(t, 6.0)
        assert torch.equal(mask, mask_ref)
        _assert_same(y, y_ref)


def _paper_net(name):
    torch.manual_seed(0)
    if name == "mcunet-in1":
        path = require_file(tinyml_weights_path(name), "the paper's MCUNet-in1 weights")
        return build_model(name, weights=path, num_classes=10)
    return build_model(name, pretrained=False, num_classes=10)


@pytest.mark.parametrize("name", ["mbv2-w0.35-arch", "mcunet-in1", "efficientnet-lite0"])
def test_paper_nets_give_exact_gradients_and_the_cost_models_bytes(name):
    """Converted in float64 on the fast CPU path: every trained weight-gradient slice is
    plain autograd's (BN frozen), the rest exact zeros, and the bytes autograd saves are
    the cost model's."""
    net = _paper_net(name).double()
    plain = copy.deepcopy(net).eval()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    target = torch.tensor([1, 7])
    controller = tt.convert(net, 0.05, example_input=x, policy="d-fullrandom", seed=3)
    net.train()
    with dispatch.backend("auto"), tt.saved_tensor_bytes(net) as saved:
        logits = net(x)
    nn.functional.cross_entropy(logits, target).backward()
    assert saved.total == controller.saved_bytes(batch=2)["total"]
    nn.functional.cross_entropy(plain(x), target).backward()
    modules = dict(net.named_modules())
    checked = 0
    for layer, idx in controller.selection.items():
        grad, expected = modules[layer].weight.grad, plain.get_submodule(layer).weight.grad
        rows = idx if modules[layer].weight.shape[1] == 1 else (slice(None), idx)
        scale = expected[rows].abs().max().item()    # random-init nets: tiny gradients
        torch.testing.assert_close(grad[rows], expected[rows], rtol=1e-9, atol=1e-12 * scale,
                                   msg=layer)
        checked += scale > 0
        untouched = torch.ones_like(grad, dtype=torch.bool)
        untouched[rows] = False
        assert torch.all(grad[untouched] == 0), layer
    assert checked >= 2       # layers with a non-zero gradient actually compared


# ------------------------------------------------------------------ 1x1 convs as a GEMM
def _conv_case(n, c_in, c_out, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, 1, 1, generator=g, dtype=torch.float64)
    bias = torch.randn(c_out, generator=g, dtype=torch.float64)
    return x, weight, bias


@pytest.mark.parametrize("shape", [(3, 5, 7, 9, 11), (1, 1, 3, 1, 1), (2, 16, 4, 5, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_pointwise_conv_forward_and_input_grad_equal_autograd(shape, with_bias):
    x, weight, bias = _conv_case(*shape, seed=sum(shape))
    bias = bias if with_bias else None
    plain = x.clone().requires_grad_(True)
    expected = nn.functional.conv2d(plain, weight, bias)
    grad_y = torch.randn_like(expected)
    expected.backward(grad_y)
    y = cpu_kernels.conv2d(x, weight, bias, (1, 1), (0, 0), (1, 1), 1)
    grad_x = cpu_kernels.conv2d_input_grad(x.shape, weight, grad_y, (1, 1), (0, 0), (1, 1), 1)
    assert y._base is None and grad_x._base is None   # no views: in-place ops may follow
    torch.testing.assert_close(y, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_x, plain.grad, rtol=1e-12, atol=1e-12)


def test_pointwise_masked_weight_grad_equals_reference():
    x, weight, _ = _conv_case(3, 9, 5, 6, 7, seed=11)
    idx = torch.tensor([7, 0, 4], dtype=torch.int32)
    grad_y = torch.randn(3, 5, 6, 7, dtype=torch.float64)
    compact = x[:, idx.long()].contiguous()
    args = (compact, grad_y, idx, tuple(weight.shape), (1, 1), (0, 0), (1, 1), 1)
    got = cpu_kernels.conv2d_weight_grad_masked(*args)
    torch.testing.assert_close(got, reference.conv2d_weight_grad_masked(*args),
                               rtol=1e-12, atol=1e-12)
    assert torch.all(got[:, [1, 2, 3, 5, 6, 8]] == 0)


@pytest.mark.parametrize("geometry", [dict(stride=(2, 2)), dict(padding=(1, 1)),
                                      dict(groups=3), dict(kernel=3), dict(channels_last=True)])
def test_convs_the_gemm_does_not_serve_give_atens_result(geometry):
    x, _, bias = _conv_case(2, 6, 6, 7, 5, seed=5)
    k, groups = geometry.get("kernel", 1), geometry.get("groups", 1)
    weight = torch.randn(6, 6 // groups, k, k, dtype=torch.float64)
    if geometry.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    conv = (geometry.get("stride", (1, 1)), geometry.get("padding", (0, 0)), (1, 1), groups)
    assert not cpu_kernels._pointwise(x, weight, conv[0], conv[1], groups)
    expected = nn.functional.conv2d(x, weight, bias, *conv)
    torch.testing.assert_close(cpu_kernels.conv2d(x, weight, bias, *conv), expected,
                               rtol=0, atol=0)
    grad_y = torch.randn_like(expected)
    torch.testing.assert_close(
        cpu_kernels.conv2d_input_grad(x.shape, weight, grad_y, *conv),
        torch.nn.grad.conv2d_input(x.shape, weight, grad_y, *conv), rtol=1e-12, atol=1e-12)


def test_pointwise_gemm_switch_restores_and_rejects_a_non_bool():
    x, weight, _ = _conv_case(1, 2, 3, 2, 2, seed=2)
    with cpu_kernels.pointwise_gemm(False):
        assert not cpu_kernels._pointwise(x, weight, (1, 1), (0, 0), 1)
    assert cpu_kernels._pointwise(x, weight, (1, 1), (0, 0), 1)
    with pytest.raises(TypeError, match="enabled"):
        with cpu_kernels.pointwise_gemm("no"):
            pass


@pytest.mark.parametrize("kernel, padding", [(3, 1), (5, 2), (3, 0), (3, 2)])
def test_stride_1_depthwise_input_grad_equals_autograd(kernel, padding):
    g = torch.Generator().manual_seed(kernel + padding)
    x = torch.randn(3, 7, 9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 1, kernel, kernel, generator=g, dtype=torch.float64)
    conv = ((1, 1), (padding, padding), (1, 1), 7)
    assert cpu_kernels._depthwise_stride_1(x, weight, *conv)
    y = nn.functional.conv2d(x, weight, None, *conv)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    got = cpu_kernels.conv2d_input_grad(x.shape, weight, grad_y, *conv)
    torch.testing.assert_close(got, x.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["mbv2-w0.35-arch", "efficientnet-lite0"])
def test_no_grad_forward_equals_the_plain_model(name):
    """Frozen prefix / inference path: BN folded into the conv before it, the wired
    ReLU/ReLU6 applied in place on the BN's output, 1x1 convs as a GEMM."""
    net = _paper_net(name).double()
    plain = copy.deepcopy(net).eval()
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    controller = tt.convert(net, 0.05, example_input=x, policy="d-fullrandom", seed=1)
    assert controller.profile.fusions and controller.profile.conv_bn_folds
    net.eval()
    with torch.no_grad():
        got, expected = net(x), plain(x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
