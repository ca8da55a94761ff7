"""accounting.py / report: every module that keeps tensors is listed with its measured bytes."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trady_triton as tt
from trady_triton.models.transformers import VisionTransformer

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny shapes; the cores are shared


class _WithAttentionAndFunctionalCalls(nn.Module):
    """A user's net: nn.MultiheadAttention returning weights (PyTorch path), an F.elu in forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.classifier = nn.Linear(8, 3)

    def forward(self, x):
        x = F.elu(self.fc(x))
        return self.classifier(self.mha(x, x, x)[0].mean(1))


def test_per_module_bytes_cover_containers_and_functional_calls_and_sum_to_the_total():
    torch.manual_seed(0)
    net = _WithAttentionAndFunctionalCalls()
    x = torch.randn(2, 5, 8)
    controller = tt.convert(net, 0.5, example_input=x)
    net.train()
    by_module = tt.saved_bytes_by_module(net, x)
    with tt.saved_tensor_bytes(net) as saved:
        net(x)
    assert sum(by_module.values()) == saved.total
    assert by_module["mha"] > 0 and by_module[""] > 0   # the container and the F.elu
    assert by_module["classifier"] == 2 * 8 * 4          # its [N, 8] input
    assert ("mha", "MultiheadAttention") in controller.profile.other_modules
    report = controller.report(2, measured_bytes=by_module)
    assert "MultiheadAttention" in report and "functional calls" in report
    mha_row = next(line.split() for line in report.splitlines() if line.startswith("mha "))
    assert mha_row == ["mha", "TraDyMultiheadAttention", "as", "PyTorch", str(by_module["mha"]),
                       "not", "modelled"]


def test_per_module_bytes_of_a_converted_vit_equal_the_cost_model_module_by_module():
    torch.manual_seed(1)
    net = VisionTransformer(num_classes=4, image_size=24, patch=4, dim=12, depth=2, heads=3)
    x = torch.randn(2, 3, 24, 24)
    controller = tt.convert(net, 0.05, example_input=x, policy="d-fullrandom", seed=3)
    net.train()
    by_module = tt.saved_bytes_by_module(net, x)
    from trady_triton.cost import saved_bytes_per_module
    modelled = saved_bytes_per_module(controller.layers, controller.profile.masks,
                                      controller.counts(), 2)
    assert by_module == modelled
    assert by_module["blocks.0.attn"] == 2 * 37 * 36 * 4    # the packed qkv of 37 tokens
    report = controller.report(2, measured_bytes=by_module)
    assert "blocks.1.attn" in report and "TraDyAttention" in report
    assert "not modelled" not in report
