"""Bad input raises a clear error before any kernel launch; kernels never read out of bounds.

Every kernel object in trady_triton.kernels is replaced by a trap while the bad
calls run, so an error raised only after a launch would fail the test.
"""

import inspect

import pytest
import torch

import trady_triton.kernels as K
from trady_triton import reference as ref
from trady_triton.kernels import (_checks, _splitk, activation, compaction, conv_weight_grad,
                                  depthwise_weight_grad, gemm_weight_grad, masks)

MODULES = [activation, compaction, conv_weight_grad, depthwise_weight_grad, gemm_weight_grad,
           masks, _splitk]


class _Trap:
    def __getitem__(self, grid):
        raise AssertionError("a kernel was launched before the arguments were rejected")


@pytest.fixture
def no_launch(monkeypatch):
    for mod in MODULES:
        for name in dir(mod):
            if name.startswith("_") and (name.endswith("_kernel") or "_autotuned" in name
                                         or name.startswith("_dw_autotuned")):
                monkeypatch.setattr(mod, name, _Trap())


def _t(*shape, dtype=torch.float32, device="cpu", **kw):
    return torch.randn(*shape, **kw).to(dtype).to(device)


def _i(values, dtype=torch.int32, device="cpu"):
    return torch.tensor(values, dtype=dtype, device=device)


