"""Helpers shared by several test modules (test modules never import each other).

pytest puts tests/ on sys.path (rootdir-relative, no __init__.py), so test files
import these as ``from helpers import small_net``.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class InvertedResidual(nn.Module):
    """A torchvision-style block with in-place activations and a residual add."""

    def __init__(self, channels, hidden):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.conv(x)


def small_net(num_classes=5):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
        InvertedResidual(8, 16), InvertedResidual(8, 24),
        nn.Conv2d(8, 12, 1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, num_classes))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net


def make_idx(order: str, C: int, device, dtype=torch.int32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if order == "first":
        v = [0]
    elif order == "last":
        v = [C - 1]
    elif order == "reversed":
        v = list(range(C - 1, -1, -2))
    elif order == "shuffled":
        v = torch.randperm(C, generator=g)[: C // 2 + 1].tolist()
    elif order == "all":
        v = list(range(C))
    elif order == "repeated":
        v = [min(3, C - 1), 0, C - 1, min(3, C - 1)]
    else:
        raise AssertionError(order)
    return torch.tensor(v, dtype=dtype, device=device)


def model_state(model: nn.Module) -> dict:
    """What a user sees of a model: module objects and types, values, flags, hooks, attributes."""
    modules = list(model.named_modules(remove_duplicate=False))
    return {
        "modules": [(name, id(m), type(m)) for name, m in modules],
        "parameters": [(name, id(p), p.requires_grad)
                       for name, p in model.named_parameters(remove_duplicate=False)],
        "training": [(name, m.training) for name, m in modules],
        "hooks": [(name, key, list(value.items())) for name, m in modules
                  for key, value in sorted(vars(m).items()) if "hooks" in key],
        "attributes": [(name, sorted(vars(m)), sorted(m._buffers),
                        sorted(m._non_persistent_buffers_set)) for name, m in modules],
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def assert_same_model_state(before: dict, after: dict, same_module_objects: bool = True) -> None:
    """``same_module_objects=False``: equal module types only (revert() makes new objects)."""
    for key in ("modules", "parameters", "training", "hooks", "attributes"):
        if key == "modules" and not same_module_objects:
            assert [(n, t) for n, _, t in after[key]] == [(n, t) for n, _, t in before[key]]
        else:
            assert after[key] == before[key], key
    assert list(after["state_dict"]) == list(before["state_dict"])
    for name, value in before["state_dict"].items():
        assert torch.equal(after["state_dict"][name], value), name


# ------------------------------------------------------------------ kernel tests

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ORDERS = ["first", "last", "reversed", "shuffled", "all", "repeated"]
# (shape, layout): contiguous N-D, NCHW, channels_last with H*W % 8 == 0 (tile kernel),
# with H*W % 8 != 0 (strided flat kernel), with H*W < 8, and a non-dense view.
MASK_SHAPES = [((37,), "contiguous"), ((5, 19), "contiguous"), ((2, 19, 7, 9), "contiguous"),
               ((2, 19, 7, 9), "channels_last"), ((2, 19, 8, 8), "channels_last"),
               ((2, 70, 4, 6), "channels_last"), ((3, 5, 1, 3), "channels_last"),
               ((2, 19, 9, 11), "transposed"), ((1, 1, 1, 1), "contiguous")]


def rand(shape, dtype, device, layout="nchw", seed=0, scale=1.0):
    """Seeded normal noise (times ``scale``) in ``dtype``, NCHW or channels_last."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(device)


