"""The accuracy effect of compressed mode (issue 14): pretrain here, fine-tune with TraDy.

    trady-experiments compressed --out runs/compressed \\
        --markdown docs/results/compressed_accuracy.md --json docs/results/compressed_accuracy.json

No pretrained weights ship for our MobileNetV3-Small or ViT, so a reduced version of each is
pretrained here (seeded, cached under ``OUT/pretrained/``) on one data set (Fashion-MNIST),
then fine-tuned on another (MNIST) with TraDy (d-topk, the layer ranking made by
:func:`trady_triton.rank_layers` on the pretrained net) in exact mode and with
``backward_bits`` 8, 4 and 2, paired by seed, plus full fine-tuning as a reference. Each run
writes one JSON under ``OUT/runs/``; a re-run skips finished runs (resumable). The summary
reuses :func:`trady_triton.experiments.paired_statistics` (t interval, sign test).
:func:`gradient_cosines` is the per-layer cosine between compressed and exact weight
gradients that the ``compressed_mode`` notebook plots.

``--plan converged`` (:data:`CONVERGED`) is a longer regime, with exact mode, 4 bits and full
fine-tuning only, whose learning rates come from a one-seed search on held-out MNIST training
images disjoint from the fine-tuning ones (:func:`search_rates`, :func:`pick_rate`); the
test set is used only for the final numbers.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .measure import saved_tensor_bytes

FORMAT = "trady-compressed-accuracy"
EXACT, FULL = "exact", "full"
SETTINGS = (EXACT, "8", "4", "2", FULL)      # labels: exact mode, backward_bits k, full FT
NUM_CLASSES = 10


def _mobilenetv3(num_classes: int) -> nn.Module:
    from .models.mobilenetv3 import MobileNetV3Small
    return MobileNetV3Small(num_classes, width_mult=0.5)


def _vit(num_classes: int) -> nn.Module:
    from .models.transformers import VisionTransformer
    return VisionTransformer(num_classes, image_size=32, patch=4, dim=64, depth=3, heads=2,
                             mlp_ratio=2)


# name -> (constructor(num_classes), AdamW pretraining rate)
NETS: dict[str, tuple[Callable[[int], nn.Module], float]] = {
    "mobilenetv3-small-w0.5": (_mobilenetv3, 2e-3),
    "vit-3x64-p4": (_vit, 1e-3),
}


@dataclass(frozen=True)
class Plan:
    """Everything that fixes the experiment's numbers (cuts to fit two shared CPU cores)."""

    nets: tuple[str, ...] = tuple(NETS)
    pretrain_data: str = "fashion-mnist"
    finetune_data: str = "mnist"
    resolution: int = 32
    pretrain_images: int = 24576
    pretrain_epochs: int = 2
    pretrain_batch: int = 64
    finetune_images: int = 1024
    test_images: int = 2000
    finetune_epochs: int = 2
    batch: int = 32
    keep_ratio: float = 0.02
    lr: float = 0.05            # SGD, warm-up + cosine; the same for every TraDy setting
    full_lr: float = 0.005      # 0.01 made the training loss NaN in 1 of 5 seeds
    rank_steps: int = 20
    rank_lr: float = 0.005      # plain SGD of every layer: at 0.05 MobileNetV3's RGN became NaN
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    settings: tuple[str, ...] = SETTINGS
    # learning-rate search (off when empty): candidates, tried in exact mode (its rate is then
    # every TraDy setting's) and in full fine-tuning, on search_images held-out train images
    lr_candidates: tuple[float, ...] = ()
    full_lr_candidates: tuple[float, ...] = ()      # full FT's own grid; empty: lr_candidates
    search_images: int = 0
    search_seed: int = 0

    def __post_init__(self):
        bad = [s for s in self.settings if s not in SETTINGS]
        if bad or not self.settings:
            raise ValueError(f"settings={self.settings!r}: allowed values are "
                             f"{', '.join(SETTINGS)} (at least one)")
        rates = self.lr_candidates + self.full_lr_candidates
        if (self.full_lr_candidates and not self.lr_candidates) or (self.lr_candidates and (
                self.search_images <= 0 or any(not lr > 0 for lr in rates))):
            raise ValueError(f"lr_candidates={self.lr_candidates!r}, full_lr_candidates="
                             f"{self.full_lr_candidates!r}, search_images={self.search_images}: "
                             "a search needs lr_candidates, positive rates and search_images > 0")

    @property
    def searched(self) -> bool:
        return bool(self.lr_candidates)

    def pretrain_key(self, net: str) -> str:
        """Cache name of a pretrained net: changes whenever its pretraining would."""
        fields = (net, self.pretrain_data, self.resolution, self.pretrain_images,
                  self.pretrain_epochs, self.pretrain_batch, NETS[net][1])
        return f"{net}_{hashlib.sha1(repr(fields).encode()).hexdigest()[:10]}"

    def runs_key(self, net: str) -> str:
        """Folder name of a net's fine-tuning runs: changes with any setting but the seeds and
        the rate grids (a searched plan's run files name their rate, so a grid can grow and
        keep its finished runs)."""
        fields = dataclasses.asdict(dataclasses.replace(self, seeds=(), nets=()))
        del fields["lr_candidates"], fields["full_lr_candidates"]
        fields["searched"] = self.searched
        # fields added later count only when changed: the short plan's runs keep their folder
        for name in ("settings", "search_images", "search_seed"):
            if fields[name] == getattr(Plan, name):
                del fields[name]
        if not fields["searched"]:
            del fields["searched"]
        return f"{self.pretrain_key(net)}_{hashlib.sha1(repr(fields).encode()).hexdigest()[:10]}"


