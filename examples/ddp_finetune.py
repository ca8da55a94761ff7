"""TraDy fine-tuning with DistributedDataParallel, launched by torchrun.

    torchrun --standalone --nproc_per_node=2 examples/ddp_finetune.py --epochs 3

(gloo on CPU; with GPUs it picks nccl and one device per rank.) Every rank
converts the same model with the same seed, so every rank draws the same
channels at each epoch without communicating; a fresh DDP wrapper is built
after each resample (trady_triton.distributed.ddp_for_epoch). A tiny synthetic
task keeps the example self-contained; put your model and data loader instead.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn as nn

import trady_triton as tt
from trady_triton.distributed import check_selection_agrees, ddp_for_epoch


def tiny_net(classes=4):
    torch.manual_seed(0)   # same initial weights on every rank (DDP also broadcasts rank 0's)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, classes))


def batches(rank, world, epoch, steps, batch, device):
    """Synthetic (inputs, labels); each rank takes its shard of a shared global batch."""
    for step in range(steps):
        g = torch.Generator().manual_seed(10_000 * epoch + step)
        x = torch.randn(batch * world, 3, 8, 8, generator=g)
        y = torch.randint(0, 4, (batch * world,), generator=g)
        mine = slice(rank * batch, (rank + 1) * batch)
        yield x[mine].to(device), y[mine].to(device)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="per rank")
    parser.add_argument("--keep-ratio", type=float, default=0.2)
    parser.add_argument("--out", default=None, help="checkpoint written by rank 0")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")     # env:// from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    model = tiny_net().to(device)
    example = next(batches(rank, world, 0, 1, args.batch, device))[0]
    controller = tt.convert(model, args.keep_ratio, example_input=example, policy="d-fullrandom",
                            seed=1234)   # the same seed on every rank: the same draws
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    controller.mask_optimizer(optimizer)   # momentum must not move unselected channels
    ddp_kwargs = {"device_ids": [device.index]} if use_cuda else {}

    for epoch in range(args.epochs):
        ddp = ddp_for_epoch(controller, epoch, **ddp_kwargs)   # resample, then re-wrap
        check_selection_agrees(controller)                       # optional sanity check
        model.train()
        for x, y in batches(rank, world, epoch, args.steps, args.batch, device):
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(ddp(x), y)
            loss.backward()
            optimizer.step()
        print(f"rank {rank} epoch {epoch} loss {loss.item():.4f} "
              f"layers trained {len(controller.selection)}", flush=True)
        del ddp

    if rank == 0 and args.out:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "controller": controller.state_dict()}, args.out)
    # Both ranks tear gloo down together: a rank leaving while the other still
    # saves can abort the process ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
