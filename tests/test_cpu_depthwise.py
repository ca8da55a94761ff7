"""The numba depthwise convolutions (trady_triton.cpu_depthwise) against float64 autograd.

Forward and dX of multiplier-1 depthwise convs: odd and tiny planes, one image and odd
batches, one and odd channel counts, 3x3 / 5x5 / 7x7, stride 1 and 2, padding k // 2 and
0, with and without bias, float32 and float64, outputs NaN-poisoned before the loop
writes them; the masked dW of a random channel subset likewise. Then what the loops refuse, the timed choice and its pin, and routing
through ``cpu_kernels``.
"""

import pytest
import torch
import torch.nn.functional as F

from trady_triton import cpu_depthwise, cpu_kernels
from trady_triton.fastest import PathChooser

from _requirements import require_module


@pytest.fixture(autouse=True)
def _needs_numba():
    """numba is a dependency: missing, the tests skip locally and fail under CI=true."""
    require_module("numba", "pip install numba (a dependency of trady_triton)")

# (n, c, h, w, kernel, stride, padding)
CASES = [(1, 1, 1, 1, 3, 1, 1), (1, 1, 1, 1, 3, 2, 1), (3, 5, 7, 9, 3, 1, 1),
         (3, 5, 7, 9, 3, 2, 1), (2, 3, 2, 3, 5, 2, 2), (1, 7, 9, 7, 5, 1, 2),
         (3, 4, 8, 8, 5, 2, 2), (2, 3, 9, 7, 7, 2, 3), (2, 3, 6, 5, 7, 1, 3),
         (2, 3, 6, 6, 3, 2, 0), (3, 2, 6, 5, 3, 1, 0), (2, 3, 5, 8, 5, 2, 1)]
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _oracle(case, with_bias, seed):
    """float64 inputs, and y, dY, dX of plain autograd."""
    n, c, h, w, k, stride, pad = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c, 1, k, k, generator=g, dtype=torch.float64)
    bias = torch.randn(c, generator=g, dtype=torch.float64) if with_bias else None
    y = F.conv2d(x, weight, bias, stride, pad, 1, c)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(grad_y)
    return x.detach(), weight, bias, y.detach(), grad_y, x.grad


def _as(t, dtype):
    return None if t is None else t.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n%d-c%d-%dx%d-k%d-s%d-p%d" % c)
def test_forward_and_input_grad_equal_float64_autograd(case, with_bias, dtype):
    x, weight, bias, y, grad_y, grad_x = _oracle(case, with_bias, seed=sum(case))
    _, _, _, _, k, stride, pad = case
    x, weight, bias, grad_y = (_as(t, dtype) for t in (x, weight, bias, grad_y))
    assert cpu_depthwise.serves(x, weight, bias, (stride, stride), (pad, pad), (1, 1), x.shape[1])
    out = torch.full(y.shape, float("nan"), dtype=dtype)
    got = cpu_depthwise.forward(x, weight, bias, stride, pad, out=out)
    assert got is out
    torch.testing.assert_close(got.double(), y, **TOL[dtype])
    out = torch.full(x.shape, float("nan"), dtype=dtype)
    got = cpu_depthwise.input_grad(x.shape, weight, grad_y, stride, pad, out=out)
    assert got is out
    torch.testing.assert_close(got.double(), grad_x, **TOL[dtype])



def _weight_grad_oracle(case, kept, seed):
    """float64 x, dY, a random subset ``idx`` of ``kept`` channels, and autograd's dW
    with the rows outside ``idx`` zeroed."""
    n, c, h, w, k, stride, pad = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(c, 1, k, k, generator=g, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, weight, None, stride, pad, 1, c)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(grad_y)
    idx = torch.randperm(c, generator=g)[:kept]
    expected = torch.zeros_like(weight)
    expected[idx] = weight.grad[idx]
    return x, grad_y, idx, expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n%d-c%d-%dx%d-k%d-s%d-p%d" % c)
