"""Property-based tests (hypothesis) and edge cases of the converted layers.

Over random conv / linear configurations, selections, dtypes and memory layouts,
on the reference path and on the Triton kernels (interpreted on CPU): output, dX,
bias grad equal PyTorch's; dW equals PyTorch's on the selected slices and is an
exact zero elsewhere. NaN / Inf propagate as in PyTorch. Empty batch, batch of
one, non-contiguous and channels_last inputs; a change of input resolution.
"""

import copy
import importlib
import os

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trady_triton as tt
from trady_triton.convert import swap_modules
from trady_triton.optim import owned_entries

from _requirements import missing
from helpers import small_net

if not torch.cuda.is_available():       # conftest does it too; needed before kernels import
    os.environ.setdefault("TRITON_INTERPRET", "1")

SETTINGS = dict(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TOLERANCE = {torch.float64: (1e-9, 1e-11), torch.float32: (2e-4, 2e-5),
             torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("one_thread")


def _dtype_for(backend, dtype):
    """The Triton kernels take float16/bfloat16/float32 (GPU kernels): float64 -> float32."""
    return torch.float32 if backend == "triton" and dtype == torch.float64 else dtype


def _triton_available():
    try:
        importlib.import_module("trady_triton.kernels")
    except Exception as error:   # noqa: BLE001 - any import failure means "not available"
        missing(f"trady_triton.kernels does not import ({error}): the Triton path is not built")


@st.composite
def conv_configs(draw):
    kind = draw(st.sampled_from(["dense", "depthwise", "grouped"]))
    k = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    stride = draw(st.integers(1, 2))
    padding = draw(st.integers(0, (k // 2) * dilation))
    if kind == "dense":
        groups, cin, cout = 1, draw(st.integers(1, 6)), draw(st.integers(1, 5))
    elif kind == "depthwise":
        cin = draw(st.integers(1, 6))
        groups, cout = cin, cin * draw(st.integers(1, 2))
    else:
        groups = 2
        cin, cout = 2 * draw(st.integers(1, 3)), 2 * draw(st.integers(1, 2))
    reach = dilation * (k - 1) + 1
    h = draw(st.integers(max(1, reach - 2 * padding), 7))
    w = draw(st.integers(max(1, reach - 2 * padding), 7))
    batch = draw(st.integers(0, 3))
    selection = sorted(draw(st.sets(st.integers(0, cin - 1), min_size=1, max_size=cin)))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "strided"]))
    bias = draw(st.booleans())
    return dict(cin=cin, cout=cout, k=k, stride=stride, padding=padding, dilation=dilation,
                groups=groups, h=h, w=w, batch=batch, selection=selection, layout=layout,
                bias=bias)


def _layout(x, layout):
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":       # a non-contiguous view of a larger tensor
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        big[..., ::2] = x
        view = big[..., ::2]
        assert not view.is_contiguous() or x.numel() <= 1 or x.shape[-1] == 1
        return view
    return x


def _check_conv(cfg, dtype, special=None):
    torch.manual_seed(0)
    plain = nn.Conv2d(cfg["cin"], cfg["cout"], cfg["k"], cfg["stride"], cfg["padding"],
                      cfg["dilation"], cfg["groups"], bias=cfg["bias"]).to(dtype)
    model = nn.Sequential(copy.deepcopy(plain))
    swap_modules(model)
    conv = model[0]
    idx = torch.tensor(cfg["selection"])
    conv.selected_channels = idx
    x = torch.randn(cfg["batch"], cfg["cin"], cfg["h"], cfg["w"]).to(dtype)
    if special is not None and x.numel():
        flat = x.view(-1)
        for position, value in special:
            flat[position % flat.numel()] = value
    x = _layout(x, cfg["layout"]).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = conv(x), plain(x_ref)
    dy = torch.randn(y_ref.shape).to(dtype)
    y.backward(dy)
    y_ref.backward(dy)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol, equal_nan=True)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=rtol, atol=atol, equal_nan=True)
    owned = owned_entries(conv, idx)
    torch.testing.assert_close(conv.weight.grad[owned], plain.weight.grad[owned], rtol=rtol,
                               atol=atol * max(1, cfg["batch"] * cfg["h"] * cfg["w"]) ** 0.5,
                               equal_nan=True)
    assert torch.all(conv.weight.grad[~owned] == 0)
    if cfg["bias"]:
        torch.testing.assert_close(conv.bias.grad, plain.bias.grad, rtol=rtol, atol=atol,
                                   equal_nan=True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@settings(max_examples=25, **SETTINGS)
@given(cfg=conv_configs(), dtype=st.sampled_from(DTYPES))
def test_conv_property(backend, cfg, dtype):
    if backend == "triton":
        _triton_available()
    with tt.backend(backend):
        _check_conv(cfg, _dtype_for(backend, dtype))


@st.composite
def linear_configs(draw):
    lead = draw(st.lists(st.integers(0, 3), min_size=1, max_size=3))
    fin, fout = draw(st.integers(1, 9)), draw(st.integers(1, 5))
    selection = sorted(draw(st.sets(st.integers(0, fin - 1), min_size=1, max_size=fin)))
    layout = draw(st.sampled_from(["contiguous", "strided"]))
    return dict(lead=lead, fin=fin, fout=fout, selection=selection, layout=layout,
                bias=draw(st.booleans()))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@settings(max_examples=25, **SETTINGS)
@given(cfg=linear_configs(), dtype=st.sampled_from(DTYPES))
def test_linear_property(backend, cfg, dtype):
    if backend == "triton":
        _triton_available()
    dtype = _dtype_for(backend, dtype)
    torch.manual_seed(0)
    plain = nn.Linear(cfg["fin"], cfg["fout"], bias=cfg["bias"]).to(dtype)
    model = nn.Sequential(copy.deepcopy(plain))
    swap_modules(model)
    linear = model[0]
    idx = torch.tensor(cfg["selection"])
    linear.selected_channels = idx
    x = _layout(torch.randn(*cfg["lead"], cfg["fin"]).to(dtype), cfg["layout"]).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    with tt.backend(backend):
        y = linear(x)
        y_ref = plain(x_ref)
        dy = torch.randn(y_ref.shape).to(dtype)
        y.backward(dy)
    y_ref.backward(dy)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=rtol, atol=atol)
    rows = max(1, x.numel() // cfg["fin"])
    torch.testing.assert_close(linear.weight.grad[:, idx], plain.weight.grad[:, idx], rtol=rtol,
                               atol=atol * rows ** 0.5)
    rest = torch.ones(cfg["fin"], dtype=torch.bool)
    rest[idx] = False
    assert torch.all(linear.weight.grad[:, rest] == 0)


SPECIALS = st.lists(st.tuples(st.integers(0, 10_000),
                              st.sampled_from([float("nan"), float("inf"), -float("inf")])),
                    min_size=1, max_size=4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@settings(max_examples=15, **SETTINGS)
@given(cfg=conv_configs(), special=SPECIALS)
def test_nan_and_inf_in_conv_inputs_propagate_as_in_pytorch(backend, cfg, special):
    """Selected slices of dW, dX and the output carry NaN/Inf exactly where PyTorch's
    do; unselected slices of dW stay exact zeros (they are not trained)."""
    if backend == "triton":
        _triton_available()
    with tt.backend(backend):
        _check_conv(cfg, _dtype_for(backend, torch.float64), special)


CHAIN = dict(special=SPECIALS, selection=st.sets(st.integers(0, 5), min_size=1, max_size=5),
             channels_last=st.booleans())


def _check_chain(backend, activation, special, selection, channels_last):
    """BN -> ReLU/ReLU6 -> partially trained conv (the fused kernel) against plain
    PyTorch, with NaN/Inf inputs. 4x4 maps (numel a multiple of 16): PyTorch's
    vectorised activation kernels decide NaN gradients, not its scalar tail loop."""
    dtype = _dtype_for(backend, torch.float64)
    rtol, atol = TOLERANCE[dtype]
    torch.manual_seed(0)
    plain = nn.Sequential(nn.BatchNorm2d(6), activation(), nn.Conv2d(6, 4, 3, padding=1)).to(dtype)
    plain[0].running_mean.uniform_(-0.5, 0.5)
    plain[0].running_var.uniform_(0.5, 2.0)
    plain.eval()
    model = copy.deepcopy(plain)
    x = torch.randn(2, 6, 4, 4, dtype=dtype)
    controller = tt.convert(model, 1.0, example_input=x, policy="d-fullrandom", classifier=None)
    idx = torch.tensor(sorted(selection))
    controller.apply_selection({"2": idx})
    assert controller.profile.fusions == [("0", "1", "2")]
    flat = x.view(-1)
    for position, value in special:
        flat[position % flat.numel()] = value
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    plain[2].weight.requires_grad_(True)
    for p in list(plain[0].parameters()) + [plain[2].bias]:
        p.requires_grad_(False)
    with tt.backend(backend):
        y = model(x)
        y.backward(torch.ones_like(y))
    y_ref = plain(x_ref)
    y_ref.backward(torch.ones_like(y_ref))
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol, equal_nan=True)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=rtol, atol=atol, equal_nan=True)
    torch.testing.assert_close(model[2].weight.grad[:, idx], plain[2].weight.grad[:, idx],
                               rtol=rtol, atol=atol * 6, equal_nan=True)


