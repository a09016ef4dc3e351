"""bench/pipeline_nfe.py and bench/gpu_pipeline.sh: the CPU side of the pipeline benchmark.

The GPU script runs pipeline_nfe.py with the SD3.5-medium transformer config on CUDA; here the
same script runs on a tiny transformer on CPU (both dtypes the GPU run uses), the full-size
config is built on the meta device, and the shell script refuses to run without CUDA.
"""

from __future__ import annotations

import contextlib
import io
import subprocess

import pytest
import torch
from checks import ROOT, load_script

pytest.importorskip("diffusers")

BENCH = ROOT / "bench"


def _bench():
    return load_script("bench/pipeline_nfe.py")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pipeline_nfe_runs_on_cpu(dtype):
    out = io.StringIO()
    n = torch.get_num_threads()
    with contextlib.redirect_stdout(out):
        assert _bench().main(["--repeats", "1", "--layers", "1", "--latent", "16", "--text-len", "5",
                              "--threads", "1", "--device", "cpu", "--dtype", dtype]) == 0
    torch.set_num_threads(n)
    rows = [line.split("|")[1:-1] for line in out.getvalue().splitlines() if line.startswith("| ")][1:]
    assert [r[0].strip() for r in rows][0].startswith("FlowMatchEuler")
    assert [int(r[2]) for r in rows] == [28, 1, 2, 4, 3], "transformer calls"
    assert [int(r[3]) for r in rows] == [56, 1, 2, 4, 3], "rows: the stock run doubles its batch for CFG"
    assert dtype in out.getvalue()


def test_sd35_medium_config_builds():
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        m = SD3Transformer2DModel(**_bench().SD35_MEDIUM)
    assert 2.0e9 < sum(p.numel() for p in m.parameters()) < 3.0e9
    assert m.config.num_layers == 24 and m.config.joint_attention_dim == 4096


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_gpu_script_refuses_without_cuda():
    r = subprocess.run(["bash", str(BENCH / "gpu_pipeline.sh")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no CUDA device" in r.stderr
