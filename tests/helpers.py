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