@pytest.mark.parametrize("activation", [nn.ReLU, nn.ReLU6])
@settings(max_examples=10, **SETTINGS)
@given(**CHAIN)
def test_nan_and_inf_through_the_fused_bn_activation_conv_chain(activation, special, selection,
                                                                channels_last):
    _check_chain("reference", activation, special, selection, channels_last)


@pytest.mark.parametrize("activation", [nn.ReLU, nn.ReLU6])
@settings(max_examples=3, **SETTINGS)     # the interpreter is slow: a few examples
@given(**CHAIN)
def test_nan_and_inf_through_the_fused_chain_on_triton(activation, special, selection,
                                                       channels_last):
    _triton_available()
    _check_chain("triton", activation, special, selection, channels_last)


# ------------------------------------------------------------------ edge cases
def _net_and_controller():
    net = small_net().double()
    controller = tt.convert(net, 0.3, example_input=torch.randn(2, 3, 15, 13, dtype=torch.float64),
                            policy="d-fullrandom", seed=2)
    net.train()
    return net, controller


def test_empty_batch_and_batch_of_one():
    net, controller = _net_and_controller()
    reference = copy.deepcopy(net)
    net(torch.zeros(0, 3, 15, 13, dtype=torch.float64)).sum().backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    assert set(grads) == {f"{n}.weight" for n in controller.selection} | \
        {f"{controller.classifier}.weight", f"{controller.classifier}.bias"}
    assert all(torch.all(g == 0) for g in grads.values())
    net.zero_grad(set_to_none=True)
    x = torch.randn(1, 3, 15, 13, dtype=torch.float64)
    with tt.saved_tensor_bytes(net) as one:
        y = net(x)
    y.sum().backward()
    expected = controller.saved_bytes(1)
    assert one.total <= sum(expected.values())
    # batch of one equals the same sample inside a batch of three (per-sample gradients add up)
    reference.zero_grad(set_to_none=True)
    batch = torch.cat([x, torch.zeros(2, 3, 15, 13, dtype=torch.float64)])
    reference(batch)[:1].sum().backward()
    for name, p in net.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, reference.get_parameter(name).grad,
                                       rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_channels_last_and_non_contiguous_inputs_give_the_contiguous_result(layout):
    net, _ = _net_and_controller()
    x = torch.randn(3, 3, 15, 13, dtype=torch.float64)
    net(x).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    if layout == "channels_last":
        net.to(memory_format=torch.channels_last)
    net(_layout(x, layout)).square().sum().backward()
    for name, grad in expected.items():
        torch.testing.assert_close(net.get_parameter(name).grad, grad, rtol=1e-10, atol=1e-12)


def test_change_of_input_resolution_between_epochs():
    net, controller = _net_and_controller()
    budget_before = controller.budget_units
    bigger = torch.randn(2, 3, 23, 21, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="differs from the profiled"):
        net(bigger)                                  # a training forward: budget is stale
    with torch.no_grad():
        assert net(bigger).shape == (2, 5)           # evaluation at any size is fine
    controller.set_example_input(bigger)             # re-profile: costs and budget re-evaluated
    assert controller.budget_units > budget_before   # keep_ratio of a larger full cost
    controller.resample(1)
    stats = controller.stats()
    assert stats.selected_units <= controller.budget_units
    net(bigger).sum().backward()                     # trains at the new resolution
    with pytest.raises(RuntimeError, match="differs from the profiled"):
        net(torch.randn(2, 3, 15, 13, dtype=torch.float64))
    controller.revert()
    assert not net._forward_pre_hooks
    net(torch.randn(2, 3, 15, 13, dtype=torch.float64))   # plain model: no check left
