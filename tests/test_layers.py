"""TraDy layers against torch autograd on the unconverted layer, in float64."""

import copy
import math
import random

import pytest
import torch
import torch.nn as nn

import trady_triton as tt
from trady_triton import layers as L
from trady_triton.convert import swap_modules



@pytest.fixture(autouse=True)
def float64_default():
    """Everything here is compared in float64; restore the default afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _conv_configs():
    rng = random.Random(1234)
    configs = []
    for kind in ["dense"] * 5 + ["depthwise"] * 4 + ["grouped"] * 3:
        k = rng.randint(1, 5)
        stride = rng.randint(1, 2)
        dilation = rng.choice([1, 1, 2])
        padding = rng.randint(0, k // 2 * dilation)
        groups = {"dense": 1, "depthwise": None, "grouped": rng.choice([2, 3])}[kind]
        if kind == "depthwise":
            cin = rng.choice([5, 7, 9])
            groups, cout = cin, cin * rng.choice([1, 2])
        else:
            cin = groups * rng.randint(2, 4) + (0 if groups > 1 else rng.randint(1, 5))
            cout = groups * rng.randint(1, 3)
        h, w = rng.randint(k * dilation + 2, 13), rng.randint(k * dilation + 2, 13)
        configs.append((cin, cout, k, stride, padding, dilation, groups, h, w))
    return configs


def _expected_masked(full_grad, idx, groups):
    """Only the entries of dW that input channels ``idx`` own; zeros elsewhere."""
    out_channels, in_per_group = full_grad.shape[:2]
    owned = torch.zeros_like(full_grad, dtype=torch.bool)
    out_per_group = out_channels // groups
    for c in idx.tolist():
        g = c // in_per_group
        owned[g * out_per_group:(g + 1) * out_per_group, c % in_per_group] = True
    return torch.where(owned, full_grad, torch.zeros_like(full_grad)), owned


def _selection(channels, rng):
    k = rng.randint(1, channels)
    return torch.tensor(rng.sample(range(channels), k))


@pytest.mark.parametrize("config", _conv_configs(), ids=lambda c: "c{}-{}_k{}_s{}_p{}_d{}_g{}_{}x{}".format(*c))
def test_selected_conv_matches_torch(config):
    cin, cout, k, stride, padding, dilation, groups, h, w = config
    rng = random.Random(hash(config) % 1000)
    torch.manual_seed(rng.randint(0, 10_000))
    plain = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=True)
    model = nn.Sequential(copy.deepcopy(plain))
    swap_modules(model)
    conv = model[0]
    assert isinstance(conv, L.TraDyConv2d)
    idx = _selection(cin, rng)
    conv.selected_channels = idx
    x = torch.randn(3, cin, h, w, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = conv(x)
    y_ref = plain(x_ref)
    dy = torch.randn_like(y_ref)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    expected, owned = _expected_masked(plain.weight.grad, idx, groups)
    torch.testing.assert_close(conv.weight.grad, expected, rtol=1e-10, atol=1e-12)
    assert torch.all(conv.weight.grad[~owned] == 0)
    torch.testing.assert_close(conv.bias.grad, plain.bias.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(5, 11), (2, 3, 11), (2, 1, 3, 11)])
def test_selected_linear_matches_torch(shape):
    torch.manual_seed(sum(shape))
    plain = nn.Linear(11, 7)
    model = nn.Sequential(copy.deepcopy(plain))
    swap_modules(model)
    lin = model[0]
    idx = torch.tensor([10, 0, 4])
    lin.selected_channels = idx
    x = torch.randn(*shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    dy = torch.randn(*shape[:-1], 7)
    lin(x).backward(dy)
    plain(x_ref).backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    expected = torch.zeros_like(plain.weight.grad)
    expected[:, idx] = plain.weight.grad[:, idx]
    torch.testing.assert_close(lin.weight.grad, expected, rtol=1e-10, atol=1e-12)
    assert torch.all(lin.weight.grad[:, [1, 2, 3, 5, 6, 7, 8, 9]] == 0)


def _converted(*modules):
    model = nn.Sequential(*modules)
    swap_modules(model)
    return model


def test_selected_conv_saves_only_the_compact_channels():
    model = _converted(nn.Conv2d(6, 4, 3, padding=1))
    model[0].selected_channels = torch.tensor([5, 1])
    x = torch.randn(2, 6, 9, 7, requires_grad=True)
    with tt.saved_tensor_bytes(model) as saved:
        model(x)
    assert saved.total == 2 * 2 * 9 * 7 * 8


def test_frozen_conv_and_linear_save_no_activation_and_give_exact_dx():
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.Linear(5 * 4 * 4, 3)
    plain = nn.Sequential(conv, nn.Flatten(), lin)
    model = copy.deepcopy(plain)
    swap_modules(model)
    for p in list(model.parameters()) + list(plain.parameters()):
        p.requires_grad_(False)
    x = torch.randn(2, 4, 7, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    with tt.saved_tensor_bytes(model) as saved:
        y = model(x)
    with tt.saved_tensor_bytes(plain) as saved_plain:
        y_ref = plain(x_ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert saved.total == 0
    assert saved_plain.total > 0   # plain PyTorch keeps the input even with frozen weights
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6])
@pytest.mark.parametrize("inplace", [False, True])
def test_masked_activation_matches_torch_and_keeps_one_bit(act, inplace):
    torch.manual_seed(1)
    x0 = torch.randn(3, 5, 7, 9) * 5
    x0.view(-1)[:6] = torch.tensor([0.0, 6.0, float("nan"), -0.0, float("inf"), -float("inf")])
    model = _converted(nn.Identity(), act(inplace=inplace))
    ref = nn.Sequential(nn.Identity(), act(inplace=inplace))
    a = x0.clone().requires_grad_(True)
    b = x0.clone().requires_grad_(True)
    with tt.saved_tensor_bytes(model) as saved:
        y = model(a * 1.0)    # a non-leaf, so in-place is allowed
    y_ref = ref(b * 1.0)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(a.grad, b.grad, equal_nan=True, rtol=0, atol=0)
    assert saved.total == math.ceil(x0.numel() / 8)


@pytest.mark.parametrize("train_mode", [False, True])
def test_frozen_batchnorm_is_an_affine_that_saves_nothing(train_mode):
    torch.manual_seed(2)
    bn = nn.BatchNorm2d(5)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.3, 3)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.uniform_(-1, 1)
    ref = copy.deepcopy(bn).eval()
    model = _converted(bn)
    model.train(train_mode)
    for p in list(model.parameters()) + list(ref.parameters()):
        p.requires_grad_(False)
    stats_before = (bn.running_mean.clone(), bn.running_var.clone())
    x = torch.randn(4, 5, 3, 6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    with tt.saved_tensor_bytes(model) as saved:
        y = model(x)
    y_ref = ref(x_ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert saved.total == 0
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    assert torch.equal(model[0].running_mean, stats_before[0])
    assert torch.equal(model[0].running_var, stats_before[1])


def test_frozen_batchnorm_caches_its_affine_and_follows_changes():
    """(scale, shift) are computed once, not at every step, and recomputed when the BN's
    statistics, parameters, dtype or device change."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountRsqrt(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.rsqrt:
                CountRsqrt.calls += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(4)
    bn = nn.BatchNorm2d(5)
    bn.running_var.uniform_(0.3, 3)
    ref = copy.deepcopy(bn).eval()
    model = _converted(bn)
    for p in list(model.parameters()):
        p.requires_grad_(False)
    x = torch.randn(3, 5, 4, 4, requires_grad=True)
    with CountRsqrt():
        for _ in range(3):
            model(x).sum().backward()
    assert CountRsqrt.calls == 1                      # once, not twice per step
    # in-place changes (as load_state_dict makes) are seen
    with torch.no_grad():
        model[0].running_mean.copy_(torch.randn(5))
        ref.running_mean.copy_(model[0].running_mean)
        model[0].weight.mul_(1.5)
        ref.weight.mul_(1.5)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-6, atol=1e-6)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    state["running_var"] = state["running_var"] * 2
    ref.load_state_dict(state)
    model[0].load_state_dict(state)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-6, atol=1e-6)
    # another dtype gets its own (scale, shift)
    model.double()
    ref.double()
    y = model(x.double())
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, ref(x.double()), rtol=1e-12, atol=1e-12)


