"""The three forms of a 1x1 conv (trady_triton.cpu_pointwise) against float64 autograd, and
the timed choice between them."""

import pytest
import torch
import torch.nn.functional as F

from trady_triton import cpu_kernels, cpu_pointwise
from trady_triton.fastest import PathChooser

FORMS = ["batched", "flat", "aten"]
# (batch, c_in, c_out, h, w): odd sizes, a 1x1 plane, the 2x2 planes of Lite0 at 40x40
SHAPES = [(3, 5, 7, 9, 11), (1, 1, 3, 1, 1), (5, 16, 4, 2, 2), (2, 9, 6, 3, 5)]


def _case(n, c_in, c_out, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, 1, 1, generator=g, dtype=torch.float64)
    bias = torch.randn(c_out, generator=g, dtype=torch.float64)
    grad_y = torch.randn(n, c_out, h, w, generator=g, dtype=torch.float64)
    return x, weight, bias, grad_y


def _autograd(x, weight, bias, grad_y):
    """y, dX, dW of the plain float64 conv."""
    x = x.detach().double().requires_grad_(True)
    weight = weight.detach().double().requires_grad_(True)
    y = F.conv2d(x, weight, None if bias is None else bias.double())
    y.backward(grad_y.double())
    return y.detach(), x.grad, weight.grad


@pytest.fixture
def poisoned_new_empty(monkeypatch):
    """Every ``new_empty`` comes filled with NaN: a form that leaves part of its output
    unwritten fails."""
    original = torch.Tensor.new_empty

    def new_empty(self, *args, **kwargs):
        return original(self, *args, **kwargs).fill_(float("nan"))
    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_each_form_equals_float64_autograd(monkeypatch, poisoned_new_empty, form, shape, dtype):
    monkeypatch.setenv("TRADY_CPU_POINTWISE", form)
    x, weight, bias, grad_y = _case(*shape, seed=sum(shape))
    y_ref, dx_ref, dw_ref = _autograd(x, weight, bias, grad_y)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    x, weight, bias, grad_y = (t.to(dtype) for t in (x, weight, bias, grad_y))

    y = cpu_pointwise.forward(x, weight, bias)
    grad_x = cpu_pointwise.input_grad(x.shape, weight, grad_y)
    assert y.dtype == grad_x.dtype == dtype
    assert y.is_contiguous() and grad_x.is_contiguous()   # the next layer's GEMM needs NCHW
    assert y._base is None and grad_x._base is None        # no views: in-place ops may follow
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(grad_x.double(), dx_ref, **tol)

    idx = torch.randperm(shape[1], generator=torch.Generator().manual_seed(1))[:3]
    grad_w = cpu_pointwise.weight_grad_masked(x[:, idx].contiguous(), grad_y, idx,
                                              tuple(weight.shape))
    torch.testing.assert_close(grad_w[:, idx].double(), dw_ref[:, idx], **tol)
    unselected = torch.ones(shape[1], dtype=torch.bool)
    unselected[idx] = False
    assert torch.all(grad_w[:, unselected] == 0)   # exact zeros, not small numbers


@pytest.mark.parametrize("form", FORMS)
def test_an_empty_batch_gives_empty_outputs_and_a_zero_weight_grad(monkeypatch, form):
    monkeypatch.setenv("TRADY_CPU_POINTWISE", form)
    x, weight, bias, grad_y = _case(0, 4, 3, 2, 2, seed=0)
    assert cpu_pointwise.forward(x, weight, bias).shape == (0, 3, 2, 2)
    assert cpu_pointwise.input_grad(x.shape, weight, grad_y).shape == (0, 4, 2, 2)
    idx = torch.tensor([2, 0])
    grad_w = cpu_pointwise.weight_grad_masked(x[:, idx].contiguous(), grad_y, idx, (3, 4, 1, 1))
    assert grad_w.shape == (3, 4, 1, 1) and torch.all(grad_w == 0)


def test_the_timed_choice_is_made_once_per_key_and_threads_are_part_of_it(monkeypatch):
    monkeypatch.delenv("TRADY_CPU_POINTWISE", raising=False)
    x, weight, bias, _ = _case(2, 3, 4, 5, 5, seed=4)
    y_ref = F.conv2d(x, weight, bias)
    times = iter([3.0, 1.0, 2.0])         # batched, flat, aten in that order: flat wins
    chooser = PathChooser(timer=lambda fn: (fn(), next(times))[1])
    torch.testing.assert_close(cpu_pointwise.forward(x, weight, bias, chooser=chooser), y_ref)
    (key, winner), = chooser.choices.items()
    assert winner == "flat" and key[-1] == torch.get_num_threads()
    # a second call looks the winner up: timing again would exhaust ``times``
    torch.testing.assert_close(cpu_pointwise.forward(x, weight, bias, chooser=chooser), y_ref)
    threads = torch.get_num_threads()
    other = 2 if threads == 1 else 1
    times = iter([1.0, 2.0, 3.0])
    try:
        torch.set_num_threads(other)      # another thread count is another key: timed again
        cpu_pointwise.forward(x, weight, bias, chooser=chooser)
    finally:
        torch.set_num_threads(threads)
    assert sorted(chooser.choices.values()) == ["batched", "flat"]


def test_a_bad_pin_names_the_variable_and_the_allowed_values(monkeypatch):
    monkeypatch.setenv("TRADY_CPU_POINTWISE", "gemm")
    x, weight, bias, _ = _case(1, 2, 2, 2, 2, seed=1)
    with pytest.raises(ValueError, match=r"TRADY_CPU_POINTWISE='gemm'.*'batched', 'flat'"):
        cpu_pointwise.forward(x, weight, bias)


@pytest.mark.parametrize("form", FORMS + ["timed"])
def test_cpu_kernels_routes_1x1_convs_through_every_form_exactly(monkeypatch, form):
    monkeypatch.setenv("TRADY_CPU_POINTWISE", form)
    x, weight, bias, grad_y = _case(3, 6, 5, 4, 3, seed=9)
    y_ref, dx_ref, dw_ref = _autograd(x, weight, bias, grad_y)
    conv = ((1, 1), (0, 0), (1, 1), 1)
    assert cpu_kernels._pointwise(x, weight, conv[0], conv[1], 1)
    torch.testing.assert_close(cpu_kernels.conv2d(x, weight, bias, *conv), y_ref,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cpu_kernels.conv2d_input_grad(x.shape, weight, grad_y, *conv),
                               dx_ref, rtol=1e-12, atol=1e-12)
    idx = torch.tensor([4, 1], dtype=torch.int32)
    grad_w = cpu_kernels.conv2d_weight_grad_masked(x[:, idx.long()].contiguous(), grad_y, idx,
                                                   tuple(weight.shape), *conv)
    torch.testing.assert_close(grad_w[:, idx.long()], dw_ref[:, idx.long()],
                               rtol=1e-12, atol=1e-12)
