"""The saving is real on the paper's networks: measured bytes == cost model, paper's unit counts."""

import copy

import pytest
import torch

import trady_triton as tt
from trady_triton.cost import full_units
from trady_triton.models import build_model, tinyml_weights_path

from _requirements import require_file

PAPER_BUDGETS_MBV2 = (27_946, 66_592, 93_696)


@pytest.mark.parametrize("budget", PAPER_BUDGETS_MBV2)
def test_mbv2_saved_bytes_equal_the_cost_model_and_are_far_below_plain_pytorch(budget):
    torch.manual_seed(0)
    model = build_model("mbv2-w0.35-arch", num_classes=10)
    plain = copy.deepcopy(model).eval()
    x = torch.randn(2, 3, 128, 128)
    controller = tt.convert(model, budget_units=budget, example_input=x, policy="d-fullrandom", seed=1)
    assert full_units(controller.layers) == 1_252_320
    assert sum(1 for l in controller.layers if not l.is_classifier) == 52
    model.train()
    with tt.saved_tensor_bytes(model) as saved:
        logits = model(x)
    logits.logsumexp(1).sum().backward()
    analytic = controller.saved_bytes(batch=2)
    for p in plain.parameters():
        p.requires_grad_(True)
    with tt.saved_tensor_bytes(plain) as saved_plain:
        plain(x)
    print(f"\nbudget {budget}: TraDy saved {saved.total:,} B (cost model {analytic['total']:,} B); "
          f"plain PyTorch full fine-tuning saved {saved_plain.total:,} B")
    assert saved.total == analytic["total"]
    assert saved_plain.total > 15 * saved.total
    assert controller.stats().selected_units <= budget


def test_mcunet_full_finetuning_units_match_the_paper():
    path = require_file(tinyml_weights_path("mcunet-in1"), "the paper's MCUNet-in1 weights")
    model = build_model("mcunet-in1", weights=path, num_classes=10)
    controller = tt.convert(model, budget_units=15_936, example_input=torch.randn(1, 3, 128, 128),
                            policy="d-fullrandom")
    body = [l for l in controller.layers if not l.is_classifier]
    assert len(body) == 42
    assert sum(l.weight_units for l in body) == 463_216
    assert sum(l.activation_units for l in body) == 846_592
    assert full_units(controller.layers) == 1_309_808
