"""A converted MobileNetV2-w0.35 gives the same gradients on the Triton path as on reference.py.

On CPU the Triton kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); the whole network at 32x32 keeps this to seconds.
"""

import copy

import pytest
import torch

import trady_triton as tt
from trady_triton.models import build_model


def _gradients(model, x, target):
    model.zero_grad(set_to_none=True)
    with tt.saved_tensor_bytes(model) as saved:
        logits = model(x)
    torch.nn.functional.cross_entropy(logits, target).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, saved.total


@pytest.mark.parametrize("policy", ["d-fullrandom", "full"])
def test_mbv2_gradients_triton_path_equal_reference_path(policy):
    torch.manual_seed(0)
    model = build_model("mbv2-w0.35-arch", num_classes=7)
    for m in model.modules():   # non-trivial frozen BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 32)
    target = torch.tensor([1, 5])
    controller = tt.convert(model, budget_units=6_000, example_input=x, policy=policy, seed=3)
    assert controller.profile.fusions, "MobileNetV2 has BN -> ReLU6 -> conv chains to fuse"
    model.train()
    with tt.backend("reference"):
        ref_logits, ref_grads, ref_saved = _gradients(model, x, target)
    with tt.backend("triton"):
        tri_logits, tri_grads, tri_saved = _gradients(model, x, target)
    assert tri_saved == ref_saved == controller.saved_bytes(2)["total"]
    torch.testing.assert_close(tri_logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert ref_grads.keys() == tri_grads.keys() and len(ref_grads) >= 3
    for name, ref in ref_grads.items():
        scale = ref.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(tri_grads[name] / scale, ref / scale, rtol=1e-4, atol=1e-4,
                                   msg=name)
        assert torch.equal(tri_grads[name] == 0, ref == 0) or policy == "full", name
