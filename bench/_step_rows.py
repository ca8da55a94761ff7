"""Rows of the CPU training-step table, measured side by side in one process.

A *row* is a training configuration of _train_bench.py (its step: forward + loss +
backward + SGD) or the no-grad forward of the same model and batch (the inference cost a
TraDy step is compared with). Two measurements, each meant for its own process:

* ``memory_records`` (run under ``MALLOC_MMAP_THRESHOLD_=65536``, so freed tensors go
  back to the OS): the bytes saved for backward and the cost model's figure, then per row
  the process high-water mark of one steady-state step above the idle process;
* ``time_records`` (default allocator): step_ratio's interleaved timing (two warm-ups
  per row, then rounds in which every row runs once; medians of wall and CPU time),
  then profile_step's torch.profiler top ops per row.
"""

from __future__ import annotations

import gc
import types

import torch

from _train_bench import config_key, make_setup

FORWARD = "no-grad forward"


def forward_config(spec_key: str, batch: int) -> dict:
    return {"model": spec_key, "method": FORWARD, "budget": None, "batch": batch,
            "backend": "auto"}


def _no_grad_forward(setup):
    def forward() -> None:
        with torch.no_grad():
            setup.model(setup.x)
    return forward


def build_rows(cfgs: list[dict], device: str = "cpu") -> dict:
    """config_key -> (setup, run). A forward row runs the full fine-tuning model of its
    (model, batch) without autograd (BatchNorm frozen there too), built once if absent."""
    rows, fulls = {}, {}
    for cfg in cfgs:
        if cfg["method"] != FORWARD:
            setup = make_setup(cfg, device)
            rows[config_key(cfg)] = (setup, setup.step)
            if cfg["method"] == "full":
                fulls[(cfg["model"], cfg["batch"])] = setup
    for cfg in cfgs:
        if cfg["method"] == FORWARD:
            group = (cfg["model"], cfg["batch"])
            if group not in fulls:
                fulls[group] = make_setup(dict(cfg, method="full"), device)
            rows[config_key(cfg)] = (fulls[group], _no_grad_forward(fulls[group]))
    return rows


def steady_peak(setup, run, device: str = "cpu") -> int:
    """Bytes one steady-state ``run()`` peaks above the idle process: two warm-up runs,
    then the gradients freed (idle = model, batch and optimizer state), then the
    high-water mark of one run above the resident size just before it (on CUDA: the
    allocator's peak above what is allocated before it)."""
    run()
    run()
    setup.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        idle = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - idle
    from step_ratio import peak_above_idle
    return peak_above_idle(run)


def memory_records(cfgs: list[dict]) -> list[dict]:
    """Per row: saved bytes (measured and cost model) and the steady-state peak above idle."""
    rows = build_rows(cfgs)
    out = []
    for cfg in cfgs:
        setup, run = rows[config_key(cfg)]
        rec = dict(cfg, arch=setup.describe()["arch"], res=setup.res)
        if cfg["method"] != FORWARD:
            rec["saved_bytes"] = setup.measure_saved()
            rec.update(setup.analytic())
        rec["peak_above_idle_bytes"] = steady_peak(setup, run)
        out.append(rec)
    return out


def profile_record(run, steps: int, top: int) -> dict:
    """torch.profiler over ``steps`` runs: the sum of all ops' self CPU time and the
    ``top`` costliest ops, per run."""
    from profile_step import top_ops

    ops = top_ops(types.SimpleNamespace(step=run), steps, 1 << 20)
    return {"profiled_ms": sum(ms for _, ms, _ in ops),
            "top_ops": [[name, ms, calls] for name, ms, calls in ops[:top]]}


def time_records(cfgs: list[dict], steps: int, top: int, profile_steps: int = 2) -> list[dict]:
    """Per row: median wall and CPU seconds of ``steps`` interleaved rounds, then its
    profile (after all timing, so the profiler does not touch the timed steps)."""
    from step_ratio import time_rows

    rows = build_rows(cfgs)
    medians = time_rows({key: run for key, (_, run) in rows.items()}, steps)
    out = []
    for cfg in cfgs:
        key = config_key(cfg)
        setup, run = rows[key]
        wall, cpu = medians[key]
        rec = dict(cfg, arch=setup.describe()["arch"], res=setup.res, step_median_s=wall,
                   cpu_median_s=cpu, steps=steps)
        rec.update(profile_record(run, profile_steps, top))
        out.append(rec)
    return out
