"""bench/gpu_memory.py's code path (build on meta, materialise, quantize with the time embedders
skipped, the 1024²-style call) on the CPU with the tiny pipelines' configs, so the GPU script is
known to run before device time is spent on it."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

import tiny_pipelines
from tiny_pipelines import one_thread  # noqa: F401 (autouse fixture)

pytest.importorskip("torchao")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))
import gpu_memory  # noqa: E402


@pytest.mark.parametrize("model", ["qwen-image", "z-image", "sd3"])
@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_components_run_on_the_cpu(model, fmt):
    from twinflow import quantization

    folder = tiny_pipelines.saved_pipeline(model, "stock")
    cls = json.loads((folder / "transformer" / "config.json").read_text())["_class_name"]
    spec = {"library": "diffusers", "class": cls,
            "config": json.loads((folder / "transformer" / "config.json").read_text())}
    m, out = gpu_memory.run_component(spec, fmt, "transformer", torch.device("cpu"), image=64, text=5)
    first = out[0] if isinstance(out, (tuple, list)) else out
    first = first[0] if isinstance(first, list) else first
    assert torch.isfinite(first.float()).all()
    embed = gpu_memory.TIME_EMBEDDERS[cls][0]
    assert quantization.quantized_modules(getattr(m, embed)) == []
    assert bool(quantization.quantized_modules(m)) == (fmt == "int8")
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    vae = {"library": "diffusers", "class": vae_cfg["_class_name"], "config": vae_cfg}
    _, img = gpu_memory.run_component(vae, "bf16", "vae", torch.device("cpu"), image=64)
    assert torch.isfinite(img.sample.float()).all()
