"""twinflow.load_pipeline on checkpoint folders as they exist, and on Hub repo ids.

* A transformer whose config.json names the published training wrapper (stock class name +
  "Wrapper", what inclusionAI/TwinFlow's training saves) loads as the stock class, with an
  info message, and gives the same images as the stock-named folder.
* A transformer-only folder (what the published training writes) combined with a base
  pipeline: ``load_pipeline(base, transformer=folder)``; also a transformer module.
* Hub repo ids resolve through huggingface_hub's cache, laid out on disk here
  (models--org--repo/{refs, snapshots/<sha>, blobs}) with HF_HUB_CACHE pointed at it and
  HF_HUB_OFFLINE=1: the repo root, a subfolder, a revision (tag), ``twinflow generate
  --model-path org/repo``; a repo that is not cached is a FileNotFoundError naming it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch


from twinflow import diffusers_patch  # noqa: E402
import tiny_pipelines  # noqa: E402
from checks import expect_error  # noqa: E402
from hub_cache import lay_out_repo  # noqa: E402
from tiny_pipelines import one_thread  # noqa: E402,F401 (autouse fixture)
from twinflow import load_pipeline  # noqa: E402
from twinflow.diffusers_patch import backbone  # noqa: E402

SIZE = tiny_pipelines.TEST_SIZE
ROOT = pathlib.Path(__file__).resolve().parents[2]


generate = tiny_pipelines.generate_images


def quiet_load(*args, **kw):
    with tiny_pipelines.strict_warnings():  # trained aux weights present: no warning expected
        return load_pipeline(*args, **kw)


def wrapper_transformer_folder(model, dst: pathlib.Path) -> pathlib.Path:
    """The aux layout's transformer alone, its config naming the published wrapper class."""
    shutil.copytree(tiny_pipelines.saved_pipeline(model, "aux") / "transformer", dst)
    config = json.loads((dst / "config.json").read_text())
    config["_class_name"] += "Wrapper"
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# ----------------------------------------------------------------------------- published layouts

@pytest.mark.exact
@pytest.mark.parametrize("model", tiny_pipelines.PIPELINES)
def test_wrapper_transformer_alone_with_a_base_pipeline(model, tmp_path, caplog):
    want = generate(quiet_load(tiny_pipelines.saved_pipeline(model, "aux"), model), model)
    tdir = wrapper_transformer_folder(model, tmp_path / "published-transformer")
    with caplog.at_level(logging.INFO, logger="twinflow.pipelines"):
        pipe = quiet_load(tiny_pipelines.saved_pipeline(model, "stock"), model, transformer=tdir)
    assert any("Wrapper" in r.getMessage() and "published TwinFlow training wrapper" in r.getMessage()
               for r in caplog.records)
    assert type(pipe.transformer).__name__ == backbone(model).transformer_class_name
    assert torch.equal(generate(pipe, model), want)


@pytest.mark.exact
def test_wrapper_name_inside_a_pipeline_folder(tmp_path, caplog):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_pipelines.saved_pipeline("z-image", "aux"), folder, ignore=shutil.ignore_patterns("transformer"))
    wrapper_transformer_folder("z-image", folder / "transformer")
    with caplog.at_level(logging.INFO, logger="twinflow.pipelines"):
        pipe = quiet_load(folder, "z-image")
    assert "ZImageTransformer2DModelWrapper" in caplog.text
    assert torch.equal(generate(pipe, "z-image"), generate(quiet_load(tiny_pipelines.saved_pipeline("z-image", "aux"),
                                                                      "z-image"), "z-image"))


@pytest.mark.exact
def test_transformer_module_and_pipeline_folder_as_transformer_source():
    aux = tiny_pipelines.saved_pipeline("sd3", "aux")
    want = generate(quiet_load(aux, "sd3"), "sd3")
    # a pipeline folder given as the transformer source: its transformer/ is used
    assert torch.equal(generate(quiet_load(tiny_pipelines.saved_pipeline("sd3", "stock"), "sd3", transformer=aux),
                                "sd3"), want)
    # an already loaded module with its trained aux embedder attached
    module = copy.deepcopy(quiet_load(aux, "sd3").transformer)
    diffusers_patch.backbone("sd3").unpatch(module)  # stock again, then the trained aux weights re-attached
    bare = copy.deepcopy(module)  # before load_pipeline patches `module` in place and wires it
    module.add_module("time_text_embed_2", copy.deepcopy(quiet_load(aux, "sd3").transformer.time_text_embed_2))
    assert torch.equal(generate(quiet_load(tiny_pipelines.saved_pipeline("sd3", "stock"), "sd3", transformer=module),
                                "sd3"), want)
    # a module without aux weights: published initialisation and a warning
    with pytest.warns(UserWarning, match="no aux target-time embedder"):
        load_pipeline(tiny_pipelines.saved_pipeline("sd3", "stock"), "sd3", transformer=bare)