def test_unfrozen_batchnorm_keeps_pytorch_behaviour():
    bn = nn.BatchNorm2d(3)
    model = _converted(bn)
    model[0].freeze_stats = False
    model.train()
    x = torch.randn(4, 3, 5, 5) * 3 + 1
    model(x)
    assert not torch.equal(model[0].running_mean, torch.zeros(3))


def test_fused_bn_relu_conv_equals_unfused():
    torch.manual_seed(3)
    plain = nn.Sequential(nn.BatchNorm2d(6), nn.ReLU6(inplace=True), nn.Conv2d(6, 4, 3, padding=1))
    plain[0].running_var.uniform_(0.5, 2)
    plain[0].running_mean.uniform_(-1, 1)
    x = torch.randn(2, 6, 5, 7) * 3
    results = []
    for fuse in (True, False):
        model = copy.deepcopy(plain)
        controller = tt.convert(model, budget_units=10**6, example_input=x, policy="full",
                                classifier=None)
        assert controller.profile.fusions == [("0", "1", "2")]
        model[2].selected_channels = torch.tensor([4, 0, 2])
        if not fuse:
            model[0]._fuse_with = None
        xi = x.clone().requires_grad_(True)
        with tt.saved_tensor_bytes(model) as saved:
            y = model(xi)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), xi.grad, model[2].weight.grad, saved.total))
    (y1, gx1, gw1, s1), (y2, gx2, gw2, s2) = results
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(gx1, gx2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw1, gw2, rtol=1e-12, atol=1e-12)
    assert s1 == s2 == 2 * 3 * 5 * 7 * 8 + math.ceil(2 * 6 * 5 * 7 / 8)


