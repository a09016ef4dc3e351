"""``twinflow generate`` / ``load_pipeline`` on damaged or hostile pipeline folders (issue 14):
one-line errors before any weights load, and no NaN image written with exit status 0.

Each case copies the saved tiny SD3 pipeline of ``tiny_pipelines`` and damages the copy.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch


pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

import tiny_pipelines  # noqa: E402
from tiny_pipelines import one_thread  # noqa: E402,F401 (autouse fixture)
from twinflow.cli import main  # noqa: E402

SIZE = tiny_pipelines.TEST_SIZE


def _copy(tmp_path):
    dst = tmp_path / "pipe"
    shutil.copytree(tiny_pipelines.saved_pipeline("sd3", "aux"), dst)
    return dst


def _generate(folder, out, capsys, *extra):
    capsys.readouterr()
    rc = main(["generate", "--model", "sd3", "--model-path", str(folder), "--prompt", "x", "--height", str(SIZE),
               "--width", str(SIZE), "--device", "cpu", "--output-dir", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, (err[-1] if err else "")


def _nan_weights(folder):
    for f in folder.glob("*.safetensors"):
        w = load_file(str(f))
        save_file({k: torch.full_like(v, float("nan")) for k, v in w.items()}, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize("component,needle", [("transformer", "model output"), ("vae", "decoded images")])
def test_nan_weights_fail_without_writing_an_image(tmp_path, capsys, component, needle):
    folder = _copy(tmp_path)
    _nan_weights(folder / component)
    rc, err = _generate(folder, tmp_path / "out", capsys)
    assert rc == 1 and err.startswith("twinflow generate: error: ") and needle in err and "NaN" in err, err
    assert not list((tmp_path / "out").glob("*.png"))


def test_absurd_step_count_is_refused_before_loading(tmp_path, capsys):
    rc, err = _generate(tmp_path / "does-not-matter", tmp_path / "out", capsys, "--steps", str(10**12))
    assert rc == 1 and "--steps" in err, err


def _edit_index(folder, **entries):
    index = json.loads((folder / "model_index.json").read_text())
    index.update(entries)
    (folder / "model_index.json").write_text(json.dumps(index))


def test_pickled_text_encoder_is_refused(tmp_path, capsys):
    folder = _copy(tmp_path)
    enc = folder / "text_encoder"
    weights = load_file(str(enc / "model.safetensors"))
    (enc / "model.safetensors").unlink()
    torch.save(weights, enc / "pytorch_model.bin")
    rc, err = _generate(folder, tmp_path / "out", capsys)
    assert rc == 1 and "pickle" in err and "text_encoder" in err, err


def test_unknown_class_and_wrong_vae_class_are_refused(tmp_path, capsys):
    folder = _copy(tmp_path)
    _edit_index(folder, vae=["diffusers", "AutoencoderKLDoesNotExist"])
    rc, err = _generate(folder, tmp_path / "out", capsys)
    assert rc == 1 and "no class 'AutoencoderKLDoesNotExist'" in err, err
    _edit_index(folder, vae=["diffusers", "AutoencoderTiny"])
    rc, err = _generate(folder, tmp_path / "out", capsys)
    assert rc == 1 and "needs a AutoencoderKL" in err and "AutoencoderTiny" in err, err
    _edit_index(folder, vae=["os", "system"])
    rc, err = _generate(folder, tmp_path / "out", capsys)
    assert rc == 1 and "vae comes from 'os'; only ('diffusers', 'transformers', " in err, err


def test_tokenizer_without_vocabulary_is_refused(tmp_path, capsys):
    folder = _copy(tmp_path)
    for f in (folder / "tokenizer").iterdir():
        if f.name != "tokenizer_config.json":
            f.unlink()
    rc, err = _generate(folder, tmp_path / "out", capsys)
    assert rc == 1 and "tokenizer" in err and "no vocabulary" in err, err


def test_absurd_depth_in_config_is_refused_before_building(tmp_path, capsys):
    folder = _copy(tmp_path)
    cfg_path = folder / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_layers"] = 100000
    cfg_path.write_text(json.dumps(cfg))
    rc, err = _generate(folder, tmp_path / "out", capsys)
    assert rc == 1 and "num_layers = 100000" in err and "at most" in err, err
