#!/usr/bin/env python
"""Compressed mode on nn.MultiheadAttention, Hugging Face self-attention and Conv1d.

    python bench/memory_compressed_attention.py   # needs the extra hf (pip install -e ".[hf]")

Per model (random init, seed 0, batch 4, keep 10 %, policy d-fullrandom, one draw): bytes
kept for backward in float32 (saved_tensors_hooks, train mode) in exact mode and at
``backward_bits=4``, for the whole model and for the modules this compresses, whether
measured == cost model, and the worst per-layer weight-gradient cosine of 4 bits against
exact (float64). Markdown; no timing.
"""
import copy, warnings
import torch, torch.nn as nn
import trady_triton as tt
torch.set_num_threads(1); warnings.simplefilter("ignore")


class MhaEncoder(nn.Module):
    """Two pre-norm self-attention + GELU MLP blocks on nn.MultiheadAttention, mean, head."""
    def __init__(self, dim=128, heads=4, depth=2):
        super().__init__()
        self.embed = nn.Linear(32, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            norm=nn.LayerNorm(dim), mha=nn.MultiheadAttention(dim, heads, batch_first=True),
            mlp=nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))))
            for _ in range(depth))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            h = b["norm"](x)
            x = x + b["mha"](h, h, h, need_weights=False)[0]
            x = x + b["mlp"](x)
        return self.head(x.mean(1))


class Logits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


def conv1d_net():
    return nn.Sequential(nn.Conv1d(16, 64, 5, padding=2), nn.GELU(), nn.Conv1d(64, 64, 5, padding=2, groups=4),
                         nn.SiLU(), nn.Conv1d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(64, 10))


def bert():
    from transformers import BertConfig, BertForSequenceClassification
    return Logits(BertForSequenceClassification(BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                                           intermediate_size=512, max_position_embeddings=64, num_labels=10,
                                                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)))


def run(net, x, bits, kinds):
    controller = tt.convert(net, 0.1, example_input=x, policy="d-fullrandom", seed=0, backward_bits=bits)
    net.eval(); net(x).logsumexp(1).sum().backward()
    grads = {n: m.weight.grad for n, m in controller.modules.items() if getattr(m, "weight", None) is not None and m.weight.grad is not None}
    net.train()
    by_module = tt.saved_bytes_by_module(net, x)
    total = sum(by_module.values())
    mine = sum(b for n, b in by_module.items() if n and isinstance(net.get_submodule(n), kinds))
    return grads, total, mine, total == controller.saved_bytes(x.shape[0])["total"]


def row(name, make, x, kinds):
    torch.manual_seed(0)
    net = make()
    x32 = x.float() if x.is_floating_point() else x
    exact, compressed = (run(copy.deepcopy(net), x32, bits, kinds) for bits in (None, 4))
    grads = [run(copy.deepcopy(net).double(), x, bits, kinds)[0] for bits in (None, 4)]
    cosines = [float((g * grads[1][n]).sum() / (g.norm() * grads[1][n].norm())) for n, g in grads[0].items()]
    print(f"| {name} | {exact[1]/2**20:.3f} | {compressed[1]/2**20:.3f} | {exact[1]/compressed[1]:.2f}x | "
          f"{exact[2]/2**20:.3f} | {compressed[2]/2**20:.3f} | {exact[2]/compressed[2]:.2f}x | {min(cosines):.4f} ({len(cosines)}) | "
          f"{'yes' if exact[3] and compressed[3] else 'NO'} |")


if __name__ == "__main__":
    from trady_triton.hf_modules import ExactSelfAttention
    print("| model (float32 bytes, float64 cosines) | exact MiB | 4-bit MiB | exact / 4-bit | these modules exact MiB | 4-bit MiB | exact / 4-bit | min cosine (layers) | measured = cost model |")
    print("|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(1)
    row("nn.MultiheadAttention encoder 2x128, 64 tokens (mha)", MhaEncoder, torch.randn(4, 64, 32, dtype=torch.float64, generator=gen), nn.MultiheadAttention)
    row("HF BERT 4x128, 64 tokens (attention.self)", bert, torch.randint(0, 1000, (4, 64), generator=gen), ExactSelfAttention)
    row("Conv1d net 16-64-64-64, length 256 (conv)", conv1d_net, torch.randn(4, 16, 256, dtype=torch.float64, generator=gen), nn.Conv1d)
