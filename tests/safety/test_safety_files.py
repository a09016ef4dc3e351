"""Untrusted folders: no reads outside the folder, no FIFOs, no unpickling (issue 14).

Covers ``twinflow._files``, the pipeline-folder check of ``load_pipeline`` and the training
checkpoint loader. The pipeline folders here are minimal (JSON and one small safetensors file):
``check_pipeline_folder`` runs before diffusers reads anything, so no model is built.
"""

from __future__ import annotations

import json
import os
import pathlib
import threading

import pytest
import torch
from safetensors.torch import save_file

from twinflow import _files
from twinflow.pipelines import check_pipeline_folder, read_aux_weights
from twinflow.training import checkpoint as ckpt


def _finishes(fn, seconds=10.0):
    """Run fn in a thread; fail (instead of hanging the suite) when it blocks."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "blocked reading a FIFO"
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ----------------------------------------------------------------------------- _files


def test_inside_refuses_escapes(tmp_path):
    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret").write_text("x")
    assert _files.inside(root, "sub") == root / "sub"
    assert _files.inside(root, "sub/../sub") == root / "sub/../sub"
    for bad in ("../secret", "sub/../../secret", str(tmp_path / "secret"), "/etc/hostname", "", 5, None):
        with pytest.raises(ValueError, match="outside|invalid"):
            _files.inside(root, bad)
    os.symlink(tmp_path / "secret", root / "link")
    with pytest.raises(ValueError, match="resolves to"):
        _files.inside(root, "link")


def test_inside_allows_hugging_face_cache_blobs(tmp_path):
    repo = tmp_path / "hub" / "models--org--name"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    (snap / "vae").mkdir(parents=True)
    (repo / "blobs" / "deadbeef").write_text("{}")
    os.symlink(repo / "blobs" / "deadbeef", snap / "vae" / "config.json")
    assert _files.read_json(_files.inside(snap, "vae/config.json")) == {}
    (tmp_path / "elsewhere").write_text("{}")
    os.symlink(tmp_path / "elsewhere", snap / "vae" / "other.json")
    with pytest.raises(ValueError, match="outside the folder"):
        _files.inside(snap, "vae/other.json")


def test_fifo_and_folders_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="FIFO"):
        _finishes(lambda: _files.read_json(fifo))
    with pytest.raises(ValueError, match="folder"):
        _files.regular_file(tmp_path)
    with pytest.raises(FileNotFoundError):
        _files.regular_file(tmp_path / "missing")


def test_read_json_limits(tmp_path):
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"a": "x" * 200}))
    with pytest.raises(ValueError, match="larger than"):
        _files.read_json(big, max_bytes=100)
    lst = tmp_path / "list.json"
    lst.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        _files.read_json(lst)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="JSON"):
        _files.read_json(deep)


# ----------------------------------------------------------------------------- pipeline folders


def _pipeline(root: pathlib.Path) -> pathlib.Path:
    (root / "transformer").mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    (root / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    save_file({"time_text_embed_2.w": torch.ones(2)}, str(root / "transformer" / "diffusion_pytorch_model.safetensors"))
    return root


def test_a_minimal_folder_passes(tmp_path):
    assert check_pipeline_folder(_pipeline(tmp_path / "m"), "sd3") == tmp_path / "m"


@pytest.mark.parametrize("name", ["../outside", "/tmp", "a/../../outside"])
def test_model_index_cannot_point_outside(tmp_path, name):
    root = _pipeline(tmp_path / "m")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "config.json").write_text("{}")
    index = json.loads((root / "model_index.json").read_text())
    index[name] = ["diffusers", "AutoencoderKL"]
    (root / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside"):
        check_pipeline_folder(root, "sd3")


def test_sharded_index_cannot_point_outside(tmp_path):
    root = _pipeline(tmp_path / "m")
    t = root / "transformer"
    (t / "diffusion_pytorch_model.safetensors").rename(tmp_path / "shard.safetensors")
    (t / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"time_text_embed_2.w": "../../shard.safetensors"}}))
    with pytest.raises(ValueError, match="outside"):
        check_pipeline_folder(root, "sd3")
    with pytest.raises(ValueError, match="outside"):
        read_aux_weights(t, "time_text_embed_2.")


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    root = _pipeline(tmp_path / "m")
    (tmp_path / "hostname").write_text("secret")
    os.symlink(tmp_path / "hostname", root / "transformer" / "notes.txt")
    with pytest.raises(ValueError, match="outside the folder"):
        check_pipeline_folder(root, "sd3")


def test_fifo_in_a_component_is_refused(tmp_path):
    root = _pipeline(tmp_path / "m")
    os.mkfifo(root / "transformer" / "extra.json")
    with pytest.raises(ValueError, match="FIFO"):
        _finishes(lambda: check_pipeline_folder(root, "sd3"))


# ----------------------------------------------------------------------------- training checkpoints


def _checkpoint(root: pathlib.Path, step: int, state=None) -> pathlib.Path:
    def writer(tmp):
        torch.save(state if state is not None else {"step": step}, tmp / "trainer_state.pt")
        torch.save([ckpt.rng_state()], tmp / "rng_states.pt")
    return ckpt.write(root, step, writer)


def test_marker_cannot_name_files_outside(tmp_path):
    path = _checkpoint(tmp_path / "checkpoints", 2)
    (tmp_path / "hostname").write_text("secret")
    marker = json.loads((path / ckpt.MARKER).read_text())
    marker["files"]["../../hostname"] = {"size": 6, "sha256": "0" * 64}
    (path / ckpt.MARKER).write_text(json.dumps(marker))
    with pytest.raises(ValueError, match="outside"):
        ckpt.verify(path)


def test_folder_name_must_match_the_step(tmp_path):
    path = _checkpoint(tmp_path / "checkpoints", 2)
    assert ckpt.verify(path)["step"] == 2
    path.rename(path.parent / "step-000009")
    with pytest.raises(ValueError, match="step 9 but it holds step 2"):
        ckpt.resolve_resume("auto", tmp_path / "checkpoints")


class _Payload:
    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(os.environ["TWINFLOW_TEST_MARKER"]),))


def test_a_pickle_payload_is_never_run(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("TWINFLOW_TEST_MARKER", str(marker))
    # A complete, correctly hashed checkpoint whose state file carries code.
    path = _checkpoint(tmp_path / "checkpoints", 3, state={"step": 3, "x": _Payload()})
    assert ckpt.verify(path)["step"] == 3  # the hashes are right: only the loader can stop it
    with pytest.raises(ValueError, match="refusing to unpickle"):
        ckpt.load_state(path / "trainer_state.pt")
    assert not marker.exists()


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # a cached gaussian in the numpy state
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    want = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.standard_normal())
    ckpt.set_rng_state(ckpt.load_state(tmp_path / "rng.pt"))
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.standard_normal())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1])
    assert want[2] == got[2] and want[3] == got[3]
