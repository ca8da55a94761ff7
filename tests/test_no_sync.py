"""No host synchronisation inside a training step (the CUDA code path, on the CPU).

On a GPU, reading a tensor's values on the host (``.item()``, ``.tolist()``, ``bool(t)``,
``nonzero`` ...) waits for the device and breaks CUDA-graph capture. Without a GPU,
:class:`no_host_sync` stands in for ``torch.cuda.set_sync_debug_mode("error")``: it fails
on every aten op whose result size or value the host must read, and on ``Tensor.tolist``
/ ``Tensor.numpy`` (which bypass the dispatcher), except inside Triton's interpreter
(its numpy copies stand in for the GPU's memory). The step runs the Triton kernels
(``backend("triton")``): the path a CUDA tensor takes.
"""

import contextlib
import inspect

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import trady_triton as tt

from helpers import small_net

pytestmark = pytest.mark.usefixtures("one_thread")

aten = torch.ops.aten
# ops whose output size or value is known only after reading device memory
SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.unique_dim,
           aten._unique, aten._unique2, aten.unique_consecutive, aten.item, aten.equal,
           aten.is_nonzero}


class HostSync(AssertionError):
    pass


def _in_interpreter() -> bool:
    return any("triton/runtime/interpreter" in f.filename.replace("\\", "/")
               for f in inspect.stack(0))


class _DispatchGuard(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in SYNCING and not _in_interpreter():
            raise HostSync(f"{func} reads device values on the host")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync(monkeypatch):
    for name in ("tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def guarded(self, *a, _original=original, _name=name, **k):
            if not _in_interpreter():
                raise HostSync(f"Tensor.{_name} reads device values on the host")
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, guarded)
    try:
        with _DispatchGuard():
            yield
    finally:
        monkeypatch.undo()


X = torch.randn(4, 3, 11, 9, generator=torch.Generator().manual_seed(3))
T = torch.tensor([0, 3, 1, 4])


def _converted():
    net = small_net()
    with tt.backend("triton"):
        controller = tt.convert(net, 0.3, example_input=X, policy="d-fullrandom", seed=2)
    net.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    return net, controller, optimizer


def _step(net, optimizer):
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(net(X), T).backward()
    optimizer.step()


@pytest.mark.parametrize("guard", [".item()", ".tolist()", "bool(t)", "nonzero", ".numpy()"])
def test_the_guard_catches_each_kind_of_sync(guard, monkeypatch):
    t = torch.arange(3)
    actions = {".item()": lambda: t.sum().item(), ".tolist()": lambda: t.tolist(),
               "bool(t)": lambda: bool(t.any()), "nonzero": lambda: t.nonzero(),
               ".numpy()": lambda: t.numpy()}
    with pytest.raises(HostSync), no_host_sync(monkeypatch):
        actions[guard]()


def test_training_steps_after_resample_do_not_sync(monkeypatch):
    net, controller, optimizer = _converted()
    assert any(m.weight.shape[1] > len(channels) and m.groups == 1
               for name, channels in controller.selection.items()
               for m in [net.get_submodule(name)]), "some conv must be partly trained"
    with tt.backend("triton"):
        for epoch in (1, 2):
            controller.resample(epoch)          # the one place that reads indices
            with no_host_sync(monkeypatch):
                for _ in range(2):
                    _step(net, optimizer)


def test_an_unprepared_index_buffer_is_caught(monkeypatch):
    """The guard sees the kernels' own index check when resample did not run it."""
    net, controller, optimizer = _converted()
    name, channels = next(iter(controller.selection.items()))
    module = net.get_submodule(name)
    module.selected_channels = channels.clone()     # a new buffer, behind the controller
    with tt.backend("triton"), pytest.raises(HostSync), no_host_sync(monkeypatch):
        _step(net, optimizer)


@pytest.mark.parametrize("channels,error,message", [
    (torch.tensor([0, 9]), ValueError, r"in \[0, 8\); got min 0, max 9"),
    (torch.tensor([-1, 2]), ValueError, r"in \[0, 8\); got min -1"),
    (torch.tensor([2, 5, 2]), ValueError, "must not repeat; got 1 repeated"),
    (torch.tensor([1.0, 2.0]), TypeError, "1-D int32/int64 tensor"),
    (torch.tensor([[1, 2]]), TypeError, "1-D int32/int64 tensor"),
])
def test_selection_indices_are_checked_when_applied(channels, error, message):
    net, controller, _ = _converted()
    name = next(n for n, m in net.named_modules()
                if isinstance(m, nn.Conv2d) and m.in_channels == 8 and m.groups == 1)
    with pytest.raises(error, match=rf"selection\['{name}'\].*{message}"):
        controller.apply_selection({name: channels})
