"""Training-step configurations: TraDy against the baselines of the issue.

One step = forward + cross-entropy + backward + SGD step (no momentum), BatchNorm with
frozen statistics everywhere (eval-mode BN in the plain models, convert()'s default in
TraDy), so every configuration computes the same forward.

Methods:

* ``full``        plain model, every parameter trainable (full fine-tuning);
* ``frozen``      plain PyTorch freezing by ``requires_grad``: the whole layers in which
                  TraDy selected channels this epoch, plus the classifier (plain PyTorch
                  cannot train a subset of a layer's input channels);
* ``simulation``  the paper's / tiny-training's masked-gradient simulation: those layers
                  trainable, full backward, then the weight gradient zeroed outside the
                  selected input channels before the SGD step;
* ``classifier``  plain model, only the classifier trainable;
* ``trady``       ``trady_triton.convert(model, budget, policy="d-topk")``.

Saved bytes are measured with ``trady_triton.saved_tensor_bytes(model)`` around the
forward (parameters and buffers excluded). The cost model's figure is
``saved_bytes_for_backward`` of trady_triton.cost for what the configuration trains: for
TraDy exactly ``controller.saved_bytes(batch)['total']`` (compact activations +
classifier input + 1-bit masks behind the earliest trained layer).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from _shapes import BUDGET_LEVELS, KEEP_RATIOS, MBV2_BUDGET_UNITS

METHODS = ("full", "frozen", "simulation", "classifier", "trady")
NUM_CLASSES = 10
LR = 1e-3

MODEL_SPECS = {
    # the paper's setting: MobileNetV2-w0.35 at 128x128, absolute budgets in memory units
    "mbv2": {"model": "mbv2-w0.35-arch", "res": 128,
             "budgets": {lvl: {"budget_units": u} for lvl, u in zip(BUDGET_LEVELS,
                                                                     MBV2_BUDGET_UNITS)}},
    # EfficientNet-Lite0 at 224x224: the paper's budgets as keep ratios of its full units
    "lite0": {"model": "efficientnet-lite0", "res": 224,
              "budgets": {lvl: {"keep_ratio": r} for lvl, r in zip(BUDGET_LEVELS, KEEP_RATIOS)}},
    # the paper's MCUNet-in1 (its weights file from /work/shared/models or TRADY_MODELS_DIR)
    "mcunet": {"model": "mcunet-in1", "res": 128,
               "budgets": {lvl: {"keep_ratio": r} for lvl, r in zip(BUDGET_LEVELS, KEEP_RATIOS)}},
    # smoke tests: the same architecture at 32x32
    "tiny": {"model": "mbv2-w0.35-arch", "res": 32,
             "budgets": {lvl: {"keep_ratio": r} for lvl, r in zip(BUDGET_LEVELS, KEEP_RATIOS)}},
}


def _build_plain(spec_key: str, device: str, seed: int) -> nn.Module:
    from trady_triton.models import build_model

    torch.manual_seed(seed)
    name = MODEL_SPECS[spec_key]["model"]
    if name == "efficientnet-lite0":   # weights do not change timing or memory
        model = build_model(name, pretrained=False, num_classes=NUM_CLASSES)
    else:
        model = build_model(name, num_classes=NUM_CLASSES)
    return model.to(device)


def _convert(model: nn.Module, budget: dict, example, seed: int):
    import trady_triton as tt

    with warnings.catch_warnings():
        # no shipped ranking for these architectures: the pool is every layer (warned)
        warnings.simplefilter("ignore")
        return tt.convert(model, **budget, example_input=example, policy="d-topk", seed=seed)


def _channel_mask(module: nn.Module, channels: torch.Tensor) -> torch.Tensor:
    """1 where the weight gradient belongs to a selected input channel, else 0."""
    w = module.weight
    mask = torch.zeros(w.shape, dtype=w.dtype)
    if isinstance(module, nn.Linear):
        mask[:, channels] = 1
        return mask.to(w.device)
    groups = module.groups
    in_per_group = module.in_channels // groups
    out_per_group = module.out_channels // groups
    for c in channels.tolist():
        g, local = divmod(c, in_per_group)
        mask[g * out_per_group:(g + 1) * out_per_group, local] = 1
    return mask.to(w.device)


class StepSetup:
    """A model, its data and optimizer, set up for one method; ``step()`` trains once."""

    def __init__(self, spec_key: str, method: str, level: str | None, batch: int,
                 device: str = "cpu", backend: str = "auto", seed: int = 0):
        import trady_triton as tt
        from trady_triton import cost as C
        from trady_triton.profile import profile_model

        if method not in METHODS:
            raise ValueError(f"method={method!r}: allowed values are {METHODS}")
        self.spec_key, self.method, self.level = spec_key, method, level
        self.device, self.backend, self.batch = device, backend, batch
        spec = MODEL_SPECS[spec_key]
        self.res = spec["res"]
        model = _build_plain(spec_key, device, seed)
        self.set_batch(batch)
        example = self.x[:2]
        self.controller = None
        selection: dict = {}
        classifier = "classifier"
        if method in ("trady", "frozen", "simulation"):
            budget = spec["budgets"][level]
            if method == "trady":
                self.controller = _convert(model, budget, example, seed)
                selection = self.controller.selection
                classifier = self.controller.classifier
                profile = self.controller.profile
            else:
                probe = _convert(copy.deepcopy(model), budget, example, seed)
                selection = {k: v.clone() for k, v in probe.selection.items()}
                classifier = probe.classifier
                profile = probe.profile
                del probe
        else:
            profile = profile_model(model, example, classifier)
        self.selection = selection
        self.classifier = classifier
        self.layers, self.masks_cost = profile.layers, profile.masks

        # trainable parameters and modes
        model.train()
        if method != "trady":
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()       # frozen statistics, as convert() does
            for p in model.parameters():
                p.requires_grad_(method == "full")
            if method in ("frozen", "simulation"):
                for name in selection:
                    model.get_submodule(name).weight.requires_grad_(True)
            if method in ("frozen", "simulation", "classifier"):
                for p in model.get_submodule(classifier).parameters():
                    p.requires_grad_(True)
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=LR)
        self.grad_masks = []
        if method == "simulation":
            for name, channels in selection.items():
                module = model.get_submodule(name)
                self.grad_masks.append((module.weight, _channel_mask(module, channels.cpu())))

        # the cost model's figures
        by_name = {l.name: l for l in self.layers}
        head = by_name[classifier].in_channels if classifier in by_name else 0
        if method == "full":
            counts = {l.name: l.in_channels for l in self.layers}
        elif method == "classifier":
            counts = {classifier: head}
        elif method == "trady":
            counts = self.controller.counts()
        else:
            counts = {name: by_name[name].in_channels for name in selection}
            counts[classifier] = head
        self.counts = counts
        sel_counts = {name: int(v.numel()) for name, v in selection.items()}
        sel_counts[classifier] = head
        self.sel_counts = sel_counts
        self._C = C
        self.tt = tt

    # ------------------------------------------------------------------ data
    def set_batch(self, batch: int) -> None:
        self.batch = batch
        self.x = None
        self.y = None
        gen_seed = 1234 + batch
        torch.manual_seed(gen_seed)
        self.x = torch.randn(batch, 3, self.res, self.res, device=self.device)
        self.y = torch.randint(0, NUM_CLASSES, (batch,), device=self.device)

    # ------------------------------------------------------------------ step
    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.tt.backend(self.backend):
            loss = F.cross_entropy(self.model(self.x), self.y)
            loss.backward()
        for weight, mask in self.grad_masks:
            if weight.grad is not None:
                weight.grad.mul_(mask)
        self.optimizer.step()

    def measure_saved(self) -> int:
        """Bytes autograd keeps for backward during one forward (measured), then backward."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.tt.backend(self.backend):
            with self.tt.saved_tensor_bytes(self.model) as saved:
                out = self.model(self.x)
            F.cross_entropy(out, self.y).backward()
        self.optimizer.zero_grad(set_to_none=True)
        del out
        return int(saved.total)

    def analytic(self, batch: int | None = None) -> dict:
        b = self.batch if batch is None else batch
        C = self._C
        floor = C.saved_bytes_for_backward(self.layers, self.masks_cost, self.counts, b)
        sel = C.saved_bytes_for_backward(self.layers, self.masks_cost, self.sel_counts, b)
        full = C.saved_bytes_for_backward(
            self.layers, self.masks_cost, {l.name: l.in_channels for l in self.layers}, b)
        out = {"cost_model_bytes": floor["total"], "cost_model_parts": floor,
               "trady_floor_same_selection_bytes": sel["total"] if self.selection else None,
               "full_floor_bytes": full["total"],
               "conv_linear_inputs_bytes": C.full_finetune_saved_bytes_estimate(self.layers, b)}
        if self.controller is not None:
            assert self.controller.saved_bytes(b)["total"] == floor["total"]
            stats = self.controller.stats()
            out.update({"selected_units": stats.selected_units,
                        "budget_units": self.controller.budget_units,
                        "full_units": stats.full_units,
                        "weight_sparsity": stats.weight_sparsity,
                        "activation_sparsity": stats.activation_sparsity,
                        "flops_saved": stats.flops_saved,
                        "pool_layers": len(self.controller.pool)})
        out["trained_layers"] = len(self.selection)
        out["trained_params"] = sum(p.numel() for p in self.params)
        return out

    def describe(self) -> dict:
        return {"model": self.spec_key, "arch": MODEL_SPECS[self.spec_key]["model"],
                "res": self.res, "method": self.method, "budget": self.level,
                "batch": self.batch, "device": self.device, "backend": self.backend}

    def free(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.x = self.y = None


# ------------------------------------------------------------------ configurations
def configs(spec_key: str, batches, levels=BUDGET_LEVELS, trady_backends=("auto",),
            methods=METHODS) -> list[dict]:
    """The configurations of one model: budget-free methods once, the others per budget."""
    out = []
    for batch in batches:
        for method in methods:
            if method in ("full", "classifier"):
                out.append({"model": spec_key, "method": method, "budget": None,
                            "batch": batch, "backend": "auto"})
        for level in levels:
            for method in methods:
                if method in ("full", "classifier"):
                    continue
                for backend in (trady_backends if method == "trady" else ("auto",)):
                    out.append({"model": spec_key, "method": method, "budget": level,
                                "batch": batch, "backend": backend})
    return out


def config_key(cfg: dict) -> str:
    return "|".join(str(cfg.get(k)) for k in ("model", "method", "budget", "batch", "backend"))


def make_setup(cfg: dict, device: str) -> StepSetup:
    return StepSetup(cfg["model"], cfg["method"], cfg["budget"], cfg["batch"], device,
                     cfg.get("backend", "auto"))


# ------------------------------------------------------------------ largest batch under a cap
def find_max_batch(fits, start: int = 8, limit: int = 1 << 16, rel_tol: float = 1 / 16,
                   deadline: float | None = None, clock=time.monotonic) -> dict:
    """Largest batch b with ``fits(b)`` True, assuming fits is monotone in b.

    Doubling from ``start`` until a failure (or ``limit``), then bisection until the
    gap is within ``rel_tol`` of the best batch. ``fits`` may raise: the search stops
    and reports the error. Returns {"max_batch", "first_fail", "probes", "limited_by"}.
    """
    ok, bad, probes = 0, None, []
    limited_by = None

    def probe(b):
        result = bool(fits(b))
        probes.append([b, result])
        return result

    try:
        b = start
        while b <= limit:
            if deadline is not None and clock() > deadline:
                limited_by = "time"
                break
            if probe(b):
                ok, b = b, b * 2
            else:
                bad = b
                break
        else:
            limited_by = "limit"
        if bad is not None and ok == 0:            # even `start` does not fit: go down
            b = bad // 2
            while b >= 1:
                if deadline is not None and clock() > deadline:
                    limited_by = "time"
                    break
                if probe(b):
                    ok = b
                    break
                bad, b = b, b // 2
        if bad is not None and ok > 0 and limited_by is None:
            while bad - ok > max(1, int(ok * rel_tol)):
                if deadline is not None and clock() > deadline:
                    limited_by = "time"
                    break
                mid = (ok + bad) // 2
                if probe(mid):
                    ok = mid
                else:
                    bad = mid
    except Exception as e:   # noqa: BLE001 - reported with the result
        limited_by = f"error: {type(e).__name__}: {e}"[:300]
    return {"max_batch": ok, "first_fail": bad, "probes": probes, "limited_by": limited_by}


def is_oom(e: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t)
    if oom_types and isinstance(e, oom_types):
        return True
    text = str(e)
    return any(s in text for s in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED",
                                   "CUDNN_STATUS_ALLOC_FAILED"))