def test_masked_weight_grad_equals_float64_autograd(case, dtype):
    _, c, _, _, k, stride, pad = case
    for kept in sorted({1, (c + 1) // 2, c}):
        x, grad_y, idx, expected = _weight_grad_oracle(case, kept, seed=sum(case) + kept)
        x_compact, grad_y = x[:, idx].contiguous().to(dtype), grad_y.to(dtype)
        conv = ((stride, stride), (pad, pad), (1, 1), c)
        assert cpu_depthwise.serves_weight_grad(x_compact, grad_y, idx, expected.shape, *conv)
        rows = torch.full((kept, k, k), float("nan"), dtype=dtype)     # poisoned: all written
        cpu_depthwise.run(cpu_depthwise._WEIGHT_GRAD_MASKED, x_compact.numpy(), grad_y.numpy(),
                          idx.numpy(), rows.numpy(), stride, pad)
        torch.testing.assert_close(rows.double(), expected[idx, 0], **TOL[dtype])
        got = cpu_depthwise.weight_grad_masked(x_compact, grad_y, idx, expected.shape, stride, pad)
        assert got.dtype == dtype and got.shape == expected.shape
        torch.testing.assert_close(got.double(), expected, **TOL[dtype])
        unselected = torch.ones(c, dtype=torch.bool)
        unselected[idx] = False
        assert (got[unselected] == 0).all()


def _weight_grad_refused():
    """(reason, x_compact, grad_y, idx, weight_shape, conv): masked dW calls not served."""
    x, gy, idx = torch.randn(2, 2, 6, 6), torch.randn(2, 4, 6, 6), torch.tensor([0, 3])
    one = ((1, 1), (1, 1), (1, 1), 4)
    yield "groups 1", x, torch.randn(2, 5, 6, 6), idx, (5, 4, 3, 3), one[:3] + (1,)
    yield "even kernel", x, torch.randn(2, 4, 7, 7), idx, (4, 1, 2, 2), one
    yield "stride 3", x, torch.randn(2, 4, 2, 2), idx, (4, 1, 3, 3), ((3, 3),) + one[1:]
    yield "dilation 2", x, torch.randn(2, 4, 4, 4), idx, (4, 1, 3, 3), ((1, 1), (1, 1), (2, 2), 4)
    yield "idx and x_compact disagree", x, gy, torch.tensor([1]), (4, 1, 3, 3), one
    yield "dY of another size", x, torch.randn(2, 4, 5, 5), idx, (4, 1, 3, 3), one
    yield "non-contiguous", x.transpose(2, 3), gy, idx, (4, 1, 3, 3), one
    yield "mixed dtypes", x.double(), gy, idx, (4, 1, 3, 3), one
    yield "half precision", x.half(), gy.half(), idx, (4, 1, 3, 3), one


@pytest.mark.parametrize("reason, x_compact, grad_y, idx, weight_shape, conv",
                         list(_weight_grad_refused()), ids=[r[0] for r in _weight_grad_refused()])
def test_refused_masked_weight_grads_go_to_the_reference(reason, x_compact, grad_y, idx,
                                                         weight_shape, conv):
    assert not cpu_depthwise.serves_weight_grad(x_compact, grad_y, idx, weight_shape, *conv)


@pytest.mark.parametrize("path", ["numba", "aten", "timed"])
@pytest.mark.parametrize("stride", [1, 2])
def test_cpu_kernels_routes_depthwise_weight_grads_exactly(monkeypatch, path, stride):
    monkeypatch.setenv("TRADY_CPU_DEPTHWISE", path)
    x, grad_y, idx, expected = _weight_grad_oracle((3, 5, 9, 7, 3, stride, 1), 2, seed=5)
    got = cpu_kernels.conv2d_weight_grad_masked(x[:, idx].contiguous(), grad_y, idx,
                                                tuple(expected.shape), (stride, stride), (1, 1),
                                                (1, 1), 5)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)

@pytest.mark.parametrize("threads", [1, 2])
def test_serial_and_parallel_builds_agree(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for case in [(5, 3, 9, 7, 3, 1, 1), (3, 7, 11, 10, 5, 2, 2)]:
            x, weight, bias, y, grad_y, grad_x = _oracle(case, True, seed=7)
            stride, pad = case[5], case[6]
            torch.testing.assert_close(cpu_depthwise.forward(x, weight, bias, stride, pad), y,
                                       rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(cpu_depthwise.input_grad(x.shape, weight, grad_y, stride,
                                                                pad), grad_x,
                                       rtol=1e-12, atol=1e-12)
            x, grad_y, idx, expected = _weight_grad_oracle(case, 3, seed=8)
            torch.testing.assert_close(
                cpu_depthwise.weight_grad_masked(x[:, idx].contiguous(), grad_y, idx,
                                                 expected.shape, stride, pad),
                expected, rtol=1e-12, atol=1e-12)
    finally:
        torch.set_num_threads(previous)


def _refused():
    """(reason, x, weight, bias, conv): calls the loops do not serve."""
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(4, 1, 3, 3)
    one = ((1, 1), (1, 1), (1, 1), 4)
    yield "groups 1", torch.randn(2, 1, 6, 6), torch.randn(4, 1, 3, 3), None, one[:3] + (1,)
    yield "multiplier 2", x, torch.randn(8, 1, 3, 3), None, one
    yield "even kernel", x, torch.randn(4, 1, 2, 2), None, one
    yield "non-square kernel", x, torch.randn(4, 1, 3, 5), None, ((1, 1), (1, 2), (1, 1), 4)
    yield "stride 3", x, w, None, ((3, 3), (1, 1), (1, 1), 4)
    yield "mixed stride", x, w, None, ((1, 2), (1, 1), (1, 1), 4)
    yield "dilation 2", x, w, None, ((1, 1), (2, 2), (2, 2), 4)
    yield "padding = kernel", x, w, None, ((1, 1), (3, 3), (1, 1), 4)
    yield "asymmetric padding", x, w, None, ((1, 1), (1, 0), (1, 1), 4)
    yield "string padding", x, w, None, ((1, 1), "same", (1, 1), 4)
    yield "half precision", x.half(), w.half(), None, one
    yield "mixed dtypes", x, w.double(), None, one
    yield "bias dtype", x, w, torch.randn(4, dtype=torch.float64), one
    yield "non-contiguous", x.transpose(2, 3), w, None, one
    yield "channels-last", x.contiguous(memory_format=torch.channels_last), w, None, one
    yield "empty batch", torch.randn(0, 4, 6, 6), w, None, one
    yield "3-D input", torch.randn(4, 6, 6), w, None, one


@pytest.mark.parametrize("reason, x, weight, bias, conv", list(_refused()),
                         ids=[r[0] for r in _refused()])
def test_refused_calls_go_to_aten(reason, x, weight, bias, conv):
    assert not cpu_depthwise.serves(x, weight, bias, *conv)
    assert not cpu_kernels._depthwise_loops(x, weight, bias, *conv)
    if x.dim() == 4 and x.dtype == weight.dtype and (bias is None or bias.dtype == x.dtype):
        expected = F.conv2d(x, weight, bias, *conv)
        torch.testing.assert_close(cpu_kernels.conv2d(x, weight, bias, *conv), expected)


def test_autocast_and_the_bench_switch_refuse_the_loops():
    x, w = torch.randn(2, 4, 6, 6), torch.randn(4, 1, 3, 3)
    conv = ((1, 1), (1, 1), (1, 1), 4)
    assert cpu_kernels._depthwise_loops(x, w, None, *conv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cpu_depthwise.serves(x, w, None, *conv)
    with cpu_kernels.pointwise_gemm(False):
        assert not cpu_kernels._depthwise_loops(x, w, None, *conv)


def test_bad_out_and_grad_shapes_raise_naming_the_parameter():
    x, w = torch.randn(2, 4, 6, 6), torch.randn(4, 1, 3, 3)
    with pytest.raises(ValueError, match="out"):
        cpu_depthwise.forward(x, w, None, 2, 1, out=torch.empty(2, 4, 6, 6))
    with pytest.raises(ValueError, match="grad_y"):
        cpu_depthwise.input_grad(x.shape, w, torch.randn(2, 4, 6, 6), 2, 1)
    with pytest.raises(ValueError, match="out"):
        cpu_depthwise.input_grad(x.shape, w, torch.randn(2, 4, 3, 3), 2, 1,
                                 out=torch.empty(2, 4, 6, 6, dtype=torch.float64))


def test_the_timed_choice_is_made_once_per_key_and_can_be_pinned(monkeypatch):
    monkeypatch.delenv("TRADY_CPU_DEPTHWISE", raising=False)
    times = {"numba": 2.0, "aten": 1.0}
    calls = []
    chooser = PathChooser(timer=lambda fn: times[fn()])
    x, w = torch.randn(1, 2, 4, 4), torch.randn(2, 1, 3, 3)

    def path(name):
        return lambda: calls.append(name) or name
    args = ("forward", x, w, 1, path("numba"), path("aten"))
    assert cpu_depthwise.fastest(*args, chooser=chooser) == "aten"
    times["aten"] = 9.0                 # not timed again: the cached winner stays
    calls.clear()
    assert cpu_depthwise.fastest(*args, chooser=chooser) == "aten"
    assert calls == ["aten"] and len(chooser.choices) == 1
    monkeypatch.setenv("TRADY_CPU_DEPTHWISE", "numba")
    assert cpu_depthwise.fastest(*args, chooser=chooser) == "numba"
    monkeypatch.setenv("TRADY_CPU_DEPTHWISE", "fast")
    with pytest.raises(ValueError, match="TRADY_CPU_DEPTHWISE"):
        cpu_depthwise.fastest(*args, chooser=chooser)


@pytest.mark.parametrize("path", ["numba", "aten", "timed"])
@pytest.mark.parametrize("stride", [1, 2])
def test_cpu_kernels_routes_depthwise_convs_exactly(monkeypatch, path, stride):
    monkeypatch.setenv("TRADY_CPU_DEPTHWISE", path)
    x, weight, bias, y, grad_y, grad_x = _oracle((3, 5, 9, 7, 3, stride, 1), True, seed=3)
    conv = ((stride, stride), (1, 1), (1, 1), 5)
    torch.testing.assert_close(cpu_kernels.conv2d(x, weight, bias, *conv), y,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cpu_kernels.conv2d_input_grad(x.shape, weight, grad_y, *conv),
                               grad_x, rtol=1e-12, atol=1e-12)


def test_one_thread_runs_the_serial_build_in_a_fresh_process():
    """numba's cache keys entries by function name and signature, not by ``parallel``:
    were both builds one entry, the serial one would load the parallel code, launch
    numba's OpenMP pool, and its idle workers would spin beside torch (bench/RESULTS.md,
    issue 11). Run twice so that the second process loads both builds from the cache."""
    import subprocess
    import sys
    script = (
        "import torch, numba, numba.np.ufunc.parallel as p\n"
        "from trady_triton import cpu_depthwise, cpu_kernels\n"
        "x, w = torch.randn(2, 3, 8, 8), torch.randn(3, 1, 3, 3)\n"
        "if sys.argv[1] == 'parallel':\n"
        "    torch.set_num_threads(2); cpu_depthwise.forward(x, w, None, 1, 1)\n"
        "    cpu_kernels.relu_forward_mask(x, 6.0)\n"
        "    raise SystemExit(0)\n"
        "torch.set_num_threads(1)\n"
        "cpu_depthwise.forward(x, w, None, 2, 1)\n"
        "cpu_depthwise.forward(x, w, None, 1, 1)\n"
        "cpu_kernels.relu_forward_mask(x, 6.0)\n"
        "try:\n"
        "    numba.threading_layer()\n"
        "except ValueError:\n"
        "    raise SystemExit(0)\n"
        "raise SystemExit('the threading layer was launched at one thread')\n")
    for mode in ("parallel", "serial", "parallel", "serial"):
        done = subprocess.run([sys.executable, "-c", "import sys\n" + script, mode],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (mode, done.stdout, done.stderr)
    builds = cpu_depthwise._FORWARD
    assert builds[0].py_func.__qualname__ != builds[1].py_func.__qualname__
