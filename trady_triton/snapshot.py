"""What the user had: an exact undo for a failed convert(), and the flags revert() restores.

* :class:`ModelSnapshot` records everything convert() may change on a model:
  every module's attributes (its children, parameters, buffers and hook
  dictionaries by content, its training flag), every parameter's
  ``requires_grad`` and every buffer's value. ``restore()`` puts it all back
  in place, so a convert() that fails half-way leaves the model as it was.
* :class:`UserFlags` records only the user's ``requires_grad`` and training
  flags, by name (plain data: it keeps no reference to the model); revert()
  restores them while keeping the trained values.
* :func:`training_flags_and_buffers_kept` wraps the profiling forward, so that
  a successful convert() does not change them either.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn


def _module_state(module: nn.Module) -> dict:
    """Attribute name -> (object, copy of its contents when it is a container)."""
    return {key: (value, value.copy() if isinstance(value, (dict, set)) else None)
            for key, value in module.__dict__.items()}


def _restore_module(module: nn.Module, state: dict) -> None:
    for key in set(module.__dict__) - set(state):
        del module.__dict__[key]
    for key, (value, contents) in state.items():
        if contents is not None:
            # the same container object, refilled: hook handles refer to it
            value.clear()
            value.update(contents)
        module.__dict__[key] = value


def _buffer_values(model: nn.Module) -> list:
    with torch.no_grad():
        return [(b, b.clone()) for b in model.buffers()]


def _put_back(buffer_values: list) -> None:
    with torch.no_grad():
        for buffer, value in buffer_values:
            if not torch.equal(buffer, value):   # untouched buffers keep their version
                buffer.copy_(value)


class ModelSnapshot:
    """Everything of ``model`` that convert() could change, restorable in place."""

    def __init__(self, model: nn.Module):
        self._modules = [(m, _module_state(m)) for m in model.modules()]
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self._buffers = _buffer_values(model)

    def restore(self) -> None:
        for module, state in self._modules:
            _restore_module(module, state)
        for parameter, flag in self._requires_grad:
            parameter.requires_grad_(flag)
        _put_back(self._buffers)


@contextmanager
def training_flags_and_buffers_kept(model: nn.Module):
    """Run a forward (e.g. profiling) that leaves training flags and buffers as they were.

    A profiling forward in train mode would otherwise update the running
    statistics of train-mode BatchNorm (``freeze_bn_stats=False``).
    """
    training = [(m, m.training) for m in model.modules()]
    buffers = _buffer_values(model)
    try:
        yield
    finally:
        for module, flag in training:
            module.training = flag
        _put_back(buffers)


class UserFlags:
    """The user's ``requires_grad`` of each parameter and training flag of each module."""

    def __init__(self, model: nn.Module):
        self.requires_grad = {name: p.requires_grad
                              for name, p in model.named_parameters(remove_duplicate=False)}
        self.training = {name: m.training for name, m in model.named_modules(remove_duplicate=False)}

    def restore(self, model: nn.Module) -> None:
        """Apply the recorded flags to ``model`` (names the model no longer has are skipped)."""
        for name, parameter in model.named_parameters(remove_duplicate=False):
            if name in self.requires_grad:
                parameter.requires_grad_(self.requires_grad[name])
        for name, module in model.named_modules(remove_duplicate=False):
            if name in self.training:
                module.training = self.training[name]