def cuda_fits(setup: StepSetup):
    """A ``fits(b)`` for find_max_batch: one training step at batch b, OOM -> False."""
    def fits(b: int) -> bool:
        setup.free()
        gc.collect()
        torch.cuda.empty_cache()
        try:
            setup.set_batch(b)
            setup.step()
            torch.cuda.synchronize()
            return True
        except Exception as e:   # noqa: BLE001
            if is_oom(e):
                return False
            raise
        finally:
            setup.free()
            gc.collect()
            torch.cuda.empty_cache()
    return fits


@contextlib.contextmanager
def pinned_autotune():
    """Pin every Triton autotuner of trady_triton.kernels to one config for a while.

    The largest-batch search runs one step per probe, each at a new batch size, i.e. a
    new autotuning key for every trained layer: benchmarking all configs again each
    time would cost seconds per probe. The tile config changes neither what is
    allocated nor the split-K workspace, so memory is unaffected; step times are not
    taken from this search. Yields the number of autotuners pinned.
    """
    saved = []
    try:
        from triton.runtime.autotuner import Autotuner
        seen = set()
        for name, module in list(sys.modules.items()):
            if module is None or not name.startswith("trady_triton.kernels"):
                continue
            for obj in list(vars(module).values()):
                if isinstance(obj, Autotuner) and id(obj) not in seen and len(obj.configs) > 1:
                    seen.add(id(obj))
                    best = getattr(obj, "best_config", None)
                    saved.append((obj, obj.configs))
                    obj.configs = [best if best is not None else obj.configs[0]]
    except Exception:   # noqa: BLE001 - pinning is an optimisation only
        pass
    try:
        yield len(saved)
    finally:
        for obj, configs in saved:
            obj.configs = configs
