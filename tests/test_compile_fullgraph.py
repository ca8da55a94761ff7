"""torch.compile(fullgraph=True) of a converted model's forward + backward: no graph
break, the same loss and gradients as eager.

The trady kernels are ``torch.library`` ops (``trady_triton/ops.py``): Dynamo records each
as one node through its fake implementation, and AOTAutograd traces the backward of the
autograd Functions around them. Both backends are compiled: ``reference`` (the CPU
kernels) and ``triton`` (the CUDA code path, here under the Triton interpreter).
``fullgraph=True`` makes any graph break an error; ``torch._dynamo.explain`` counts them.
The full-size architectures compile for minutes on two cores: they are marked ``slow``
(``TRADY_RUN_SLOW=1`` runs them); MobileNetV2-w0.35's graph-break count runs by default.
"""

import pytest
import torch
import torch.nn as nn

import trady_triton as tt
from trady_triton.models.efficientnet_lite import efficientnet_lite0
from trady_triton.models.mobilenetv2 import mobilenetv2_w035

from helpers import small_net

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = {"small_net": lambda: small_net(num_classes=5),
          "mbv2-w0.35": lambda: mobilenetv2_w035(num_classes=5),
          "efficientnet-lite0": lambda: efficientnet_lite0(pretrained=False, num_classes=5)}


def _converted(arch, size, backend):
    torch.manual_seed(0)
    net = MODELS[arch]()
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with tt.backend(backend):
        controller = tt.convert(net, 0.2, example_input=x, policy="d-fullrandom", seed=3)
    net.train()
    partial = [n for n, c in controller.selection.items()
               if len(c) < net.get_submodule(n).weight.shape[1]]
    assert partial, "the budget must leave some layer partly trained"
    return net, x, torch.tensor([0, 4, 2])


def _loss_and_grads(model, owner, x, t):
    owner.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), t)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in owner.named_parameters()
                           if p.grad is not None}


def _compiled_equals_eager(arch, size, backend, compiler="aot_eager"):
    torch._dynamo.reset()
    net, x, t = _converted(arch, size, backend)
    with tt.backend(backend):
        loss_e, grads_e = _loss_and_grads(net, net, x, t)
        compiled = torch.compile(net, backend=compiler, fullgraph=True)
        loss_c, grads_c = _loss_and_grads(compiled, net, x, t)
    torch._dynamo.reset()
    tight = compiler == "aot_eager"          # inductor reorders float sums
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6 if tight else 1e-4, atol=1e-6)
    assert sorted(grads_c) == sorted(grads_e) and grads_e
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-5 if tight else 1e-3,
                                   atol=1e-6 if tight else 1e-5)
        assert torch.all(grads_c[name][grads_e[name] == 0] == 0), name   # exact zeros kept


def _graph_breaks(arch, size, backend):
    torch._dynamo.reset()
    net, x, _ = _converted(arch, size, backend)
    with tt.backend(backend):
        explanation = torch._dynamo.explain(net)(x)
    torch._dynamo.reset()
    return explanation


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_small_net_fullgraph_forward_backward_equals_eager(backend):
    _compiled_equals_eager("small_net", 15, backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_small_net_has_no_graph_break(backend):
    explanation = _graph_breaks("small_net", 15, backend)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), \
        [b.reason for b in explanation.break_reasons]


def test_mobilenetv2_has_no_graph_break():
    explanation = _graph_breaks("mbv2-w0.35", 32, "reference")
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), \
        [b.reason for b in explanation.break_reasons]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mbv2-w0.35", "efficientnet-lite0"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_architecture_fullgraph_forward_backward_equals_eager(arch, backend):
    _compiled_equals_eager(arch, 32, backend)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mbv2-w0.35", "efficientnet-lite0"])
def test_architecture_inductor_fullgraph_equals_eager(arch):
    _compiled_equals_eager(arch, 32, "reference", compiler="inductor")
