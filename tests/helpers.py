"""Helpers shared by several test modules (test modules never import each other).

pytest puts tests/ on sys.path (rootdir-relative, no __init__.py), so test files
import these as ``from helpers import small_net``.
"""

import torch
import torch.nn as nn


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
        expected = torch.where(mask, plain_params[name + ".weight"].grad, 0.0)
        torch.testing.assert_close(weight.grad, expected, rtol=1e-10, atol=1e-12)
        assert (weight.grad[~mask] == 0).all()
    head = controller.classifier
    if head is not None:
        torch.testing.assert_close(controller.modules[head].weight.grad,
                                   plain_params[head + ".weight"].grad, rtol=1e-10, atol=1e-12)
    return controller, saved.total, saved_plain.total


def swapped_and_plain(module, x0, *args):
    """Run a swapped copy of ``module`` (in a Sequential) and ``module`` itself on ``x0``.

    Outputs must be bit-equal. Backpropagates one random gradient through both and
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
    torch.testing.assert_close(y, y_plain, rtol=0, atol=0)
    dy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(7))
    y.backward(dy)
    y_plain.backward(dy)
    return a.grad, b.grad, saved.total, y, swapped