def make_x(shape, layout, dtype, device, seed=0):
    """Input of the ReLU/ReLU6 mask kernels: noise led by NaN, +-inf, -0, 0 and the clamp bound."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 4).to(dtype)
    flat = x.view(-1)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 6.0, 0.5],
                           dtype=dtype)
    n = min(flat.numel(), special.numel())
    flat[:n] = special[:n]
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    return x.to(device)


def conv_weight_grad64(x, dy, weight_shape, stride, padding, dilation, groups):
    """Full float64 dW of a conv via unfold + einsum (fast on CPU, unlike float64
    dilated/grouped autograd); checked against autograd in test_oracle_matches_autograd."""
    O, ipg, KH, KW = weight_shape
    N, C = x.shape[:2]
    cols = F.unfold(x.double(), (KH, KW), dilation, padding, stride)      # [N, C*T, P*Q]
    cols = cols.reshape(N, groups, ipg * KH * KW, -1)
    d = dy.double().reshape(N, groups, O // groups, -1)
    w = torch.einsum("ngol,ngil->goi", d, cols)
    return w.reshape(weight_shape)


def conv_case(N, C, H, W, O, kernel, stride, padding, dilation, groups, dtype, device,
              idx, x_layout="nchw", dy_layout="nchw", split_k=None):
    """Run the masked conv dW kernel on random inputs and check it against float64."""
    from trady_triton.kernels import conv2d_weight_grad_masked
    from trady_triton.kernels.testing import poisoned, tolerances

    x = rand((N, C, H, W), dtype, device, x_layout, 0)
    weight_shape = (O, C // groups, *kernel)
    P = (H + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    Q = (W + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    dy = rand((N, O, P, Q), dtype, device, dy_layout, 1)
    # float64 reference on the upcast inputs
    full = conv_weight_grad64(x, dy, weight_shape, stride, padding, dilation, groups)
    # what the layer's forward saves: x[:, idx] (kept in x's layout when channels_last)
    x_compact = x.index_select(1, idx.long())
    if x_layout == "channels_last":
        x_compact = x_compact.contiguous(memory_format=torch.channels_last)
    with poisoned():
        got = conv2d_weight_grad_masked(x_compact, dy, idx, weight_shape, stride, padding,
                                        dilation, groups, split_k=split_k)
    assert got.shape == weight_shape and got.dtype == dtype and got.device == dy.device
    # selected slices: input channel c of group g -> dW[g*opg:(g+1)*opg, c % ipg]
    ipg, opg = C // groups, O // groups
    selected = torch.zeros(weight_shape, dtype=torch.bool, device=device)
    for c in set(idx.tolist()):
        g = c // ipg
        selected[g * opg:(g + 1) * opg, c % ipg] = True
    assert torch.isfinite(got).all()
    assert (got[~selected] == 0).all()
    L = N * P * Q
    torch.testing.assert_close(got.double()[selected], full[selected], **tolerances(dtype, L))
    return got


def check_exact_conversion(net, x, keep_ratio=0.02, seed=0):
    """Convert float64 ``net`` (in place) and check it against a plain copy on ``x``.

    Checks: the trained layers' weight gradients equal plain autograd on the selected
    slices and are exact zeros elsewhere, the input gradient and the classifier's are
    equal, and the bytes measured for backward equal the cost model. Returns
    ``(controller, trady_bytes, plain_bytes)``: plain = full fine-tuning, every
    parameter trained, in eval mode (BatchNorm statistics untouched), parameters excluded.
    """
    import copy

    import trady_triton as tt
    from trady_triton.analysis import selection_masks

    net = net.double().eval()
    net.zero_grad(set_to_none=True)
    plain = copy.deepcopy(net)
    controller = tt.convert(net, keep_ratio, example_input=x, policy="d-fullrandom", seed=seed)
    net.train()
    with tt.saved_tensor_bytes(net) as saved:
        net(x)
    assert saved.total == controller.saved_bytes(x.shape[0])["total"]
    net.eval()
    with tt.saved_tensor_bytes(plain) as saved_plain:   # eval: train mode would move BN stats
        plain(x)
    floating = x.is_floating_point()   # token ids have no gradient
    a, b = x.clone().requires_grad_(floating), x.clone().requires_grad_(floating)
    out = net(a)
    dy = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    out.backward(dy)
    plain(b).backward(dy)
    if floating:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    masks = selection_masks(controller)
    plain_params = dict(plain.named_parameters())
    for name, mask in masks.items():
        weight = controller.modules[name].weight
        if not weight.requires_grad:
            assert weight.grad is None
            continue
        # a MultiheadAttention's in_proj is the layer named after the module
        plain_weight = plain_params.get(name + ".weight", plain_params.get(name + ".in_proj_weight"))
        expected = torch.where(mask, plain_weight.grad, 0.0)
        torch.testing.assert_close(weight.grad, expected, rtol=1e-10, atol=1e-12)
        assert (weight.grad[~mask] == 0).all()
    head = controller.classifier
    if head is not None:
        torch.testing.assert_close(controller.modules[head].weight.grad,
                                   plain_params[head + ".weight"].grad, rtol=1e-10, atol=1e-12)
    return controller, saved.total, saved_plain.total


def swapped_and_plain(module, x0, *args):
    """Run a swapped copy of ``module`` (in a Sequential) and ``module`` itself on ``x0``.

    Outputs must agree to float rounding (a few ulps: on CPU a 1x1 conv runs as one GEMM,
    whose summation order differs from oneDNN's convolution). Backpropagates one random gradient through both and
    returns ``(grad, grad_plain, saved_bytes, output, swapped)``: the input gradients,
    the bytes the swapped copy kept (parameters excluded), its output, and the Sequential.
    """
    import copy

    import trady_triton as tt
    from trady_triton.convert import swap_modules

    swapped = torch.nn.Sequential(copy.deepcopy(module))
    swap_modules(swapped)
    a, b = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
    with tt.saved_tensor_bytes(swapped) as saved:
        y = swapped[0](a * 1.0, *args)     # a non-leaf input, so in-place modules may run
    y_plain = module(b * 1.0, *args)
    ulps = 4 * torch.finfo(y.dtype).eps
    torch.testing.assert_close(y, y_plain, rtol=ulps, atol=ulps)
    dy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(7))
    y.backward(dy)
    y_plain.backward(dy)
    return a.grad, b.grad, saved.total, y, swapped
