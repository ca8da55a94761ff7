"""Reweighted gradient norm (RGN) and the a-priori layer ranking (docs/METHOD.md section 2).

    channel RGN  RGN_c = ||dL/dW[:, c]||_2 / (CW_c + CA_c)        (Eq. 7)
    layer RGN    RGN_i = sum over c of RGN_c                         (Eq. 8)

Layer RGN is accumulated over a short fine-tuning run on proxy data; the top-K
layers are the shortest prefix (by decreasing RGN) reaching ``coverage`` of the
network total. Rankings are stored as JSON keyed by architecture name.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cost import LayerCost

FORMAT = "trady-ranking"
VERSION = 1
DEFAULT_COVERAGE = 0.97


def channel_grad_norms(weight_grad: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``||dW[:, c]||_2`` for every input channel ``c`` of a conv/linear weight gradient."""
    if weight_grad.dim() == 2:       # Linear [out, in]
        return weight_grad.norm(dim=0)
    out_channels, in_per_group = weight_grad.shape[:2]
    per_group = weight_grad.reshape(groups, out_channels // groups, in_per_group, -1)
    return per_group.permute(0, 2, 1, 3).reshape(groups * in_per_group, -1).norm(dim=1)


def channel_rgn(layer: LayerCost, weight_grad: torch.Tensor) -> torch.Tensor:
    """Eq. 7 for every input channel of one layer."""
    return channel_grad_norms(weight_grad.detach().double(), layer.groups) / layer.units_per_channel


@dataclass
class LayerRanking:
    """Accumulated layer RGN of one architecture, and how it was obtained."""

    arch: str
    scores: dict[str, float]
    steps: int
    meta: dict = field(default_factory=dict)

    def order(self) -> list[str]:
        return sorted(self.scores, key=lambda name: -self.scores[name])

    def top_k(self, coverage: float = DEFAULT_COVERAGE) -> list[str]:
        """Shortest prefix of the ranking whose RGN sum reaches ``coverage`` of the total."""
        if not 0.0 < coverage <= 1.0:
            raise ValueError(f"coverage={coverage!r}: allowed values are in (0, 1]")
        total = sum(self.scores.values())
        chosen, running = [], 0.0
        for name in self.order():
            chosen.append(name)
            running += self.scores[name]
            if running >= coverage * total * (1 - 1e-12):
                break
        return chosen

    def check_layers(self, layer_names: Iterable[str]) -> None:
        """Raise if the ranking names layers the model does not have."""
        known = set(layer_names)
        unknown = sorted(set(self.scores) - known)
        if unknown:
            raise ValueError(f"ranking for {self.arch!r} names layers this model does not have: "
                             f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}; "
                             f"allowed names are the model's convertible layers, e.g. {sorted(known)[:3]}")

    def to_dict(self) -> dict:
        return {"scores": self.scores, "steps": self.steps, "meta": self.meta}


def save_ranking(ranking: LayerRanking, path: str | Path) -> None:
    """Write (or add to) a ranking file keyed by architecture."""
    path = Path(path)
    data = {"format": FORMAT, "version": VERSION, "architectures": {}}
    if path.exists():
        data = _read_file(path)
    data["architectures"][ranking.arch] = ranking.to_dict()
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _read_file(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"ranking file {str(path)!r} is not readable JSON: {error}") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ValueError(f"ranking file {str(path)!r}: expected a JSON object with "
                         f"format={FORMAT!r} and version={VERSION}")
    if not isinstance(data.get("architectures"), dict):
        raise ValueError(f"ranking file {str(path)!r}: 'architectures' must be an object "
                         "mapping architecture names to rankings")
    return data


def load_ranking(path: str | Path, arch: str) -> LayerRanking:
    """Read the ranking of ``arch`` from a file written by :func:`save_ranking`."""
    data = _read_file(Path(path))
    archs = data["architectures"]
    if arch not in archs:
        raise ValueError(f"ranking file {str(path)!r} has no ranking for arch={arch!r}; "
                         f"allowed values: {sorted(archs)}")
    entry = archs[arch]
    scores = entry.get("scores") if isinstance(entry, dict) else None
    if (not isinstance(scores, dict) or not scores
            or not all(isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v)
                       and v >= 0 for k, v in scores.items())):
        raise ValueError(f"ranking file {str(path)!r}, arch {arch!r}: 'scores' must map layer "
                         "names to finite non-negative numbers")
    steps = entry.get("steps", 0)
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"ranking file {str(path)!r}, arch {arch!r}: 'steps' must be an integer >= 0")
    return LayerRanking(arch, {k: float(v) for k, v in scores.items()}, steps, entry.get("meta", {}))


def shipped_rankings_path() -> Path:
    """The rankings that ship with the package (see trady_triton/rankings/README.md)."""
    return Path(__file__).resolve().parent / "rankings" / "rankings.json"


def shipped_ranking(arch: str) -> LayerRanking | None:
    path = shipped_rankings_path()
    if not path.exists():
        return None
    try:
        return load_ranking(path, arch)
    except ValueError:
        return None


def rank_layers(model: nn.Module, batches: Iterable, steps: int, *, lr: float = 0.02,
                loss_fn: Callable = F.cross_entropy, arch: str | None = None,
                example_input: torch.Tensor | None = None, meta: dict | None = None,
                progress: bool = False) -> LayerRanking:
    """Accumulate layer RGN over ``steps`` steps of plain SGD fine-tuning of a copy of ``model``.

    ``batches`` yields ``(inputs, targets)``; it is cycled if shorter than
    ``steps``. BatchNorm statistics are frozen (eval mode), as in fine-tuning
    with convert()'s default. The user's model is not modified.
    """
    from .convert import swap_attention_layers
    from .profile import profile_model   # local: profile imports layers

    if steps < 1:
        raise ValueError(f"steps={steps!r}: allowed values are integers >= 1")
    work = copy.deepcopy(model)
    swap_attention_layers(work)   # MultiheadAttention projections ranked as convert() pools them
    batches = list(batches) if not isinstance(batches, list) else batches
    if not batches:
        raise ValueError("batches: need at least one (inputs, targets) batch")
    probe = example_input if example_input is not None else batches[0][0]
    layers = [l for l in profile_model(work, probe).layers if not l.is_classifier]
    if not layers:
        raise ValueError("model has no Conv2d/Linear layer to rank")
    modules = dict(work.named_modules())
    work.train()
    for module in work.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    for p in work.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(work.parameters(), lr=lr)
    scores = {l.name: 0.0 for l in layers}
    iterator = range(steps)
    if progress:
        from .progress import progress_bar
        iterator = progress_bar(iterator, desc="ranking layers")
    for step in iterator:
        inputs, targets = batches[step % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(work(inputs), targets)
        loss.backward()
        for layer in layers:
            grad = modules[layer.name].weight.grad
            scores[layer.name] += float(channel_rgn(layer, grad).sum())
        optimizer.step()
    name = arch or getattr(model, "arch_name", None) or type(model).__name__
    info = {"lr": lr, "batch": int(len(batches[0][0]))}
    info.update(meta or {})
    return LayerRanking(name, scores, steps, info)


def default_pool(layer_names: list[str], arch: str) -> list[str]:
    """No ranking available: every layer is in the pool (TopK becomes FullRandom)."""
    warnings.warn(
        f"no layer ranking for architecture {arch!r}: drawing channels from all "
        f"{len(layer_names)} layers (TopK = FullRandom). Compute one once with "
        "trady_triton.rank_layers(model, batches, steps) and pass ranking=... to convert().",
        stacklevel=4)
    return list(layer_names)
