#!/usr/bin/env bash
# TwinFlow training throughput on one GPU: a few steps of a full-size, random-weight
# SD3.5-medium transformer (published config written inline in bench/gpu_train.py, no
# downloads), LoRA and full fine-tuning with the published settings in bf16 autocast.
# Prints one JSON line per mode with images/s and peak GPU memory.
#
# Needs the package installed in .venv (bash .ci/install) and a CUDA GPU (full fine-tuning
# of the 2.5B model holds fp32 weights, gradients, AdamW state and the EMA copy: ~50 GB).
#   bash bench/gpu_train.sh                      # 4 timed steps each, batch 4, 1024 px
#   STEPS=2 RESOLUTION=512 bash bench/gpu_train.sh
#   SIZE=tiny RESOLUTION=32 STEPS=1 bash bench/gpu_train.sh     # CPU smoke test (tests/training/test_train_bench.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORKDIR:-$(mktemp -d /tmp/twinflow-gpu-train.XXXX)}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi: CPU run"
for mode in lora full; do   # separate processes: peak memory per mode
  "$PY" bench/gpu_train.py --mode "$mode" --size "${SIZE:-sd35-medium}" --steps "${STEPS:-4}" --resolution "${RESOLUTION:-1024}" \
    --batch-size "${BATCH:-4}" --workdir "$WORK"
done
