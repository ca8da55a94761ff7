"""Soak: hundreds of training steps over many epochs of resampling.

No growth in memory (bytes saved for backward per step, live tensors, process
RSS) and nothing left behind after revert(): no hooks on any module or on the
optimizer, no TraDy module types, no TraDy attributes.
"""

import gc
import os

import pytest
import torch
import torch.nn as nn

import trady_triton as tt
from trady_triton.convert import TRADY_TYPES

from helpers import small_net

STEPS, RESAMPLE_EVERY, WARMUP, BATCH = 300, 10, 60, 8
RSS_SLACK = 4 * 2 ** 20      # bytes of RSS growth tolerated after warm-up


pytestmark = pytest.mark.usefixtures("one_thread")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _hooks(module: nn.Module) -> int:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
             "_state_dict_hooks", "_load_state_dict_pre_hooks")
    return sum(len(getattr(module, name, {}) or {}) for name in names)


@pytest.mark.slow   # ~45 s on 2 cores; the per-step memory checks run in the default suite elsewhere
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_soak_memory_is_stable_and_revert_leaves_nothing():
    torch.manual_seed(0)
    net = small_net()
    global_hooks_before = (len(nn.modules.module._global_forward_hooks),
                           len(nn.modules.module._global_forward_pre_hooks))
    hooks_before = sum(_hooks(m) for m in net.modules())
    data = [(torch.randn(BATCH, 3, 8, 8), torch.randint(0, 5, (BATCH,))) for _ in range(7)]
    controller = tt.convert(net, 0.25, example_input=data[0][0], policy="d-fullrandom", seed=3)
    net.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    controller.mask_optimizer(optimizer)

    saved_per_epoch: dict[int, set[int]] = {}
    rss, tensors = [], None
    for step in range(STEPS):
        epoch = step // RESAMPLE_EVERY
        if step % RESAMPLE_EVERY == 0:
            controller.resample(epoch)
        x, y = data[step % len(data)]
        optimizer.zero_grad(set_to_none=True)
        with tt.saved_tensor_bytes(net) as saved:
            loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        del loss
        saved_per_epoch.setdefault(epoch, set()).add(saved.total)
        assert saved.total <= sum(controller.saved_bytes(BATCH).values()), step
        if step == WARMUP:
            tensors = _live_tensors()
        if step >= WARMUP and step % 10 == 0:
            gc.collect()
            rss.append(_rss())
    # the same selection saves the same bytes at every step: nothing accumulates
    assert all(len(values) == 1 for values in saved_per_epoch.values()), saved_per_epoch
    assert len({next(iter(v)) for v in saved_per_epoch.values()}) > 1     # really re-drawn
    assert _live_tensors() <= tensors + 8
    growth = max(rss) - rss[0]
    print(f"soak: {STEPS} steps, {len(saved_per_epoch)} epochs, saved bytes per step "
          f"{min(min(v) for v in saved_per_epoch.values())}..{max(max(v) for v in saved_per_epoch.values())}, "
          f"RSS {rss[0] / 2**20:.1f} MiB -> max {max(rss) / 2**20:.1f} MiB (growth {growth / 2**10:.0f} KiB)")
    assert growth <= RSS_SLACK, f"RSS grew by {growth} bytes after warm-up"
    # no module holds a compact copy between steps
    assert all(getattr(m, "_fused_input", None) is None for m in net.modules())

    controller.revert()
    assert not any(isinstance(m, TRADY_TYPES) for m in net.modules())
    assert sum(_hooks(m) for m in net.modules()) == hooks_before == 0
    assert (len(nn.modules.module._global_forward_hooks),
            len(nn.modules.module._global_forward_pre_hooks)) == global_hooks_before
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    for module in net.modules():
        assert "selected_channels" not in module._buffers
        for attribute in ("_fused_input", "_fused_output", "_fuse_with", "_trady_original_class"):
            assert attribute not in module.__dict__, (module, attribute)
    assert all(p.requires_grad for p in net.parameters())
    net(data[0][0]).sum().backward()          # a plain model again