# seconds-sized plan for tests and the notebook's small mode: the code path, not the numbers
TINY = Plan(pretrain_images=64, pretrain_epochs=1, pretrain_batch=32, finetune_images=48,
            test_images=40, finetune_epochs=1, batch=16, rank_steps=2, seeds=(0, 1),
            resolution=32)

# issue 14's converged regime: 2x the images, 3x the epochs, searched rates; 8 and 2 bits cut
# so that both nets (search included) fit in about 50 minutes on one thread
CONVERGED = Plan(finetune_images=2048, finetune_epochs=6, settings=(EXACT, "4", FULL),
                 lr_candidates=(0.2, 0.1, 0.05, 0.02, 0.01, 0.005),
                 # full FT on MobileNetV3 diverged at 0.01 and above: its grid reaches lower
                 full_lr_candidates=(0.02, 0.01, 0.005, 0.002, 0.001), search_images=512)
TINY_CONVERGED = dataclasses.replace(TINY, settings=CONVERGED.settings,
                                     lr_candidates=(0.1, 0.05, 0.01),
                                     full_lr_candidates=(0.005, 0.002, 0.001), search_images=24)
PLANS = {"short": (Plan(), TINY), "converged": (CONVERGED, TINY_CONVERGED)}


def plan_named(name: str, tiny: bool = False) -> Plan:
    """The plan ``--plan NAME`` runs (its seconds-sized version with ``tiny``)."""
    if name not in PLANS:
        raise ValueError(f"plan={name!r}: allowed values are {', '.join(PLANS)}")
    return PLANS[name][1 if tiny else 0]


def build_net(name: str) -> nn.Module:
    if name not in NETS:
        raise ValueError(f"net={name!r}: allowed values are {', '.join(NETS)}")
    return NETS[name][0](NUM_CLASSES)


def load_split(data: str, split: str, plan: Plan, images: int):
    """(images, labels) of a seeded class-stratified subset, normalised to [-1, 1]."""
    from .data import load_dataset
    ds = load_dataset(data, split, plan.resolution, subset=images, seed=0)
    return ds.images.contiguous(), ds.labels


def finetune_splits(plan: Plan):
    """(fine-tuning images, held-out images or None), both from ``plan.finetune_data``'s
    training split. With a search, one stratified pool of both sizes is drawn and a seeded
    stratified part of it held out: the two sets are disjoint by construction."""
    if not plan.searched:
        return load_split(plan.finetune_data, "train", plan, plan.finetune_images), None
    from .data import stratified_subset

    x, y = load_split(plan.finetune_data, "train", plan, plan.finetune_images + plan.search_images)
    held = torch.zeros(len(y), dtype=torch.bool)
    held[torch.from_numpy(stratified_subset(y.numpy(), plan.search_images, seed=1))] = True
    return (x[~held], y[~held]), (x[held], y[held])


# ------------------------------------------------------------------------- pretraining