def test_global_average_pool_saves_nothing():
    model = _converted(nn.AdaptiveAvgPool2d(1))
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    with tt.saved_tensor_bytes(model) as saved:
        y = model(x)
    y.sum().backward()
    assert saved.total == 0
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / 20))


def test_layers_before_the_first_trained_one_take_no_part_in_autograd():
    model = _converted(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
    for p in model.parameters():
        p.requires_grad_(False)
    model[2].weight.requires_grad_(True)
    model[2].selected_channels = torch.tensor([1])
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.grad_fn))
    model[1].register_forward_hook(lambda m, i, o: seen.append(o.grad_fn))
    with tt.saved_tensor_bytes(model) as saved:
        model(torch.randn(2, 3, 6, 6))
    assert seen == [None, None]
    assert saved.total == 2 * 1 * 4 * 4 * 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_reference_mask_backward_blocks_exactly_like_torch_where(dtype):
    """reference.relu_backward_mask's CPU bit-AND path: bit-identical to torch.where,
    with NaN, inf and -0.0 gradients on both sides of the mask and an odd size."""
    from trady_triton import reference as ref

    g = torch.Generator().manual_seed(5)
    grad = torch.randn(3, 5, 7, 11, generator=g).to(dtype)
    flat = grad.view(-1)
    flat[::7] = float("nan")
    flat[3::11] = float("inf")
    flat[5::13] = -0.0
    passes = torch.rand(grad.shape, generator=g) > 0.4
    got = ref.relu_backward_mask(grad, ref.pack_mask(passes))
    want = torch.where(passes, grad, torch.zeros((), dtype=dtype))
    assert got.dtype == dtype and got.shape == grad.shape
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[grad.element_size()]
    assert torch.equal(got.view(int_dtype), want.view(int_dtype))        # bit for bit
    # non-contiguous gradients too
    t = grad.transpose(1, 3)
    got = ref.relu_backward_mask(t, ref.pack_mask(passes.transpose(1, 3)))
    want = torch.where(passes.transpose(1, 3), t, torch.zeros((), dtype=dtype))
    assert torch.equal(got.contiguous().view(int_dtype), want.contiguous().view(int_dtype))
