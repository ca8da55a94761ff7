"""convert() on Hugging Face transformers models built from tiny configs (extra ``hf``).

Odd sizes (hidden 40, 5 heads of 8, 7 tokens, intermediate 23), float64: gradients equal
HF's own autograd on the selected slices, exact zeros elsewhere, measured bytes equal
the cost model.
"""

import copy

import pytest
import torch
import torch.nn as nn

import trady_triton as tt
from _requirements import require_module
from helpers import check_exact_conversion

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny shapes; the cores are shared


@pytest.fixture(autouse=True)
def _needs_transformers():
    require_module("transformers", "pip install -e '.[hf]'")


def tiny_bert(dropout=0.0, attention_dropout=0.0, implementation="sdpa"):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    config = BertConfig(vocab_size=37, hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                        intermediate_size=23, max_position_embeddings=11, num_labels=3,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=attention_dropout,
                        attn_implementation=implementation)
    return BertForSequenceClassification(config).double()


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    config = ViTConfig(image_size=10, patch_size=5, num_channels=3, hidden_size=40,
                       num_hidden_layers=2, num_attention_heads=5, intermediate_size=23,
                       num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(config).double()


def token_ids(batch=3, length=7):
    return torch.randint(0, 37, (batch, length), generator=torch.Generator().manual_seed(1))


def padding_mask(batch=3, length=7):
    """The second sequence ends in three padding tokens, the third in one."""
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, -3:] = 0
    mask[2, -1:] = 0
    return mask


class Logits(nn.Module):
    """An HF model called with fixed keyword inputs, returning its logits (for the helper)."""

    def __init__(self, model, key, **fixed):
        super().__init__()
        self.model, self.key, self.fixed = model, key, fixed

    def forward(self, x):
        return self.model(**{self.key: x}, **self.fixed).logits


def converted_types(model) -> set[str]:
    return {type(m).__name__ for m in model.modules()}


@pytest.mark.parametrize("padded, implementation",
                         [(False, "sdpa"), (True, "sdpa"), (True, "eager")])
def test_bert_attention_converted_exact_and_costed(padded, implementation):
    """sdpa gets a boolean padding mask, eager an additive one."""
    fixed = {"attention_mask": padding_mask()} if padded else {}
    net = Logits(tiny_bert(implementation=implementation), "input_ids", **fixed)
    for seed in range(2):
        controller, trady, plain = check_exact_conversion(net, token_ids(), keep_ratio=0.3,
                                                          seed=seed)
        assert {"TraDyBertSelfAttention", "TraDyBertIntermediate"} <= converted_types(net)
        assert not controller.profile.other_modules
        assert 0 < trady < plain
        tt.revert(controller)


