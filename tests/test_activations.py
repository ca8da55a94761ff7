"""activations.py: exact gradients, and only what each exact backward needs is kept."""

import copy
import math

import pytest
import torch
import torch.nn as nn

import trady_triton as tt
from trady_triton.convert import swap_modules
from helpers import swapped_and_plain
from trady_triton.models.blocks import SqueezeExcitation

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny shapes; the cores are shared

KEEPS_INPUT = [nn.SiLU, nn.Hardswish, nn.GELU, lambda: nn.GELU(approximate="tanh")]
KEEPS_OUTPUT = [nn.Sigmoid, nn.Tanh]


def _converted(*modules):
    model = nn.Sequential(*modules)
    swap_modules(model)
    return model


def _inputs(shape, seed=0):
    """Random float64 values spread over every piece of the piecewise activations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 4
    x.view(-1)[:4] = torch.tensor([-3.0, 3.0, 0.0, -1.5], dtype=torch.float64)   # kinks
    return x


def _run(module, x0):
    grad, grad_plain, saved, _, _ = swapped_and_plain(module, x0)
    return grad, grad_plain, saved


@pytest.mark.parametrize("make", KEEPS_INPUT + KEEPS_OUTPUT + [nn.Hardsigmoid],
                         ids=["silu", "hardswish", "gelu", "gelu-tanh", "sigmoid", "tanh",
                              "hardsigmoid"])
def test_activation_gradient_equals_pytorch_bit_for_bit(make):
    x0 = _inputs((3, 5, 7, 9))
    grad, grad_ref, _ = _run(make(), x0)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0)


@pytest.mark.parametrize("make", KEEPS_INPUT + KEEPS_OUTPUT, ids=["silu", "hardswish", "gelu",
                                                                 "gelu-tanh", "sigmoid", "tanh"])
def test_smooth_activations_keep_one_tensor_of_their_size(make):
    x0 = _inputs((2, 3, 5, 7))
    _, _, saved = _run(make(), x0)
    assert saved == x0.numel() * 8


def test_hardsigmoid_keeps_one_bit_per_element():
    x0 = _inputs((3, 5, 7, 9))
    _, _, saved = _run(nn.Hardsigmoid(), x0)
    assert saved == math.ceil(x0.numel() / 8)


@pytest.mark.parametrize("make", KEEPS_INPUT + KEEPS_OUTPUT + [nn.Hardsigmoid, nn.Dropout])
def test_activations_keep_nothing_before_the_first_trained_layer(make):
    model = _converted(make()).train()
    with tt.saved_tensor_bytes(model) as saved:
        y = model(_inputs((2, 3, 5)))
    assert saved.total == 0 and not y.requires_grad


def test_inplace_activation_runs_out_of_place_and_keeps_its_input():
    x0 = _inputs((2, 3, 5, 7))
    grad, grad_ref, saved = _run(nn.SiLU(inplace=True), x0)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0)
    assert saved == x0.numel() * 8


@pytest.mark.parametrize("p", [0.3, 0.85])
def test_dropout_keeps_a_one_bit_mask_and_scales_like_pytorch(p):
    torch.manual_seed(3)
    x = _inputs((3, 5, 7, 11)).requires_grad_(True)
    model = _converted(nn.Dropout(p)).train()
    with tt.saved_tensor_bytes(model) as saved:
        y = model(x * 1.0)
    kept = y != 0                      # x has no zeros but the planted one
    dy = torch.randn_like(y)
    y.backward(dy)
    x_ref = x.detach().clone().requires_grad_(True)
    (x_ref * kept / (1 - p)).backward(dy)
    torch.testing.assert_close(y, x.detach() * kept / (1 - p), rtol=1e-15, atol=0)
    torch.testing.assert_close(x.grad[x.detach() != 0], x_ref.grad[x.detach() != 0],
                               rtol=1e-15, atol=0)
    assert saved.total == math.ceil(x.numel() / 8)
    assert 0.5 * (1 - p) < kept.double().mean() < 1.5 * (1 - p)


def test_dropout_is_the_identity_in_eval_mode():
    model = _converted(nn.Dropout(0.5)).eval()
    x = _inputs((2, 9)).requires_grad_(True)
    assert model(x) is x


@pytest.mark.parametrize("scale_activation", [nn.Hardsigmoid, nn.Sigmoid])
@pytest.mark.parametrize("activation", [nn.Hardswish, nn.ReLU])
def test_gate_multiply_recomputes_x_only_from_a_kept_input(activation, scale_activation):
    torch.manual_seed(4)
    plain = nn.Sequential(activation(), SqueezeExcitation(6, 3, scale_activation=scale_activation))
    plain.double()
    x0 = _inputs((2, 6, 5, 7))
    grad, grad_ref, saved, _, model = swapped_and_plain(plain, x0)   # every weight trained
    torch.testing.assert_close(grad, grad_ref, rtol=1e-13, atol=1e-13)
    for p, p_ref in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-13, atol=1e-13)
    x_bytes = x0.numel() * 8
    # Hardswish keeps its input, from which the gate's x is recomputed; after a ReLU
    # (a 1-bit mask) the gate keeps x itself
    first = x_bytes if activation is nn.Hardswish else math.ceil(x0.numel() / 8) + x_bytes
    squeeze = 2 * 6 * 8 + 1 + 2 * 3 * 8     # fc1 input, ReLU mask, fc2 input
    gate = 2 * 6 * 8 + (2 if scale_activation is nn.Hardsigmoid else 0)   # + its mask
    assert saved == first + squeeze + gate


def test_gate_multiply_keeps_x_itself_when_x_changed_after_its_activation():
    torch.manual_seed(5)
    se = SqueezeExcitation(6, 3, scale_activation=nn.Sigmoid).double()
    model = _converted(nn.SiLU(), se)
    x = _inputs((2, 6, 5, 7)).requires_grad_(True)
    with tt.saved_tensor_bytes(model) as saved:
        y = model[0](x * 1.0)
        y.mul_(2.0)                     # x of the gate is no longer silu(kept input)
        out = model[1](y)
    out.backward(torch.ones_like(out))
    x_ref = x.detach().clone().requires_grad_(True)
    plain = copy.deepcopy(se)
    for p in plain.parameters():
        p.grad = None
    plain(torch.nn.functional.silu(x_ref) * 2.0).backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-13, atol=1e-13)
    assert saved.total >= 2 * x.numel() * 8   # the SiLU input and the gate's own x
