"""DistributedDataParallel with TraDy (see docs/DISTRIBUTED.md).

Every rank draws the same channels without communicating: draws are a pure
function of ``(seed, epoch)`` (``sampling.draw_seed``), so give every rank the
same ``seed`` in :func:`trady_triton.convert`.

DDP registers the parameters that require grad *when it is constructed* and
never looks again, while the controller switches ``weight.requires_grad`` at
every resample. So build a fresh DDP wrapper after each resample
(:func:`ddp_for_epoch`) and drop the previous one: its buckets then hold only
the layers trained this epoch (plus the classifier), and DDP's constructor
checks that every rank trains the same parameters. (Wrapping once with every
weight requiring grad and ``find_unused_parameters=True`` also gives the right
gradients, but allocates full-size gradient buckets and walks the autograd
graph at every step.)
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def ddp_for_epoch(controller, epoch: int, **ddp_kwargs) -> DistributedDataParallel:
    """``controller.resample(epoch)``, then a new DDP wrapper of ``controller.model``.

    ``ddp_kwargs`` go to DistributedDataParallel (``device_ids`` on GPU, ...).
    Replace the previous epoch's wrapper with the returned one.
    """
    controller.resample(epoch)
    if not any(p.requires_grad for p in controller.model.parameters()):
        raise RuntimeError("nothing to train this epoch (empty selection and no classifier): "
                           "DistributedDataParallel needs a parameter that requires grad")
    return DistributedDataParallel(controller.model, **ddp_kwargs)


def selection_digest(controller) -> int:
    """A 63-bit fingerprint of the current selection (layer names and channels)."""
    h = hashlib.sha256()
    for name in sorted(controller.selection):
        h.update(name.encode())
        h.update(b":" + ",".join(map(str, controller.selection[name].tolist())).encode() + b";")
    return int.from_bytes(h.digest()[:8], "little") >> 1


def check_selection_agrees(controller, group=None) -> None:
    """Raise on every rank if the ranks' selections differ (one all-gather of an int64).

    A debugging aid: ranks agree by construction when they share the seed.
    """
    device = next(controller.model.parameters()).device
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    mine = torch.tensor([selection_digest(controller)], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    values = [int(t) for t in gathered]
    if len(set(values)) != 1:
        raise RuntimeError(f"ranks drew different channels (digests {values}): give every rank "
                           f"the same seed and call resample() with the same epoch")
