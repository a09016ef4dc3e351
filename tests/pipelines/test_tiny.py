"""``twinflow tiny-pipeline`` and the README's CPU smoke run of ``twinflow train``.

The README's block marked ``<!-- smoke: train -->`` is run line by line, as a newcomer copies
it, in a fresh folder: a tiny pipeline is written, trained for two steps from a prompts file
with the shipped ``smoke_sd3`` config, and the exported pipeline loads and generates.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import twinflow  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]


def _smoke_block():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- smoke: train -->\n```bash\n(.*?)```", text, re.S)
    assert m, "README.md has no smoke-run block"
    return [line for line in m.group(1).splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_smoke_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}")
    (tmp_path / "runs").mkdir()
    for line in _smoke_block():
        r = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"README smoke line failed: {line}\n{r.stderr[-3000:]}"
    assert "the pipeline is in runs/smoke/pipeline" in r.stderr, r.stderr[-1000:]
    pipe = twinflow.load_pipeline(tmp_path / "runs" / "smoke" / "pipeline")  # the export records model and mode
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        img = pipe("a red cat", num_inference_steps=1, height=16, width=16, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()


def test_tiny_pipeline_command(tmp_path, capsys):
    from twinflow.cli import main
    from twinflow.tiny import build

    assert main(["tiny-pipeline", "--model", "sana", "--output-dir", str(tmp_path / "p")]) == 0
    assert "tiny sana pipeline" in capsys.readouterr().out
    from diffusers import SanaPipeline

    loaded = SanaPipeline.from_pretrained(tmp_path / "p")
    fresh = build("sana")
    for k, v in fresh.transformer.state_dict().items():
        assert torch.equal(loaded.transformer.state_dict()[k], v), "seeded: the same call, the same weights"
    assert main(["tiny-pipeline", "--output-dir", str(tmp_path / "p")]) == 1  # not empty: refused
    assert "not an empty folder" in capsys.readouterr().err


def test_train_progress_bar_shows_each_steps_loss(tmp_path, capsys):
    """The bar's loss is the step's own, not the one of the last log_every step."""
    import json

    from twinflow.cli import main

    assert main(["tiny-pipeline", "--model", "sd3", "--output-dir", str(tmp_path / "p"), "--quiet"]) == 0
    (tmp_path / "prompts.txt").write_text("a red cat\na blue dog\na green bird\na white fox\n")
    out = tmp_path / "run"
    assert main(["train", "--config", "smoke_sd3", "--dataset-path", str(tmp_path / "prompts.txt"),
                 "--output-dir", str(out), "--set", f"model.pretrained_model_name_or_path={tmp_path / 'p'}",
                 "--set", "training.max_steps=3", "--set", "training.log_every=100",
                 "--set", "training.sample_every=100", "--set", "training.checkpoint_every=100"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shown = re.findall(r"loss=([-0-9.eE+na]+)", capsys.readouterr().err)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert shown and shown[-1] == f"{rows[-1]['loss']:.4g}", (shown, [r["loss"] for r in rows])
