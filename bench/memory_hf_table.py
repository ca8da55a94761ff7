#!/usr/bin/env python
"""Bytes kept for backward at 2 % of full units on Hugging Face models built from a config.

    python bench/memory_hf_table.py   # needs the extra hf (pip install -e ".[hf]")

Random init, float32, batch 2, seed 0: plain PyTorch full fine-tuning (eval mode) against
the converted model in train mode, both measured with saved_tensors_hooks (parameters
excluded), and the cost model. HF self-attention runs the exact core keeping q, k, v
(plus a 1-bit mask of the attention dropout in train mode), BertIntermediate / ViTMLP
recompute their GELU's input. Prints a Markdown table; no timing.
"""
import torch, warnings; torch.set_num_threads(1); warnings.simplefilter("ignore")
from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification
from trady_triton.accounting import plain_and_converted_bytes
torch.manual_seed(0)
bert = BertForSequenceClassification(BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, max_position_embeddings=64, num_labels=10))
vit = ViTForImageClassification(ViTConfig(image_size=64, patch_size=8, hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768, num_labels=10))
print("| model | plain MiB | TraDy measured MiB | cost model MiB | plain / TraDy |")
print("|---|---|---|---|---|")
for name, net, x in (("HF BERT 4x128, 64 tokens", bert, torch.randint(0, 1000, (2, 64))), ("HF ViT 4x192, 64x64/8", vit, torch.randn(2, 3, 64, 64))):
    p, m, c = plain_and_converted_bytes(net, x, 0.02)
    print(f"| {name} | {p/2**20:.3f} | {m/2**20:.3f} | {c/2**20:.3f} | {p/m:.2f}x |")