def pretrain(name: str, plan: Plan, cache: Path, log=print) -> nn.Module:
    """The net pretrained on ``plan.pretrain_data`` (AdamW, cosine; seed 0), from the cache
    ``cache/pretrained/KEY.pt`` when there, else trained and written there."""
    from .train import epoch_batches, warmup_cosine

    path = Path(cache) / "pretrained" / f"{plan.pretrain_key(name)}.pt"
    torch.manual_seed(0)
    model = build_net(name)
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    x, y = load_split(plan.pretrain_data, "train", plan, plan.pretrain_images)
    optimizer = torch.optim.AdamW(model.parameters(), lr=NETS[name][1], weight_decay=0.05)
    steps = plan.pretrain_epochs * -(-len(x) // plan.pretrain_batch)
    scheduler = warmup_cosine(optimizer, steps, max(steps // 20, 1))
    started = time.perf_counter()
    model.train()
    for epoch in range(plan.pretrain_epochs):
        for batch in epoch_batches(len(x), plan.pretrain_batch, seed=0, epoch=epoch, salt=17):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
            scheduler.step()
    log(f"pretrained {name} on {plan.pretrain_data}: {time.perf_counter() - started:.0f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def pretrained_accuracy(name: str, model: nn.Module, plan: Plan, cache: Path) -> float:
    """Test accuracy of the pretrained net on its own data set (cached beside the weights)."""
    from .train import evaluate

    path = Path(cache) / "pretrained" / f"{plan.pretrain_key(name)}_accuracy.json"
    if path.is_file():
        return json.loads(path.read_text())["test_accuracy"]
    x, y = load_split(plan.pretrain_data, "test", plan, plan.test_images)
    accuracy = evaluate(model, x, y)["accuracy"]
    path.write_text(json.dumps({"test_accuracy": accuracy, "test_images": len(x)}) + "\n")
    return accuracy


def code_version() -> str:
    """The git commit of this package's checkout, "+dirty" when trady_triton/ has
    uncommitted changes; "unknown" outside a checkout."""
    here = str(Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=20, check=True)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def with_fresh_classifier(model: nn.Module, seed: int) -> nn.Module:
    """A copy of the pretrained net with a seeded new classifier (transfer to new labels)."""
    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    model.classifier = nn.Linear(model.classifier.in_features, NUM_CLASSES)
    return model.eval()


def _ranking_batches(train, plan: Plan) -> list:
    """The first ``rank_steps`` training batches: what the ranking sees, and all it sees."""
    x, y = train
    return [(x[i:i + plan.batch], y[i:i + plan.batch])
            for i in range(0, min(len(x), plan.rank_steps * plan.batch), plan.batch)]


def _batches_digest(batches: list) -> str:
    """A short hash of the images and labels (and their batching): a cached ranking is only
    reused on the very batches it was computed from."""
    digest = hashlib.sha1()
    for x, y in batches:
        for t in (x, y):
            t = t.detach().cpu().contiguous()
            digest.update(repr((tuple(t.shape), t.dtype)).encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:10]


def layer_ranking(name: str, model: nn.Module, plan: Plan, train, cache: Path):
    """RGN ranking of the pretrained net on the fine-tuning data (cached JSON)."""
    from .ranking import LayerRanking, rank_layers

    batches = _ranking_batches(train, plan)
    path = Path(cache) / "rankings" / f"{plan.pretrain_key(name)}_{plan.finetune_data}_" \
                                      f"{plan.rank_steps}_lr{plan.rank_lr:g}_" \
                                      f"{_batches_digest(batches)}.json"
    if path.is_file():
        data = json.loads(path.read_text())
        return LayerRanking(data["arch"], data["scores"], data["steps"], data.get("meta", {}))
    ranking = rank_layers(with_fresh_classifier(model, 0), batches, plan.rank_steps,
                          lr=plan.rank_lr, arch=name)
    if not all(math.isfinite(v) for v in ranking.scores.values()):
        raise ValueError(f"rank_lr={plan.rank_lr:g}: the ranking steps of {name} diverged "
                         "(non-finite RGN scores); allowed: a smaller rate")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"arch": ranking.arch, **ranking.to_dict()}, indent=1) + "\n")
    return ranking


# ------------------------------------------------------------------------- fine-tuning

def _convert(model, setting: str, seed: int, plan: Plan, ranking, example):
    from .api import convert
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "full" has no pool: no ranking warning wanted
        if setting == FULL:
            return convert(model, policy="full", seed=seed, example_input=example)
        bits = None if setting == EXACT else int(setting)
        return convert(model, plan.keep_ratio, policy="d-topk", ranking=ranking, seed=seed,
                       example_input=example, backward_bits=bits)


def finetune_run(pretrained: nn.Module, setting: str, seed: int, plan: Plan, ranking,
                 train, test, lr: float | None = None) -> dict:
    """One fine-tuning run: SGD with warm-up + cosine, ``controller.resample`` per epoch;
    ``lr`` overrides the plan's rate (``plan.full_lr`` for full FT, else ``plan.lr``).

    Seeds fix the classifier's init, the channel draws, the batch order and the global RNG
    (dropout, any random rounding), so runs of the same seed differ only by their setting."""
    from .train import epoch_batches, evaluate, measure_plain_full_finetune, \
        train_one_epoch, warmup_cosine

    if setting not in SETTINGS:
        raise ValueError(f"setting={setting!r}: allowed values are {', '.join(SETTINGS)}")
    (x, y), started = train, time.perf_counter()
    model = with_fresh_classifier(pretrained, seed)
    plain_bytes = measure_plain_full_finetune(copy.deepcopy(model), x[:plan.batch])
    controller = _convert(model, setting, seed, plan, ranking, x[:plan.batch])
    if lr is None:
        lr = plan.full_lr if setting == FULL else plan.lr
    optimizer = torch.optim.SGD([p for p in model.parameters()], lr=lr, momentum=0.9)
    steps = plan.finetune_epochs * -(-len(x) // plan.batch)
    scheduler = warmup_cosine(optimizer, steps, max(steps // 10, 1))
    torch.manual_seed(seed)          # dropout (and any random rounding of the codes)
    epochs = []
    for epoch in range(plan.finetune_epochs):
        controller.resample(epoch)
        batches = epoch_batches(len(x), plan.batch, seed, epoch)
        stats = train_one_epoch(model, controller, optimizer, x, y, batches, scheduler,
                                desc=f"{setting} s{seed}")
        epochs.append({"train_loss": stats["loss"], "measured_bytes": stats["measured_bytes"],
                       "cost_model_bytes": stats["analytic_bytes"]["total"]})
    final = evaluate(model, *test)
    return {"setting": setting, "seed": seed, "lr": lr, "test_accuracy": final["accuracy"],
            "test_loss": final["loss"], "epochs": epochs,
            "saved_bytes": epochs[0]["measured_bytes"],
            "cost_model_bytes": epochs[0]["cost_model_bytes"],
            "plain_full_finetune_bytes": plain_bytes, "bytes_batch": plan.batch,
            "wall_s": time.perf_counter() - started}


def _cached_run(path: Path, run: Callable[[], dict] | None, log, what: str) -> dict | None:
    """The record in ``path`` when there (resume), else ``run()``'s, written there; None when
    missing and ``run`` is None (summarize the finished runs only)."""
    if path.is_file():
        return json.loads(path.read_text())
    if run is None:
        return None
    record = run()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    log(f"{what}: {100 * record['test_accuracy']:.2f}% ({record['wall_s']:.1f} s)")
    return record


# a candidate rate "collapsed" when its held-out accuracy is below this fraction of the best
# candidate's: a finite loss that learned far less (the ViT at 0.2 fell to chance level in
# exact mode) marks the edge of the stable range as surely as a NaN does
COLLAPSE_FRACTION = 0.5


def failed_rates(results: dict[float, dict]) -> set[float]:
    """The rates of ``results`` (rate -> {"accuracy", "diverged"}) that diverged (non-finite
    loss) or collapsed (accuracy < COLLAPSE_FRACTION x the best)."""
    best = max(r["accuracy"] for r in results.values())
    return {lr for lr, r in results.items()
            if r["diverged"] or r["accuracy"] < COLLAPSE_FRACTION * best}


def pick_rate(results: dict[float, dict], parameter: str = "lr_candidates") -> float:
    """The margin rule: the best held-out accuracy among the rates whose next-larger candidate
    neither diverged nor collapsed (nor they themselves). The largest candidate is never
    picked: nothing shows how close it is to the cliff, and a rate next to one did collapse
    a 4-bit seed (ViT, 0.1 next to 0.2). Ties go to the smaller rate."""
    rates, failed = sorted(results), failed_rates(results)
    safe = [lr for lr, larger in zip(rates, rates[1:]) if lr not in failed and larger not in failed]
    if not safe:
        raise ValueError(f"{parameter}={tuple(sorted(results, reverse=True))}: no rate has a "
                         "stable next-larger candidate; allowed: a grid reaching further up "
                         "or down")
    return max(safe, key=lambda lr: (results[lr]["accuracy"], -lr))


def search_rates(name: str, pretrained, plan: Plan, ranking, train, heldout, out: Path,
                 log=print, finished_only: bool = False) -> dict:
    """Per search group (TraDy: tried in exact mode; full FT): every candidate's held-out
    accuracy, one seed, each run cached under ``out/search/``; and the rate picked."""
    code, found = code_version(), {}
    folder = out / "search" / plan.runs_key(name)
    groups = {"trady": EXACT if set(plan.settings) - {FULL} else None,
              "full": FULL if FULL in plan.settings else None}
    for group, setting in groups.items():
        if setting is None:
            continue
        results, grid = {}, "lr_candidates"
        if group == "full" and plan.full_lr_candidates:
            grid = "full_lr_candidates"
        for lr in getattr(plan, grid):
            record = _cached_run(
                folder / f"{setting}_lr{lr:g}.json", None if finished_only else
                lambda: {"net": name, "code": code, **finetune_run(
                    pretrained, setting, plan.search_seed, plan, ranking, train, heldout, lr)},
                log, f"search {name} {setting} lr {lr:g} (held-out)")
            if record is None:       # the rate picked needs every candidate
                raise ValueError(f"finished_only: the rate search of {name} ({setting}, lr "
                                 f"{lr:g}) has not run; allowed: a run without it first")
            results[lr] = {"accuracy": record["test_accuracy"],
                           "diverged": record["test_loss"] is None or not all(
                               math.isfinite(e["train_loss"]) for e in record["epochs"])}
        failed = failed_rates(results)
        found[group] = {"setting": setting, "chosen": pick_rate(results, grid),
                        "candidates": [{"lr": lr, "heldout_accuracy": r["accuracy"],
                                        "diverged": r["diverged"], "failed": lr in failed}
                                       for lr, r in sorted(results.items(), reverse=True)]}
    return found


def run_experiment(plan: Plan, out: Path, log=print,
                   finished_only: bool = False) -> tuple[list[dict], dict]:
    """Every (net, setting, seed) run, seed-major; finished runs (their JSON) are skipped
    (``finished_only``: only those are returned, nothing is fine-tuned).
    Returns the run records and, per net, the pretrained net's test accuracy (and, for a
    searched plan, the rate search under "lr_search")."""
    out, code, facts = Path(out), code_version(), {}
    train, heldout = finetune_splits(plan)
    test = load_split(plan.finetune_data, "test", plan, plan.test_images)
    records = []
    for name in plan.nets:
        pretrained = pretrain(name, plan, out, log)
        ranking = layer_ranking(name, pretrained, plan, train, out)
        facts[name] = {"data": plan.pretrain_data, "test_accuracy":
                       pretrained_accuracy(name, pretrained, plan, out)}
        rates = {}
        if plan.searched:
            facts[name]["lr_search"] = search_rates(name, pretrained, plan, ranking, train,
                                                    heldout, out, log, finished_only)
            rates = {g: s["chosen"] for g, s in facts[name]["lr_search"].items()}
        for seed in plan.seeds:
            for setting in plan.settings:
                lr = rates.get("full" if setting == FULL else "trady")
                suffix = "" if lr is None else f"_lr{lr:g}"
                path = out / "runs" / plan.runs_key(name) / f"{setting}_s{seed}{suffix}.json"
                record = _cached_run(
                    path, None if finished_only else lambda: {"net": name, "code": code, **(
                        finetune_run(pretrained, setting, seed, plan, ranking, train, test, lr))},
                    log, f"{name} {setting} seed {seed}")
                if record is not None:
                    records.append(record)
    return records, facts


# ------------------------------------------------------------------------- summary

def summarize(records: list[dict], plan: Plan, pretrained: dict | None = None) -> dict:
    """Per (net, setting): accuracy spread over seeds and bytes; per net and compressed
    setting: the same-seed difference against exact mode (t interval, sign test)."""
    from .experiments import _spread, paired_statistics

    rows, comparisons = [], []
    for name in plan.nets:
        by_setting = {s: {r["seed"]: r for r in records if r["net"] == name and r["setting"] == s}
                      for s in plan.settings}
        for setting, runs in by_setting.items():
            if not runs:
                continue
            first = next(iter(runs.values()))
            rows.append({"net": name, "setting": setting, "seeds": sorted(runs),
                         "accuracy": _spread([r["test_accuracy"] for r in runs.values()]),
                         "accuracy_per_seed": [runs[s]["test_accuracy"] for s in sorted(runs)],
                         "saved_bytes": _spread([r["saved_bytes"] for r in runs.values()]),
                         "diverged": sum(r["test_loss"] is None for r in runs.values()),
                         "cost_model_match": all(r["saved_bytes"] == r["cost_model_bytes"]
                                                 for r in runs.values()),
                         "plain_full_finetune_bytes": first["plain_full_finetune_bytes"],
                         "lr": first["lr"]})
        exact = by_setting.get(EXACT, {})
        for setting in (s for s in plan.settings if s != EXACT):
            common = sorted(set(exact) & set(by_setting[setting]))
            diffs = [by_setting[setting][s]["test_accuracy"] - exact[s]["test_accuracy"]
                     for s in common]
            if diffs:
                comparisons.append({"net": name, "setting": setting, "seeds": common,
                                    "diffs": diffs, "stats": paired_statistics(diffs)})
    pretrained = pretrained or {}
    return {"format": FORMAT, "version": 1, "plan": dataclasses.asdict(plan),
            "runs": len(records),
            "pretrained": {n: {k: v for k, v in f.items() if k != "lr_search"}
                           for n, f in pretrained.items()},
            "lr_search": {n: f["lr_search"] for n, f in pretrained.items() if "lr_search" in f},
            "code": sorted({r.get("code", "unrecorded") for r in records}),
            "rows": rows, "comparisons": comparisons}


def setting_label(setting: str) -> str:
    return {EXACT: "TraDy exact", FULL: "full fine-tuning"}.get(setting,
                                                                f"TraDy {setting}-bit")


def format_markdown(summary: dict) -> str:
    """The accuracy/bytes table and the paired differences against exact mode."""
    from .tables import markdown_table

    rows = [[r["net"], setting_label(r["setting"]),
             f"{100 * r['accuracy']['mean']:.2f} ± {100 * r['accuracy']['std']:.2f}",
             str(r["accuracy"]["n"]), f"{r['saved_bytes']['mean'] / 2 ** 20:.3f}",
             f"{r['plain_full_finetune_bytes'] / r['saved_bytes']['mean']:.1f}x",
             "yes" if r["cost_model_match"] else "NO", f"{r['lr']:g}",
             str(r.get("diverged", "-"))]
            for r in summary["rows"]]
    table = markdown_table(["net", "setting", "test acc % (mean ± std)", "seeds",
                            "saved MiB (batch %d)" % summary["plan"]["batch"],
                            "plain full FT / this", "= cost model", "lr", "diverged"], rows)
    diffs = []
    for c in summary["comparisons"]:
        st = c["stats"]
        interval = "-" if st["ci_low"] is None else \
            f"[{100 * st['ci_low']:+.2f}, {100 * st['ci_high']:+.2f}]"
        diffs.append([c["net"], f"{setting_label(c['setting'])} - exact",
                      f"{100 * st['mean']:+.2f}", interval,
                      f"{st['wins']}/{st['losses']}/{st['ties']}", f"{st['sign_test_p']:.3f}"])
    paired = markdown_table(["net", "difference", "mean points", "95 % t interval",
                             "wins/losses/ties", "sign test p"], diffs)
    parts = [_plan_line(summary), table,
             "Same-seed differences against exact mode (accuracy points):", paired]
    if summary.get("lr_search"):
        parts += [_search_line(summary), _search_table(summary)]
    return "\n\n".join(parts)


def _search_line(summary: dict) -> str:
    p = summary["plan"]
    return (f"Learning rates: searched on {p['search_images']} held-out {p['finetune_data']} "
            f"training images (disjoint from the fine-tuning ones), seed {p['search_seed']}, "
            f"the same epochs; exact mode's rate is every TraDy setting's. Picked: the best "
            f"held-out accuracy among the rates whose next-larger candidate neither diverged nor "
            f"collapsed (held-out accuracy < {COLLAPSE_FRACTION:g} x the best); "
            f"failed = diverged or collapsed.")


def _search_table(summary: dict) -> str:
    from .tables import markdown_table

    rows = []
    for name, groups in summary["lr_search"].items():
        for group in groups.values():
            tried = ", ".join(f"{c['lr']:g}: {100 * c['heldout_accuracy']:.1f}"
                              + (" (failed)" if c["failed"] else "") for c in group["candidates"])
            rows.append([name, setting_label(group["setting"]), f"{group['chosen']:g}", tried])
    return markdown_table(["net", "searched in", "picked", "held-out acc % per rate"], rows)


def _plan_line(summary: dict) -> str:
    """What ran, in one paragraph: data, cuts, budget, the pretrained nets' accuracy."""
    p = summary["plan"]
    nets = "; ".join(f"{name}: {100 * f['test_accuracy']:.1f} % on {f['data']} test"
                     for name, f in summary.get("pretrained", {}).items())
    return (f"Pretrained on {p['pretrain_images']} {p['pretrain_data']} images for "
            f"{p['pretrain_epochs']} epochs ({nets or 'accuracy not recorded'}); fine-tuned on "
            f"{p['finetune_images']} {p['finetune_data']} images for {p['finetune_epochs']} "
            f"epochs at {p['resolution']}x{p['resolution']}, batch {p['batch']}, tested on "
            f"{p['test_images']}; TraDy d-topk at keep_ratio {p['keep_ratio']:g} of full units. "
            f"Code: {', '.join(summary.get('code', [])) or 'unrecorded'}.")


# ------------------------------------------------------------------------- per-layer cosines

def trained_weight_gradients(model: nn.Module, x, y, bits, plan: Plan, ranking=None,
                             seed: int = 0) -> dict[str, torch.Tensor]:
    """Weight gradients (float64) of the trained layers of a converted copy, one batch, eval
    mode (no dropout: the two modes then differ by the derivative codes alone)."""
    model = copy.deepcopy(model)
    setting = EXACT if bits is None else str(bits)
    controller = _convert(model, setting, seed, plan, ranking, x)
    controller.resample(0)
    model.eval()
    torch.manual_seed(seed)
    F.cross_entropy(model(x), y).backward()
    return {name: m.weight.grad.double() for name, m in controller.modules.items()
            if getattr(m, "weight", None) is not None and m.weight.grad is not None
            and name != controller.classifier}


def gradient_cosines(model: nn.Module, x, y, bits: int, plan: Plan, ranking=None,
                     seed: int = 0) -> dict[str, float]:
    """Per trained layer: cosine of the ``bits`` weight gradient with exact mode's (same
    channels, same batch). Layers whose exact gradient is zero are left out."""
    exact = trained_weight_gradients(model, x, y, None, plan, ranking, seed)
    coded = trained_weight_gradients(model, x, y, bits, plan, ranking, seed)
    return {name: float((g * coded[name]).sum() / (g.norm() * coded[name].norm()))
            for name, g in exact.items() if g.norm() > 0}


# ------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trady-experiments compressed",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/compressed",
                        help="pretrained nets, rankings and one JSON per run (resumable)")
    parser.add_argument("--markdown", help="write the tables here (default: print)")
    parser.add_argument("--json", help="write the summary JSON here")
    parser.add_argument("--plan", default="short", choices=tuple(PLANS),
                        help="short: 1024 images, 2 epochs, fixed rates (default); converged: "
                             "2048 images, 6 epochs, exact/4-bit/full, searched rates")
    parser.add_argument("--tiny", action="store_true",
                        help="seconds-sized version of the plan (checks the code path; "
                             "numbers meaningless)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the plan's seeds")
    parser.add_argument("--nets", nargs="+", choices=tuple(NETS),
                        help="only these nets (e.g. one per process; the summary covers them)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--finished-only", action="store_true",
                        help="fine-tune nothing: summarize the runs already finished")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    plan = plan_named(args.plan, args.tiny)
    if args.seeds:
        plan = dataclasses.replace(plan, seeds=tuple(args.seeds))
    if args.nets:
        plan = dataclasses.replace(plan, nets=tuple(args.nets))
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    records, pretrained = run_experiment(plan, Path(args.out), log=lambda m: print(m, flush=True),
                                         finished_only=args.finished_only)
    summary = summarize(records, plan, pretrained)
    summary["command"] = "trady-experiments compressed " + shlex.join(argv)
    summary["wall_s_this_call"] = time.perf_counter() - started
    text = format_markdown(summary)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text + "\n")
    print(text)
    return 0