def test_vit_attention_converted_exact_and_costed():
    net = Logits(tiny_vit(), "pixel_values")
    x = torch.randn(3, 3, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for seed in range(2):
        controller, trady, plain = check_exact_conversion(net, x, keep_ratio=0.3, seed=seed)
        assert {"TraDyViTAttention", "TraDyViTMLP"} <= converted_types(net)
        assert not controller.profile.other_modules
        assert 0 < trady < plain
        tt.revert(controller)


def _selection_checked(model, reference) -> int:
    """Selected weight-gradient slices equal the reference's, the others are exact zeros."""
    plain = dict(reference.named_parameters())
    checked = 0
    for name, module in model.named_modules():
        channels = getattr(module, "selected_channels", None)
        if channels is None or module.weight.grad is None:
            continue
        grad, want = module.weight.grad, plain[f"{name}.weight"].grad
        selected = torch.zeros(grad.shape[1], dtype=torch.bool)
        selected[channels.long()] = True
        torch.testing.assert_close(grad[:, selected], want[:, selected], rtol=1e-10, atol=1e-12)
        assert torch.equal(grad[:, ~selected], torch.zeros_like(grad[:, ~selected]))
        checked += 1
    return checked


def test_bert_dropout_in_training_matches_hf_eager_with_the_same_seed():
    """Attention dropout on: the core keeps its keep mask in 1 bit and draws it as
    F.dropout does, so HF's eager attention under the same seed gives the same gradient."""
    model = tiny_bert(dropout=0.2, attention_dropout=0.3)
    reference = tiny_bert(dropout=0.2, attention_dropout=0.3, implementation="eager")
    ids, mask = token_ids(), padding_mask()
    model.eval()   # profiled in eval mode (Dropout passes its input on), measured in training
    controller = tt.convert(model, 0.3, example_input={"input_ids": ids, "attention_mask": mask})
    model.train()
    reference.train()
    with tt.saved_tensor_bytes(model) as saved:
        torch.manual_seed(5)
        out = model(input_ids=ids, attention_mask=mask).logits
    assert saved.total == controller.saved_bytes(ids.shape[0])["total"]
    out.square().sum().backward()
    for p in reference.parameters():
        p.requires_grad_(True)
    torch.manual_seed(5)
    want = reference(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    want.square().sum().backward()
    assert _selection_checked(model, reference) >= 2
    # every core kept q, k, v and a 1-bit mask of [3, 5, 7, 7] probabilities
    by_module = tt.saved_bytes_by_module(model, input_ids=ids, attention_mask=mask)
    qkv, bits = 3 * 3 * 7 * 40 * 8, -(-3 * 5 * 7 * 7 // 8)
    kept = {n: b for n, b in by_module.items() if n.endswith("attention.self")}
    assert kept and all(b == qkv + bits for b in kept.values()), kept


def test_output_attentions_falls_back_to_hf_and_is_reported():
    model = tiny_bert(implementation="eager")
    ids = token_ids()
    controller = tt.convert(model, 0.3, example_input={"input_ids": ids,
                                                       "output_attentions": True})
    assert ("bert.encoder.layer.0.attention.self", "BertSelfAttention") \
        in controller.profile.other_modules
    out = model(input_ids=ids, output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (3, 5, 7, 7)
    measured = tt.saved_bytes_by_module(model, input_ids=ids, output_attentions=True)
    text = controller.report(3, measured_bytes=measured)
    assert "not converted" in text and "BertSelfAttention" in text
    # the same model without attention weights takes the converted path again
    tt.revert(controller)
    controller = tt.convert(model, 0.3, example_input={"input_ids": ids})
    assert not controller.profile.other_modules


def test_revert_gives_back_the_hf_modules_with_unchanged_state_dict():
    from transformers.models.bert import modeling_bert as bert
    model = tiny_bert()
    before = {name: type(m) for name, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    attributes = {name: set(vars(m)) for name, m in model.named_modules()}
    controller = tt.convert(model, 0.3, example_input={"input_ids": token_ids()})
    assert list(model.state_dict()) == list(state)
    model(input_ids=token_ids()).logits.sum().backward()
    tt.revert(controller)
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert sum(type(m) is bert.BertSelfAttention for m in model.modules()) == 2
    assert {name: set(vars(m)) for name, m in model.named_modules()} == attributes
    for key, value in model.state_dict().items():   # frozen weights stay bit-identical
        assert torch.equal(value, state[key]), key


def test_report_lists_the_converted_attention_with_its_bytes():
    model = tiny_vit()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    controller = tt.convert(model, 0.3, example_input=x)
    measured = tt.saved_bytes_by_module(model, x)
    text = controller.report(2, measured_bytes=measured)
    assert "TraDyViTAttention" in text and "not converted" not in text
    for name in measured:
        assert name in text, name


def test_python_gelu_activation_is_left_alone():
    """HF's Python GELU (use_gelu_python=True) is not F.gelu: not swapped, it stays as written,
    and the feed-forward adapter then lets it run itself (nothing recomputed)."""
    from transformers.activations import GELUActivation
    model = tiny_bert()
    for layer in model.bert.encoder.layer:
        layer.intermediate.intermediate_act_fn = GELUActivation(use_gelu_python=True)
    controller = tt.convert(model, 0.3, example_input={"input_ids": token_ids()})
    assert sum(type(m) is GELUActivation for m in model.modules()) == 2
    assert ("bert.encoder.layer.0.intermediate.intermediate_act_fn", "GELUActivation") \
        in controller.profile.other_modules
