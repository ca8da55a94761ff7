"""convert() on Hugging Face transformers models built from tiny configs (extra ``hf``)."""

import pytest
import torch

import trady_triton as tt
from _requirements import require_module


@pytest.fixture(autouse=True)
def _needs_transformers():
    require_module("transformers", "pip install -e '.[hf]'")


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    config = BertConfig(vocab_size=37, hidden_size=15, num_hidden_layers=2, num_attention_heads=3,
                        intermediate_size=23, max_position_embeddings=11, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).double()


def bert_inputs(batch=2, length=7):
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 37, (batch, length), generator=g)}


def test_bert_gelu_swapped_and_gradients_match_plain_autograd_on_the_selection():
    from trady_triton.hf import swaps
    model, inputs = tiny_bert(), bert_inputs()
    reference = tiny_bert()
    controller = tt.convert(model, 0.3, example_input=inputs)
    (gelu_cls, trady_cls), = swaps().items()
    assert not any(type(m) is gelu_cls for m in model.modules())
    assert sum(type(m) is trady_cls for m in model.modules()) == 2
    assert controller.classifier == "classifier"
    model(**inputs).logits.square().sum().backward()
    for p in reference.parameters():
        p.requires_grad_(True)
    reference(**inputs).logits.square().sum().backward()
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
    assert checked >= 2


def test_bert_report_lists_hf_self_attention_and_revert_gives_plain_model():
    from transformers.activations import GELUActivation
    model, inputs = tiny_bert(), bert_inputs()
    keys = list(model.state_dict())
    controller = tt.convert(model, 0.3, example_input=inputs)
    measured = tt.saved_bytes_by_module(model, **inputs)
    assert any("attention.self" in name for name in measured)
    text = controller.report(2, measured_bytes=measured)
    assert "BertSelfAttention" in text
    tt.revert(controller)
    assert sum(type(m) is GELUActivation for m in model.modules()) == 2
    assert list(model.state_dict()) == keys


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    config = ViTConfig(image_size=10, patch_size=5, num_channels=3, hidden_size=15,
                       num_hidden_layers=2, num_attention_heads=3, intermediate_size=23,
                       num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(config).double()


def test_vit_patch_conv_converted_and_every_keeping_module_reported():
    model = tiny_vit()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    controller = tt.convert(model, 0.3, example_input=x)
    conv = model.vit.embeddings.patch_embeddings.projection
    assert type(conv).__name__ == "TraDyConv2d"
    measured = tt.saved_bytes_by_module(model, x)
    text = controller.report(2, measured_bytes=measured)
    assert "ViTAttention" in text
    # listed by the profile itself (not only through the measured bytes)
    assert ("vit.layers.0.attention", "ViTAttention") in controller.profile.other_modules
    for name in measured:
        assert name in text, name
    # the converted GELUs keep exactly their input (the cost model's KeptCost)
    gelus = [n for n, m in model.named_modules() if type(m).__name__ == "TraDyGELUActivation"]
    assert len(gelus) == 2
    model(x).logits.sum().backward()


def test_python_gelu_activation_is_left_alone():
    """HF's Python GELU (use_gelu_python=True) is not F.gelu: not swapped, it stays as written."""
    from transformers.activations import GELUActivation
    model = tiny_bert()
    for layer in model.bert.encoder.layer:
        layer.intermediate.intermediate_act_fn = GELUActivation(use_gelu_python=True)
    tt.convert(model, 0.3, example_input=bert_inputs())
    assert sum(type(m) is GELUActivation for m in model.modules()) == 2
