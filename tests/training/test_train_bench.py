"""bench/gpu_train.sh on CPU with a tiny transformer (SIZE=tiny): the script the GPU sessions
run goes through both modes and prints one JSON result line per mode."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_train_script_smoke(tmp_path):
    env = dict(os.environ, SIZE="tiny", RESOLUTION="32", STEPS="1", BATCH="4", WORKDIR=str(tmp_path),
               PYTHON=sys.executable, OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_train.sh")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [x["mode"] for x in results] == ["lora", "full"]
    for x in results:
        # 8 TwinFlow calls, two pairs of them batched (teacher cond + uncond; the two
        # distribution-matching calls): SD3's prompt and empty-prompt rows join.
        assert x["images_per_s"] > 0 and x["model_calls_per_step"] == 6 and x["steps"] == 1
    lora, full = results
    assert 0 < lora["trained_params"] < full["trained_params"] == full["params"]
