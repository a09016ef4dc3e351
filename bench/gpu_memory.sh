#!/usr/bin/env bash
# Peak GPU memory of 1024² transformer calls and VAE decodes for the published configs
# (random weights built on the GPU, nothing downloaded), bf16 / int8 / fp8 (torchao): the measured
# side of bench/memory_table.py (README "Low-memory" table). A few minutes on one H100/H200
# (Qwen-Image's 20B transformer needs ~41 GB in bf16).
#
#   bash bench/gpu_memory.sh                      # after bash .ci/install (uses .venv if present)
#   bash bench/gpu_memory.sh --pipelines z-image  # a subset
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu_memory.sh: no CUDA device")'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec "$PY" bench/gpu_memory.py "$@"
