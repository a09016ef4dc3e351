#!/usr/bin/env bash
# Full-size version of bench/pipeline_nfe.py for a machine with a CUDA GPU: diffusers'
# StableDiffusion3Pipeline with a random-weight transformer of SD3.5-medium's published config
# (2.5B parameters, bf16, created on the GPU: nothing is downloaded), 1024×1024-image token
# count (128×128 latents) and 333 prompt tokens. Prints a markdown table: the stock
# FlowMatchEuler scheduler at its default 28 steps with CFG 7 against TwinFlowScheduler at
# 1, 2 and 4 NFE (and order 2), in the same run. A few minutes in all on one H100/H200.
#
#   bash bench/gpu_pipeline.sh                # after bash .ci/install (uses .venv if present)
#   REPEATS=5 bash bench/gpu_pipeline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu_pipeline.sh: no CUDA device")'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec "$PY" bench/pipeline_nfe.py --transformer sd3.5-medium --device cuda --dtype bfloat16 \
  --latent 128 --text-len 333 --repeats "${REPEATS:-3}" "$@"
