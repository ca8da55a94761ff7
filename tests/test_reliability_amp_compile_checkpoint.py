"""torch.autocast, torch.compile and torch.utils.checkpoint on a converted model."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import trady_triton as tt
from trady_triton import reference
from trady_triton.optim import owned_entries

from helpers import small_net

X = torch.randn(8, 3, 15, 13, generator=torch.Generator().manual_seed(1))
T = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])


pytestmark = pytest.mark.usefixtures("one_thread")


def _converted(seed=1, dtype=torch.float32):
    net = small_net().to(dtype)
    controller = tt.convert(net, 0.3, example_input=X.to(dtype), policy="d-fullrandom", seed=seed)
    net.train()
    return net, controller


def _grads(model, x=X, autocast_dtype=None, owner=None, loss_scale=1.0):
    """Loss, gradients, saved bytes. ``loss_scale`` does what torch.amp.GradScaler does
    (float16 gradients of ~1e-5 would be subnormal otherwise)."""
    owner = owner or model
    owner.zero_grad(set_to_none=True)
    with tt.saved_tensor_bytes(owner) as saved:
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            loss = nn.functional.cross_entropy(model(x), T)
    (loss * loss_scale).backward()
    grads = {n: p.grad / loss_scale for n, p in owner.named_parameters() if p.grad is not None}
    return loss.detach(), grads, saved.total


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- autocast
def _without_kinks(net):
    """The same net with its ReLU/ReLU6 replaced by Identity.

    With kinks, a pre-activation within rounding distance of 0 or 6 flips its mask
    bit in float16/bfloat16 and moves one channel's gradient a lot (PyTorch's own
    autocast does the same, at other positions): precision is compared without them.
    """
    for name, module in list(net.named_modules()):
        if isinstance(module, (nn.ReLU, nn.ReLU6)):
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, nn.Identity())
    return net


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", [1, 2])
def test_autocast_gradients_within_dtype_tolerance_of_float32(dtype, seed):
    net = _without_kinks(small_net())
    controller = tt.convert(net, 0.3, example_input=X, policy="d-fullrandom", seed=seed)
    net.train()
    plain = _without_kinks(small_net()).eval()   # unconverted twin: PyTorch's own autocast
    _, g32, _ = _grads(net)
    _, gamp, _ = _grads(net, autocast_dtype=dtype, loss_scale=2.0 ** 12)
    _, p32, _ = _grads(plain)
    _, pamp, _ = _grads(plain, autocast_dtype=dtype, loss_scale=2.0 ** 12)
    assert sorted(gamp) == sorted(g32) and len(controller.selection) >= 3
    eps = torch.finfo(dtype).eps
    for key, grad in gamp.items():
        assert grad.dtype == torch.float32, key      # gradients in the parameters' dtype
        owner = key.rpartition(".")[0]
        owned = torch.ones_like(grad, dtype=torch.bool)
        if owner in controller.selection:
            owned = owned_entries(controller.modules[owner], controller.selection[owner])
            assert torch.all(grad[~owned] == 0), key
        error = _rel(grad[owned], g32[key][owned])
        native_error = _rel(pamp[key][owned], p32[key][owned])
        assert error <= 8 * eps, (key, error / eps, native_error / eps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_on_the_full_block_structure(dtype):
    """ReLU masks, fused BN->ReLU->conv, residuals: runs in the autocast dtype, keeps
    the exact zeros, frozen layers get no gradient, and saves less than float32."""
    net, controller = _converted()
    loss32, g32, saved32 = _grads(net)
    loss, gamp, saved_amp = _grads(net, autocast_dtype=dtype, loss_scale=2.0 ** 12)
    assert torch.isfinite(loss) and abs(loss.item() - loss32.item()) < 64 * torch.finfo(dtype).eps
    assert sorted(gamp) == sorted(g32)
    for key, grad in gamp.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), key
        owner = key.rpartition(".")[0]
        if owner in controller.selection:
            owned = owned_entries(controller.modules[owner], controller.selection[owner])
            assert torch.all(grad[~owned] == 0), key
    # the compact copies are kept in the dtype the conv computed in
    assert saved_amp < 0.7 * saved32


def test_autocast_saves_the_compact_copy_in_the_autocast_dtype():
    net = nn.Sequential(nn.Conv2d(6, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 81, 2))
    x = torch.randn(2, 6, 9, 9)
    controller = tt.convert(net, 1.0, example_input=x, policy="d-fullrandom")
    controller.apply_selection({"0": torch.tensor([1, 4])})
    for p in net[2].parameters():
        p.requires_grad_(False)        # only the conv's compact copy is saved
    with tt.saved_tensor_bytes(net) as saved:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(x)
    assert saved.total == 2 * 2 * 81 * 2       # [N, K, H, W] in bfloat16
    y.float().sum().backward()
    assert net[0].weight.grad.dtype == torch.float32


# ---------------------------------------------------------------- compile
def test_compiled_model_has_no_graph_break():
    net, _ = _converted()
    explanation = torch._dynamo.explain(net)(X)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_compile_aot_eager_equals_eager_and_follows_resample():
    torch._dynamo.reset()
    net, controller = _converted()
    eager = copy.deepcopy(net)        # same selection, same buffers
    compiled = torch.compile(net, backend="aot_eager")
    for epoch in (0, 1):
        if epoch:
            controller.resample(epoch)            # recompiles (requires_grad / sizes change)
            eager_controller_selection = controller.selection
            for name, module in eager.named_modules():
                if hasattr(module, "selected_channels") and name in eager_controller_selection:
                    module.weight.requires_grad_(True)
                    module.selected_channels = eager_controller_selection[name].clone()
                elif hasattr(module, "selected_channels") and name != controller.classifier:
                    module.weight.requires_grad_(False)
        loss_e, grads_e, _ = _grads(eager)
        loss_c, grads_c, _ = _grads(compiled, owner=net)
        assert torch.equal(loss_c, loss_e)
        assert sorted(grads_c) == sorted(grads_e)
        for key in grads_e:
            torch.testing.assert_close(grads_c[key], grads_e[key], rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()


@pytest.mark.slow   # inductor C++ compile: ~20 s on 2 cores; aot_eager below stays in the default run
def test_compile_inductor_equals_eager():
    torch._dynamo.reset()
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6),
                        nn.ReLU6(), nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    x = torch.randn(8, 3, 9, 9, generator=torch.Generator().manual_seed(2))
    controller = tt.convert(net, 1.0, example_input=x, policy="d-fullrandom")
    controller.apply_selection({"0": torch.tensor([0, 2]), "3": torch.tensor([1, 3, 4])})
    net.train()
    loss_e, grads_e, _ = _grads(net, x)
    compiled = torch.compile(net, backend="inductor")
    loss_c, grads_c, _ = _grads(compiled, x, owner=net)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert sorted(grads_c) == sorted(grads_e)
    for key in grads_e:
        torch.testing.assert_close(grads_c[key], grads_e[key], rtol=1e-4, atol=1e-6)
        assert torch.all(grads_c[key][grads_e[key] == 0] == 0)   # unselected stay exact zeros
    torch._dynamo.reset()


# ---------------------------------------------------------------- checkpoint
def _checkpoint_blocks(net):
    for block in (net[3], net[4]):
        block.forward = (lambda b: (lambda x: x + checkpoint(b.conv, x, use_reentrant=False)))(block)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_checkpointed_blocks_recompute_with_the_same_channels(seed, monkeypatch):
    net, controller = _converted(seed=seed, dtype=torch.float64)
    x = X.double()
    loss_plain, grads_plain, saved_plain = _grads(net, x)
    _checkpoint_blocks(net)
    calls = []
    for name, position in (("compact_channels", 1), ("affine_relu_compact", 4)):
        original = getattr(reference, name)

        def spy(*args, _original=original, _position=position, **kwargs):
            idx = args[_position]
            calls.append((torch.is_grad_enabled(), tuple(idx.tolist())))
            return _original(*args, **kwargs)
        monkeypatch.setattr(reference, name, spy)
    net.zero_grad(set_to_none=True)
    with tt.saved_tensor_bytes(net) as saved:
        loss = nn.functional.cross_entropy(net(x), T)
    forward_calls = list(calls)
    loss.backward()
    recomputed = calls[len(forward_calls):]
    assert recomputed, "nothing was recomputed"
    forward_sets = [c for _, c in forward_calls]
    for _, channels in recomputed:
        assert channels in forward_sets            # the same channel sets, recomputed
    assert torch.equal(loss.detach(), loss_plain)
    grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(grads_plain)
    for key in grads:
        assert torch.equal(grads[key], grads_plain[key]), key
    assert saved.total < saved_plain


def test_resample_between_forward_and_backward_is_caught_by_checkpoint():
    net, controller = _converted(seed=0)
    _checkpoint_blocks(net)
    loss = nn.functional.cross_entropy(net(X), T)
    controller.resample(5)
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        loss.backward()
