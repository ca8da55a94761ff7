"""The torch.library ops (``torch.ops.trady.*``): opcheck on every op and backend, and
each op's result against the float64 reference."""

import pytest
import torch

import trady_triton as tt
from trady_triton import ops, reference

from helpers import make_idx

pytestmark = pytest.mark.usefixtures("one_thread")

# (backend, device): the CPU kernel with plain PyTorch, with the one-pass CPU loops
# (cpu_kernels.py, the "auto" CPU path), the same CPU kernel forced onto
# the Triton kernels (interpreter), and the CUDA kernel when a GPU is present
BACKENDS = [("reference", "cpu"), ("auto", "cpu"), ("triton", "cpu"),
            pytest.param("auto", "cuda", marks=pytest.mark.skipif(
                not torch.cuda.is_available(), reason="needs a CUDA device"))]


def _rand(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def _cases(device):
    """(op name, args) for every op, odd shapes, random values, unordered indices."""
    idx = make_idx("shuffled", 7, device)
    x = _rand(3, 7, 5, 6, device=device)
    conv_dy = _rand(3, 4, 3, 2, device=device, seed=1)
    dw_dy = _rand(3, 14, 5, 6, device=device, seed=2)
    lin_x = _rand(2, 3, len(idx), device=device, seed=3)
    lin_dy = _rand(2, 3, 5, device=device, seed=4)
    passes = x > 0.3
    packed = reference.pack_mask(passes.cpu()).to(device)
    scale, shift = _rand(7, device=device, seed=5), _rand(7, device=device, seed=6)
    return [
        ("compact_channels", (x, idx, 1)),
        ("compact_channels", (x.to(memory_format=torch.channels_last), idx, 1)),
        ("conv2d_weight_grad_masked",
         (x[:, idx.long()].contiguous(), conv_dy, idx, [4, 7, 3, 2], [2, 2], [1, 0], [1, 2], 1)),
        ("conv2d_weight_grad_masked",           # depthwise, channel multiplier 2
         (x[:, idx.long()].contiguous(), dw_dy, idx, [14, 1, 3, 3], [1, 1], [1, 1], [1, 1], 7)),
        ("linear_weight_grad_masked", (lin_x, lin_dy, idx, 7)),
        ("pack_mask", (passes,)),
        ("unpack_mask", (packed, x.numel())),
        ("relu_forward_mask", (x, None)),
        ("relu_forward_mask", (x.to(memory_format=torch.channels_last) * 4, 6.0)),
        ("relu_backward_mask", (_rand(3, 7, 5, 6, device=device, seed=7), packed)),
        ("affine_relu_compact", (x, scale, shift, 6.0, idx)),
        ("affine_clamp_mask", (x, scale, shift, 6.0)),
        ("affine_clamp_mask", (x, scale, shift, None)),
        ("mask_scale_backward", (_rand(3, 7, 5, 6, device=device, seed=8), packed, scale)),
        ("mask_scale_backward", (_rand(3, 7, 5, 6, device=device, seed=9), packed, None)),
    ]


def _ids():
    return [f"{name}-{i}" for i, (name, _) in enumerate(_cases("cpu"))]


def test_every_op_is_covered():
    assert {name for name, _ in _cases("cpu")} == set(ops.OPS)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", range(len(_ids())), ids=_ids())
def test_opcheck(backend, device, case):
    name, args = _cases(device)[case]
    with tt.backend(backend):
        torch.library.opcheck(ops.OPS[name], args)


def _float64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def _reference_result(name, args):
    args = _float64(tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    if name == "conv2d_weight_grad_masked":
        return reference.conv2d_weight_grad_masked(*args[:3], tuple(args[3]), *args[4:])
    return getattr(reference, name)(*args)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", range(len(_ids())), ids=_ids())
def test_op_matches_the_float64_reference(backend, device, case):
    name, args = _cases(device)[case]
    with tt.backend(backend):
        got = ops.OPS[name](*args)
    want = _reference_result(name, args)
    for g, w in zip(*(r if isinstance(r, tuple) else (r,) for r in (got, want))):
        assert g.shape == w.shape and g.device.type == device
        if w.is_floating_point():
            torch.testing.assert_close(g.double().cpu(), w, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(g.cpu(), w)


@pytest.mark.parametrize("backend,module", [("triton", "trady_triton.kernels"),
                                            ("reference", "trady_triton.reference")])
def test_the_backend_switch_picks_the_implementation(backend, module, monkeypatch):
    import importlib
    calls = []
    impl = importlib.import_module(module)
    original = impl.compact_channels
    monkeypatch.setattr(impl, "compact_channels",
                        lambda *a: calls.append(module) or original(*a))
    x, idx = _rand(2, 5, 3, 3), torch.tensor([4, 1], dtype=torch.int32)
    with tt.backend(backend):
        out = ops.compact_channels(x, idx, 1)
    assert calls == [module]
    assert torch.equal(out, x[:, [4, 1]])
