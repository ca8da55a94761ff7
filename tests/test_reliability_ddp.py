"""DistributedDataParallel, gloo, 2 processes on this machine (started here, time-bounded).

Each rank draws its channels alone (same seed, no communication); gradients and
weights equal those of one process on the concatenated batch (float64, to float
rounding: DDP sums in another order), across epochs of resampling, with a
masked momentum optimizer. The documented torchrun launch is run too.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

EPOCHS, STEPS, PER_RANK, WORLD = 3, 2, 2, 2
TIMEOUT_S = 120
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(epoch, step):
    g = torch.Generator().manual_seed(1000 * epoch + step)
    x = torch.randn(PER_RANK * WORLD, 3, 15, 13, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 5, (PER_RANK * WORLD,), generator=g)


def _setup():
    import trady_triton as tt
    from helpers import small_net
    net = small_net().double()
    controller = tt.convert(net, 0.3, example_input=_batch(0, 0)[0], policy="d-fullrandom", seed=7)
    net.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    controller.mask_optimizer(optimizer)
    return net, controller, optimizer


def _grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def _worker(rank, port, out_dir, fail_digest_check):
    import torch.distributed as dist
    from trady_triton.distributed import check_selection_agrees, ddp_for_epoch
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        net, controller, optimizer = _setup()
        record = {"grads": [], "selections": []}
        for epoch in range(EPOCHS):
            model = ddp_for_epoch(controller, epoch)        # resample + fresh DDP wrapper
            record["selections"].append({k: v.tolist() for k, v in controller.selection.items()})
            for step in range(STEPS):
                x, y = _batch(epoch, step)
                mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
                optimizer.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x[mine]), y[mine]).backward()
                record["grads"].append(_grads(net))
                optimizer.step()
        check_selection_agrees(controller)
        if fail_digest_check:            # one rank draws another epoch: must be caught
            if rank == 1:
                controller.resample(EPOCHS + 5)
            try:
                check_selection_agrees(controller)
                record["mismatch_caught"] = False
            except RuntimeError:
                record["mismatch_caught"] = True
        record["state"] = {k: v.clone() for k, v in net.state_dict().items()}
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process():
    net, controller, optimizer = _setup()
    record = {"grads": [], "selections": []}
    for epoch in range(EPOCHS):
        controller.resample(epoch)
        record["selections"].append({k: v.tolist() for k, v in controller.selection.items()})
        for step in range(STEPS):
            x, y = _batch(epoch, step)
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x), y).backward()
            record["grads"].append(_grads(net))
            optimizer.step()
    record["state"] = net.state_dict()
    return record


def test_ddp_two_gloo_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    context = mp.get_context("spawn")
    port = _free_port()
    processes = [context.Process(target=_worker, args=(rank, port, str(tmp_path), True))
                 for rank in range(WORLD)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(TIMEOUT_S)
    alive = [p for p in processes if p.is_alive()]
    for process in alive:
        process.kill()
        process.join(5)
    assert not alive, f"DDP workers did not finish in {TIMEOUT_S} s"
    assert [p.exitcode for p in processes] == [0] * WORLD
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = _single_process()
    # identical draws on every rank, without communication, and equal to one process's
    assert ranks[0]["selections"] == ranks[1]["selections"] == single["selections"]
    assert len({str(s) for s in single["selections"]}) == EPOCHS     # really re-drawn
    assert all(r["mismatch_caught"] for r in ranks)
    for step, expected in enumerate(single["grads"]):
        for record in ranks:
            assert sorted(record["grads"][step]) == sorted(expected), step
            for key, grad in expected.items():      # DDP averages the per-rank gradients
                torch.testing.assert_close(record["grads"][step][key], grad,
                                           rtol=1e-12, atol=1e-15)
    for key, value in single["state"].items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-12, atol=1e-15)
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key


@pytest.mark.slow   # torchrun start-up; the two-process gloo equality test stays in the default run
def test_documented_torchrun_launch_runs(tmp_path):
    script = ROOT / "examples" / "ddp_finetune.py"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(script), "--epochs", "2", "--steps", "2",
               "--out", str(tmp_path / "final.pt")]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 epoch 1" in done.stdout
    state = torch.load(tmp_path / "final.pt", weights_only=True)
    assert "model" in state and "controller" in state
