#!/bin/bash
# The long-horizon experiment of docs/EXPERIMENTS.md ("Dynamic against static over 30
# epochs"): one backbone per call, seeds in order (every policy and data set of a seed before
# the next seed), so that a partial run leaves whole seeds. Resumable: run it again to skip the
# finished runs and resume an interrupted one from its checkpoint.
#   bash scripts/long_horizon.sh mcunet-in1 & bash scripts/long_horizon.sh mbv2-w0.35 &
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1
# the paper's smallest budget as a keep ratio of full fine-tuning: 15,936 of 1,309,808 units
# (MCUNet-in1), 27,946 of 1,252,320 (MobileNetV2-w0.35); the absolute units hold at 128x128
case $model in
  mcunet-in1) budget=0.012167 ;;
  mbv2-w0.35) budget=0.022315 ;;
  *) echo "model: allowed values are mcunet-in1, mbv2-w0.35" >&2; exit 2 ;;
esac
for seed in ${SEEDS:-0 1 2 3 4}; do
  trady-experiments sweep --models "$model" --data fashion-mnist mnist \
    --policies d-topk s-topk d-fullrandom s-fullrandom --budgets "$budget" --seeds "$seed" \
    --resolution 64 --epochs 30 --warmup-epochs 3 --train-subset 96 --test-subset 2000 \
    --eval-every 30 --track-updates --lrs-from "docs/results/long_lr_search_$model.json" \
    --out runs/long --quiet
done