def _bad_calls(dev):
    x = _t(2, 8, 5, 5, device=dev)
    dy = _t(2, 6, 5, 5, device=dev)
    xc = _t(2, 3, 5, 5, device=dev)
    idx = _i([0, 5, 7], device=dev)
    ws = (6, 8, 3, 3)
    conv = lambda **kw: K.conv2d_weight_grad_masked(  # noqa: E731
        kw.get("x", xc), kw.get("dy", dy), kw.get("idx", idx), kw.get("ws", ws),
        kw.get("stride", (1, 1)), kw.get("padding", (1, 1)), kw.get("dilation", (1, 1)),
        kw.get("groups", 1))
    meta = torch.empty(2, 8, 5, 5, device="meta")
    return [
        # compact_channels
        ("x", TypeError, lambda: K.compact_channels(x.cpu().numpy(), idx, 1)),
        ("channel_dim", ValueError, lambda: K.compact_channels(x, idx, 4)),
        ("channel_dim", TypeError, lambda: K.compact_channels(x, idx, 1.0)),
        ("idx", TypeError, lambda: K.compact_channels(x, idx.float(), 1)),
        ("idx", TypeError, lambda: K.compact_channels(x, idx.bool(), 1)),
        ("idx", TypeError, lambda: K.compact_channels(x, [0, 1], 1)),
        ("idx", ValueError, lambda: K.compact_channels(x, idx[None], 1)),
        ("idx", ValueError, lambda: K.compact_channels(x, _i([0, 8], device=dev), 1)),
        ("idx", ValueError, lambda: K.compact_channels(x, _i([-1, 2], device=dev), 1)),
        ("idx", ValueError, lambda: K.compact_channels(x, idx.to("meta"), 1)),
        ("x", ValueError, lambda: K.compact_channels(meta, idx.to("meta"), 1)),
        # masks
        ("passes", TypeError, lambda: K.pack_mask(x)),
        ("packed", TypeError, lambda: K.unpack_mask(x, 4)),
        ("packed", ValueError, lambda: K.unpack_mask(ref.pack_mask(x > 0), 1000)),
        ("numel", ValueError, lambda: K.unpack_mask(ref.pack_mask(x > 0), -1)),
        ("numel", TypeError, lambda: K.unpack_mask(ref.pack_mask(x > 0), 3.0)),
        ("x", TypeError, lambda: K.relu_forward_mask(x.double(), None)),
        ("x", TypeError, lambda: K.relu_forward_mask(x.long(), None)),
        ("upper", TypeError, lambda: K.relu_forward_mask(x, "6")),
        ("upper", ValueError, lambda: K.relu_forward_mask(x, -1.0)),
        ("upper", ValueError, lambda: K.relu_forward_mask(x, float("inf"))),
        ("grad_output", TypeError, lambda: K.relu_backward_mask(x.double(), ref.pack_mask(x > 0))),
        ("packed", ValueError, lambda: K.relu_backward_mask(x, ref.pack_mask(x > 0)[:-1])),
        ("packed", TypeError, lambda: K.relu_backward_mask(x, (x > 0).reshape(-1))),
        ("packed", ValueError, lambda: K.relu_backward_mask(x, ref.pack_mask(x > 0).to("meta"))),
        # affine_relu_compact
        ("scale", ValueError, lambda: K.affine_relu_compact(x, _t(7, device=dev), _t(8, device=dev),
                                                            None, idx)),
        ("shift", ValueError, lambda: K.affine_relu_compact(x, _t(8, device=dev),
                                                            _t(8, 1, device=dev), None, idx)),
        ("shift", TypeError, lambda: K.affine_relu_compact(x, _t(8, device=dev),
                                                           _t(8, device=dev).long(), None, idx)),
        ("x", ValueError, lambda: K.affine_relu_compact(x[0], _t(8, device=dev),
                                                        _t(8, device=dev), None, idx)),
        ("idx", ValueError, lambda: K.affine_relu_compact(x, _t(8, device=dev), _t(8, device=dev),
                                                          6.0, _i([0, 9], device=dev))),
        ("idx", TypeError, lambda: K.affine_relu_compact(x, _t(8, device=dev), _t(8, device=dev),
                                                         6.0, idx.double())),
        # conv2d_weight_grad_masked
        ("dtype", TypeError, lambda: conv(dy=dy.half())),
        ("x_compact", TypeError, lambda: conv(x=xc.double(), dy=dy.double())),
        ("idx", TypeError, lambda: conv(idx=idx.float())),
        ("idx", ValueError, lambda: conv(idx=_i([0, 5, 8], device=dev))),
        ("x_compact", ValueError, lambda: conv(idx=_i([0, 5], device=dev))),
        ("grad_output", ValueError, lambda: conv(stride=(2, 2))),
        ("grad_output", ValueError, lambda: conv(padding=0)),
        ("grad_output", ValueError, lambda: conv(dy=_t(2, 7, 5, 5, device=dev))),
        ("grad_output", ValueError, lambda: conv(dy=_t(3, 6, 5, 5, device=dev))),
        ("weight_shape", ValueError, lambda: conv(ws=(6, 8, 3))),
        ("weight_shape", ValueError, lambda: conv(ws=(6, 8, 0, 3))),
        ("stride", TypeError, lambda: conv(stride="same")),
        ("padding", TypeError, lambda: conv(padding="same")),
        ("stride", ValueError, lambda: conv(stride=0)),
        ("groups", ValueError, lambda: conv(groups=4)),
        ("x_compact", ValueError, lambda: conv(x=xc[0], dy=dy[0])),
        ("device", ValueError, lambda: conv(idx=idx.to("meta"))),
        # linear_weight_grad_masked
        ("dtype", TypeError, lambda: K.linear_weight_grad_masked(
            _t(4, 3, device=dev), _t(4, 6, dtype=torch.bfloat16, device=dev), idx, 8)),
        ("idx", ValueError, lambda: K.linear_weight_grad_masked(
            _t(4, 3, device=dev), _t(4, 6, device=dev), idx, 7)),
        ("x_compact", ValueError, lambda: K.linear_weight_grad_masked(
            _t(4, 2, device=dev), _t(4, 6, device=dev), idx, 8)),
        ("grad_output", ValueError, lambda: K.linear_weight_grad_masked(
            _t(4, 3, device=dev), _t(5, 6, device=dev), idx, 8)),
        ("in_features", ValueError, lambda: K.linear_weight_grad_masked(
            _t(4, 3, device=dev), _t(4, 6, device=dev), idx, 0)),
        ("split_k", ValueError, lambda: K.linear_weight_grad_masked(
            _t(4, 3, device=dev), _t(4, 6, device=dev), idx, 8, split_k=0)),
    ]