def test_transformer_source_errors(tmp_path):
    base = tiny_pipelines.saved_pipeline("sd3", "stock")
    expect_error(FileNotFoundError, lambda: load_pipeline(base, "sd3", transformer=tmp_path / "none"),
                 contains="no such folder")
    (tmp_path / "empty").mkdir()
    expect_error(FileNotFoundError, lambda: load_pipeline(base, "sd3", transformer=tmp_path / "empty"),
                 contains="config.json")
    expect_error(ValueError, lambda: load_pipeline(
        base, "sd3", transformer=tiny_pipelines.saved_pipeline("sana", "aux") / "transformer"),
        contains=("SanaTransformer2DModel", "SD3Transformer2DModel"))
    expect_error(TypeError, lambda: load_pipeline(base, "sd3", transformer=torch.nn.Linear(2, 2)),
                 contains="SD3Transformer2DModel")
    expect_error(ValueError, lambda: load_pipeline(base, "sd3", transformer=3), contains="transformer")
    expect_error(ValueError, lambda: load_pipeline(base, "sd3", subfolder="../x"), contains="subfolder")
    expect_error(ValueError, lambda: load_pipeline(base, "sd3", revision="v1"), contains=("revision", "local"))


# ----------------------------------------------------------------------------- Hub cache

def tree(folder: pathlib.Path, prefix: str = "") -> dict:
    return {prefix + str(f.relative_to(folder)): f for f in folder.rglob("*") if f.is_file()}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    sd3 = tiny_pipelines.saved_pipeline("sd3", "aux")
    lay_out_repo(cache, "twinflow-test/tiny-sd3", tree(sd3))
    lay_out_repo(cache, "twinflow-test/several", {**tree(sd3, "sd3/"), **tree(sd3 / "transformer", "ckpt/")},
                 revision="v1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.mark.exact
def test_hub_repo_ids_from_the_cache(hub):
    want = generate(quiet_load(tiny_pipelines.saved_pipeline("sd3", "aux"), "sd3"), "sd3")
    pipe = quiet_load("twinflow-test/tiny-sd3", "sd3")
    assert hub in pathlib.Path(pipe.config._name_or_path).parents
    assert torch.equal(generate(pipe, "sd3"), want)
    pipe = quiet_load("twinflow-test/several", "sd3", subfolder="sd3", revision="v1")
    assert torch.equal(generate(pipe, "sd3"), want)
    # a transformer from a repo (its own subfolder is not taken: the transformer/ of a pipeline repo is)
    pipe = quiet_load(tiny_pipelines.saved_pipeline("sd3", "stock"), "sd3", transformer="twinflow-test/tiny-sd3")
    assert torch.equal(generate(pipe, "sd3"), want)
    expect_error(FileNotFoundError, lambda: load_pipeline("twinflow-test/not-cached", "sd3"),
                 contains=("twinflow-test/not-cached", "HF_HUB_OFFLINE"))
    expect_error(FileNotFoundError, lambda: load_pipeline("twinflow-test/several", "sd3", subfolder="sd3"),
                 contains="twinflow-test/several")  # only the v1 tag is cached
    expect_error(FileNotFoundError, lambda: load_pipeline("twinflow-test/tiny-sd3", "sd3", subfolder="nope"),
                 contains="nope")


@pytest.mark.slow
def test_generate_cli_with_a_repo_id(hub, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the installed package, as a user runs it
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "twinflow", "generate", "--model", "sd3", "--model-path", "twinflow-test/several",
           "--subfolder", "sd3", "--revision", "v1", "--prompt", "a cat", "--steps", "2", "--height", str(SIZE),
           "--width", str(SIZE), "--device", "cpu", "--output-dir", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((out / "000-00.json").read_text())
    assert (rec["model_path"], rec["subfolder"], rec["revision"]) == ("twinflow-test/several", "sd3", "v1")
    r = subprocess.run(cmd[:7] + ["twinflow-test/missing"] + cmd[8:], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 1 and "twinflow-test/missing" in r.stderr and len(r.stderr.strip().splitlines()) == 1
