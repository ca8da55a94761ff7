"""Measure what autograd really keeps for backward."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn


@dataclass
class SavedBytes:
    """Unique storages saved for backward during a ``with`` block."""

    total: int = 0
    storages: dict = field(default_factory=dict)   # data_ptr -> nbytes


@contextlib.contextmanager
def saved_tensor_bytes(model: nn.Module | None = None, on_new_storage=None):
    """Count bytes of the unique storages autograd saves inside the block.

    Storages of ``model``'s parameters and buffers are excluded: they are
    resident anyway, saving them costs nothing extra.

        with saved_tensor_bytes(model) as saved:
            loss = criterion(model(x), y)
        print(saved.total)

    ``on_new_storage(nbytes)``, when given, is called for each storage counted (as it is
    saved: :func:`trady_triton.accounting.saved_bytes_by_module` attributes it).
    """
    resident = set()
    if model is not None:
        for tensor in list(model.parameters()) + list(model.buffers()):
            resident.add(tensor.untyped_storage().data_ptr())
    result = SavedBytes()

    def pack(tensor):
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer and pointer not in resident and pointer not in result.storages:
            result.storages[pointer] = storage.nbytes()
            result.total += storage.nbytes()
            if on_new_storage is not None:
                on_new_storage(storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield result