def test_bad_input_raises_before_launch(no_launch, device):
    for i, (word, exc, call) in enumerate(_bad_calls(device)):
        with pytest.raises(exc) as info:
            call()
        msg = str(info.value)
        assert word in msg, f"case {i}: {word!r} not named in {msg!r}"


def test_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(_checks, "INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        K.relu_forward_mask(torch.randn(4), None)


def test_api_matches_reference():
    for name in K.__all__:
        ours, theirs = inspect.signature(getattr(K, name)), inspect.signature(getattr(ref, name))
        ours_pos = [p for p in ours.parameters.values() if p.kind != p.KEYWORD_ONLY]
        assert [p.name for p in ours_pos] == list(theirs.parameters), name
        # extra parameters are keyword-only with defaults
        for p in ours.parameters.values():
            if p.kind == p.KEYWORD_ONLY:
                assert p.default is not p.empty, (name, p.name)


def test_kernels_mask_bad_indices(device):
    """Called below the checks with out-of-range indices, kernels skip them, reading nothing."""
    x = torch.randn(2, 8, 5, 5, device=device)
    idx = _i([0, 8, -3, 7, 1 << 30], device=device)
    out = torch.full((2, 5, 5, 5), float("nan"), device=device)
    compaction.launch_compact(x, idx, out, 2, 8, 25, 200, 25, 1, 125, 25, 1)
    assert torch.equal(out[:, [0, 3]], x[:, [0, 7]])
    assert torch.isnan(out[:, [1, 2, 4]]).all()
    # channels_last / channel-fast tile
    xl = x.contiguous(memory_format=torch.channels_last)
    out.fill_(float("nan"))
    compaction.launch_compact(xl, idx, out, 2, 8, 25, 200, 1, 8, 125, 25, 1)
    assert torch.equal(out[:, [0, 3]], x[:, [0, 7]])
    assert torch.isnan(out[:, [1, 2, 4]]).all()
    # weight gradient: the invalid columns are not written (the dense output stays zero)
    xc = torch.randn(2, 5, 5, 5, device=device)
    dy = torch.randn(2, 6, 5, 5, device=device)
    dw = torch.zeros(6, 8, 3, 3, device=device)
    conv_weight_grad._launch_conv(xc, dy, idx, dw, 6, 5, 8, 3, 3, (1, 1), (1, 1), (1, 1), 1)
    good = _i([0, 7], device=device)
    expected = ref.conv2d_weight_grad_masked(xc[:, [0, 3]], dy, good, (6, 8, 3, 3), (1, 1),
                                             (1, 1), (1, 1), 1)
    torch.testing.assert_close(dw, expected, rtol=1e-4, atol=1e-4)


def test_index_check_cache_sees_in_place_changes(device):
    """The range check is cached per index tensor and version: in-place edits re-check."""
    x = torch.randn(2, 8, 5, 5, device=device)
    idx = _i([0, 5, 7], device=device)
    K.compact_channels(x, idx, 1)
    K.affine_relu_compact(x, torch.ones(8, device=device), torch.zeros(8, device=device), None,
                          idx)
    idx[1] = 8                                   # bumps idx._version
    with pytest.raises(ValueError, match="idx"):
        K.compact_channels(x, idx, 1)
    with pytest.raises(ValueError, match="idx"):
        K.affine_relu_compact(x, torch.ones(8, device=device), torch.zeros(8, device=device),
                              None, idx)
    idx[1] = 7                                   # now a repeated channel: the inverse map
    y, _, xc = K.affine_relu_compact(x, torch.ones(8, device=device),      # is rebuilt
                                     torch.zeros(8, device=device), None, idx)
    assert torch.equal(xc, torch.relu(x)[:, [0, 7, 7]])
