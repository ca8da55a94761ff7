"""The per-shape choice between the Triton weight-gradient kernel and the vendor path:
both paths exact, the choice made once per key by timing and cached, the pin honoured.
A stand-in timer replaces CUDA-event timing (no GPU needed)."""

import pytest
import torch

from trady_triton import fastest, reference

from helpers import make_idx

pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("stride,padding,dilation", [((1, 1), (0, 0), (1, 1)),
                                                     ((2, 1), (1, 2), (1, 2))])
def test_vendor_conv_path_equals_the_reference(stride, padding, dilation):
    idx = make_idx("shuffled", 9, "cpu", dtype=torch.int64, seed=2)
    x = _rand(3, 9, 7, 8)
    weight_shape = (5, 9, 3, 2)
    xc = x[:, idx].contiguous()
    y_shape = torch.nn.functional.conv2d(x, torch.zeros(weight_shape, dtype=x.dtype),
                                         stride=stride, padding=padding, dilation=dilation).shape
    dy = _rand(*y_shape, seed=1)
    got = fastest.vendor_conv2d_weight_grad_masked(xc, dy, idx, weight_shape, stride, padding,
                                                   dilation)
    want = reference.conv2d_weight_grad_masked(xc, dy, idx, weight_shape, stride, padding,
                                               dilation, 1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    unselected = torch.ones(9, dtype=torch.bool)
    unselected[idx] = False
    assert torch.all(got[:, unselected] == 0)


def test_vendor_linear_path_equals_the_reference():
    idx = make_idx("reversed", 11, "cpu", dtype=torch.int32)
    x = _rand(2, 5, 11)
    dy = _rand(2, 5, 4, seed=3)
    xc = x[..., idx.long()].contiguous()
    got = fastest.vendor_linear_weight_grad_masked(xc, dy, idx, 11)
    want = reference.linear_weight_grad_masked(xc, dy, idx, 11)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


class StandInTimer:
    """Returns fixed times per path and counts the calls."""

    def __init__(self, ms):
        self.ms, self.calls = ms, []

    def __call__(self, fn):
        result = fn()
        name = "triton" if getattr(result, "_from", None) == "triton" else "vendor"
        self.calls.append(name)
        return self.ms[name]


def _candidates(log):
    def make(name):
        def run():
            log.append(name)
            out = torch.full((2,), float(name == "triton"))
            out._from = name
            return out
        return run
    return {"triton": make("triton"), "vendor": make("vendor")}


@pytest.mark.parametrize("ms,winner", [({"triton": 0.02, "vendor": 0.05}, "triton"),
                                       ({"triton": 0.09, "vendor": 0.03}, "vendor")])
def test_the_faster_path_wins_and_is_timed_once_per_key(ms, winner, monkeypatch):
    monkeypatch.delenv("TRADY_WGRAD_PATH", raising=False)
    timer = StandInTimer(ms)
    chooser = fastest.PathChooser(timer)
    log = []
    for _ in range(3):
        chooser.run(("conv2d", (1, 2), torch.float32, "cuda"), _candidates(log))
    assert sorted(timer.calls) == ["triton", "vendor"]        # each timed once
    assert log[2:] == [winner] * 3                            # then only the winner runs
    chooser.run(("conv2d", (1, 3), torch.float32, "cuda"), _candidates(log))
    assert len(timer.calls) == 4 and len(chooser.choices) == 2   # a new shape is timed anew
    assert winner in chooser.table() and "| conv2d |" in chooser.table()


def test_the_pinned_path_skips_the_timing(monkeypatch):
    monkeypatch.setenv("TRADY_WGRAD_PATH", "vendor")
    timer = StandInTimer({"triton": 0.01, "vendor": 1.0})
    log = []
    fastest.PathChooser(timer).run(("linear",), _candidates(log))
    assert timer.calls == [] and log == ["vendor"]


def test_a_bad_pin_names_the_allowed_values(monkeypatch):
    monkeypatch.setenv("TRADY_WGRAD_PATH", "cudnn")
    with pytest.raises(ValueError, match="TRADY_WGRAD_PATH='cudnn'.*timed.*triton.*vendor"):
        fastest.PathChooser(StandInTimer({})).run(("linear",), _candidates([]))


def test_the_dispatch_functions_key_by_shape_and_call_the_kernels(monkeypatch):
    """``conv2d_weight_grad_masked`` with a stand-in kernels module: both candidates give
    the reference's answer, and the cache key holds shapes, strides and dtype."""
    monkeypatch.delenv("TRADY_WGRAD_PATH", raising=False)
    chooser = fastest.PathChooser(lambda fn: (fn(), 1.0)[1])
    idx = torch.tensor([4, 0, 2])
    xc, dy = _rand(2, 3, 6, 6), _rand(2, 4, 6, 6, seed=5)
    args = (xc, dy, idx, (4, 5, 3, 3), (1, 1), (1, 1), (1, 1))
    out = fastest.conv2d_weight_grad_masked(*args, 1, kernels=reference, chooser=chooser)
    torch.testing.assert_close(out, reference.conv2d_weight_grad_masked(*args, 1))
    (key,) = chooser.choices
    assert key[0] == "conv2d" and (xc.shape, xc.stride()) in [key[1][0]] and torch.float64 in key
