"""convert() is all or nothing: a failure at any step leaves the model exactly as the user had it.

The injection test raises at the first and at the last call of every function of
the package that convert() runs (found by tracing one successful convert()), so
every step is covered, the module swaps and the profiling forward included.
"""

import inspect
import os
import sys

import pytest
import torch
import torch.nn as nn

import trady_triton as tt
from trady_triton.models import build_model
from trady_triton.ranking import LayerRanking

from helpers import assert_same_model_state, model_state, small_net

PACKAGE = os.path.dirname(tt.__file__)


def _in_package(frame) -> bool:
    """A frame of the package's own functions (generators excluded: the call event of a
    generator's finalisation cannot raise into convert())."""
    code = frame.f_code
    return code.co_filename.startswith(PACKAGE) and not code.co_flags & inspect.CO_GENERATOR


class Injected(BaseException):
    """Not an Exception, like KeyboardInterrupt: a bare ``except Exception`` cannot hide it."""


def _user_touched_small_net():
    """small_net with some user state convert() must not lose: freezing, eval parts, hooks."""
    net = small_net()
    net[0].weight.requires_grad_(False)
    net[3].conv[1].eval()
    net[4].conv[0].register_forward_hook(lambda module, args, output: None)
    net.register_forward_pre_hook(lambda module, args: None)
    return net


def _mbv2():
    torch.manual_seed(0)
    model = build_model("mbv2-w0.35-arch", num_classes=10)
    model.features[1].requires_grad_(False)
    return model


def _package_calls(run) -> list[tuple[str, str]]:
    """(file, function) of every call into the package while ``run()`` executes, in order."""
    calls = []

    def tracer(frame, event, arg):
        if event == "call" and _in_package(frame):
            calls.append((os.path.basename(frame.f_code.co_filename), frame.f_code.co_name))
    sys.settrace(tracer)
    try:
        run()
    finally:
        sys.settrace(None)
    return calls


def _raise_at(call_number: int):
    """A tracer that raises Injected at the ``call_number``-th call into the package."""
    seen = 0

    def tracer(frame, event, arg):
        nonlocal seen
        if event == "call" and _in_package(frame):
            seen += 1
            if seen == call_number:
                raise Injected(frame.f_code.co_name)
    return tracer


def _injection_points(calls, with_last: bool) -> list[int]:
    """1-based call numbers of the first (and the last) call of each distinct function."""
    first, last = {}, {}
    for number, call in enumerate(calls, start=1):
        first.setdefault(call, number)
        last[call] = number
    return sorted(set(first.values()) | (set(last.values()) if with_last else set()))


# name -> (model, example input, inject at last calls too); MobileNetV2 at first calls only,
# for time (it takes ~0.1 s a convert)
CASES = {
    "small-net": (_user_touched_small_net, lambda: torch.randn(2, 3, 15, 13), True),
    "small-net-lazy": (_user_touched_small_net, lambda: None, True),
    "mbv2-w0.35": (_mbv2, lambda: torch.randn(1, 3, 32, 32), False),
}


@pytest.mark.filterwarnings("ignore:no layer ranking")
@pytest.mark.parametrize("case", list(CASES))
def test_a_failure_injected_at_every_step_of_convert_leaves_the_model_unchanged(case):
    make_model, make_input, with_last = CASES[case]
    example_input = make_input()
    tt.convert(make_model(), 0.2, example_input=example_input)   # fills caches (shipped rankings)
    traced = make_model()
    calls = _package_calls(lambda: tt.convert(traced, 0.2, example_input=example_input))
    steps = {("convert.py", "swap_modules"), ("convert.py", "_trady_copy"),
             ("convert.py", "_set_child"), ("controller.py", "__init__"),
             ("controller.py", "_freeze_all"), ("snapshot.py", "__init__")}
    if example_input is None:
        steps |= {("controller.py", "install_lazy_profiling")}
    else:
        steps |= {("profile.py", "profile_model"), ("controller.py", "_budget_for"),
                  ("controller.py", "resample"), ("controller.py", "apply_selection"),
                  ("controller.py", "_wire_fusions"), ("sampling.py", "draw"),
                  ("layers.py", "forward")}
    assert steps <= set(calls), steps - set(calls)     # the trace really saw convert's steps
    model = make_model()   # one model for all: restores that drift would add up
    before = model_state(model)
    for number in _injection_points(calls, with_last):
        sys.settrace(_raise_at(number))
        try:
            with pytest.raises(Injected):
                tt.convert(model, 0.2, example_input=example_input)
        finally:
            sys.settrace(None)
        assert_same_model_state(before, model_state(model))
        assert "_trady_controller" not in vars(model)
    tt.convert(model, 0.2, example_input=example_input)   # and a retry succeeds


def _assert_convert_fails_and_leaves_model(model, error, match, **kwargs):
    before = model_state(model)
    with pytest.raises(error, match=match):
        tt.convert(model, **kwargs)
    assert_same_model_state(before, model_state(model))


def test_a_budget_below_the_cheapest_channel_leaves_the_model_and_a_retry_works():
    net = _user_touched_small_net()
    x = torch.randn(2, 3, 15, 13)
    _assert_convert_fails_and_leaves_model(net, ValueError, "smaller than the cheapest channel",
                                           keep_ratio=1e-9, example_input=x)
    controller = tt.convert(net, 0.2, example_input=x)
    assert controller.selection


def test_a_ranking_naming_unknown_layers_leaves_the_model():
    ranking = LayerRanking("small", {"0": 1.0, "no.such.layer": 2.0}, steps=1)
    _assert_convert_fails_and_leaves_model(
        _user_touched_small_net(), ValueError, "does not have", keep_ratio=0.2,
        ranking=ranking, example_input=torch.randn(2, 3, 15, 13))


class _ForwardRaises(nn.Module):
    """A user module that raises in its forward (during convert()'s profiling forward)."""

    def __init__(self):
        super().__init__()
        self.body = small_net()

    def forward(self, x):
        raise RuntimeError("user forward failed")


def test_a_profiling_forward_that_raises_leaves_the_model():
    _assert_convert_fails_and_leaves_model(_ForwardRaises(), RuntimeError,
                                           "user forward failed", keep_ratio=0.2,
                                           example_input=torch.randn(2, 3, 15, 13))


def test_only_unsupported_layers_found_after_swapping_the_rest_leaves_the_model():
    """BN and ReLU are swapped before convert() finds no trainable conv/linear."""
    net = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3, padding_mode="reflect",
                                                                padding=1),
                        nn.Flatten(), nn.Linear(4 * 25, 2))
    _assert_convert_fails_and_leaves_model(net, ValueError, "nothing to convert", keep_ratio=0.5,
                                           example_input=torch.randn(2, 3, 5, 5))


def test_a_keyboard_interrupt_during_the_profiling_forward_leaves_the_model(monkeypatch):
    import trady_triton.controller as controller_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(controller_module, "profile_model", interrupted)
    _assert_convert_fails_and_leaves_model(_user_touched_small_net(), KeyboardInterrupt, "",
                                           keep_ratio=0.2, example_input=torch.randn(2, 3, 15, 13))


def test_a_successful_convert_keeps_training_flags_and_train_mode_bn_statistics():
    net = _user_touched_small_net().train()
    net[3].conv[1].eval()
    x = torch.randn(2, 3, 15, 13)
    before = model_state(net)
    tt.convert(net, 0.2, example_input=x, freeze_bn_stats=False)
    after = model_state(net)
    assert after["training"] == before["training"]
    for name, value in before["state_dict"].items():   # BN running stats and counters too
        assert torch.equal(after["state_dict"][name], value), name
