#!/usr/bin/env bash
# The CPU benchmark suite and the CPU tables of bench/RESULTS.md, in one command:
#   bash bench/run_cpu.sh            (about 10 minutes on one core of a shared machine)
# 1. pytest-benchmark suite (kernels + training step), JSON in bench/results/cpu/;
# 2. the CPU kernel table  -> RESULTS.md section cpu-kernels;
# 3. the training-step table (rows interleaved per model, no-grad forward, peaks above idle,
#    profiles) -> section cpu-train-step.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
THREADS=${TRADY_BENCH_THREADS:-1}
mkdir -p bench/results/cpu
"$PY" -m pytest bench/ --benchmark-only --bench-threads "$THREADS" --benchmark-max-time=0.5 \
    --benchmark-json=bench/results/cpu/pytest_benchmark.json -q "$@"
"$PY" bench/run_bench.py --device cpu --mode cpu --threads "$THREADS" \
    --out bench/results/cpu/kernels --update-results > /dev/null
"$PY" bench/train_step_table.py --threads "$THREADS" --out bench/results/cpu
