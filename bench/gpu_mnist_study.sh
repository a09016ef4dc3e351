#!/usr/bin/env bash
# The MNIST fine-tuning study (issue 19, docs/mnist.md) on a CUDA GPU, to budgets this 2-core
# CPU cannot afford: the study's best variants from the shipped flow-matching model to 10000
# fine-tune steps, 2k-sample classifier-FIDs every 500 steps and 10k at the end. Rows go to
# docs/mnist/study/gpu/<variant>.jsonl (device and thread count in each row), never mixed with
# the CPU rows. Nothing in the package or its tests needs this script.
#
#   bash bench/gpu_mnist_study.sh                     # after bash .ci/install
#   VARIANTS="er0_const" STEPS=6000 bash bench/gpu_mnist_study.sh
#
# The MNIST files must be on the machine (no downloads there): TWINFLOW_DATA=<dir> holding
# mnist/ (the cache twinflow fills), or the default cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu_mnist_study.sh: no CUDA device")'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
STEPS=${STEPS:-10000}
for v in ${VARIANTS:-er0_cos10k er0_const}; do
  "$PY" bench/mnist_finetune_study.py run "$v" --device cuda --threads 4 \
    --at $(seq 500 500 "$STEPS") --study-dir docs/mnist/study/gpu --runs runs/study-gpu
done
