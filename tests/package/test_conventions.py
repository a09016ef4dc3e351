"""Conventions a diffusers user expects: the diffusers version floor, no Hub request from
``twinflow train``, logging instead of prints in library code, and ``--quiet`` on every command.
"""

from __future__ import annotations

import ast
import logging
import os
import pathlib
import re

import pytest


import twinflow  # noqa: E402
from twinflow.cli import COMMANDS, build_parser, main  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = pathlib.Path(twinflow.__file__).parent
# tqdm's bar: "  40%|████      | 2/5 [00:01<00:01, 2.0it/s]"
BAR = ("%|", "it/s]", "s/it]")


def _bars(text: str):
    return [line for line in text.replace("\r", "\n").splitlines() if any(b in line for b in BAR)]


# ----------------------------------------------------------------------------- diffusers floor

def test_pyproject_floor_is_the_checked_one():
    from twinflow.diffusers_patch._backbone import MIN_DIFFUSERS

    # 0.35.2 has no ZImagePipeline; 0.36.0 has, but its Qwen-Image transformer requires
    # txt_seq_lens; the backbone suites pass on 0.37.0 (docs/decisions.md, "Packaging").
    assert MIN_DIFFUSERS == "0.37.0"
    for path, spec in ((REPO / "pyproject.toml", f'"diffusers>={MIN_DIFFUSERS}"'),
                       (REPO / ".ci" / "requirements.txt", f"\ndiffusers>={MIN_DIFFUSERS}\n")):
        text = path.read_text()
        assert spec in text and not re.search(r"diffusers>=0\.3[0-6]", text), path


def _names(path):
    lines = [ln.split("#")[0].strip() for ln in path.read_text().splitlines()]
    return {re.split(r"[<>=!~\[ ]", ln, 1)[0].lower().replace("_", "-"): ln for ln in lines if ln}


def test_ci_installs_pinned_versions():
    """.ci/install installs .ci/requirements.txt under .ci/constraints.txt (docs/decisions.md,
    "Pinned CI"): every requirement is pinned to one version, and the pins satisfy the ranges."""
    from packaging.requirements import Requirement

    install = (REPO / ".ci" / "install").read_text()
    assert "-r .ci/requirements.txt -c .ci/constraints.txt" in install
    reqs, pins = _names(REPO / ".ci" / "requirements.txt"), _names(REPO / ".ci" / "constraints.txt")
    assert all("==" in line for line in pins.values()), "constraints are exact pins"
    for name, line in reqs.items():
        assert name in pins, f"{name} is installed by .ci/install but not pinned in .ci/constraints.txt"
        assert pins[name].split("==")[1] in Requirement(line).specifier, (line, pins[name])


def test_z_image_with_an_older_diffusers_names_the_version(monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import tiny_pipelines

    folder = tiny_pipelines.saved_pipeline("z-image")
    monkeypatch.setattr(diffusers, "__version__", "0.36.0")
    with pytest.raises(ImportError, match=r"diffusers 0\.36\.0 is too old for ZImage.*diffusers>=0\.37\.0"):
        twinflow.load_pipeline(folder, "z-image")
    monkeypatch.undo()
    from twinflow.diffusers_patch._backbone import _diffusers_class

    with pytest.raises(ImportError, match=r"has no NoSuchPipeline: twinflow needs diffusers>=0\.37\.0"):
        _diffusers_class("NoSuchPipeline")


def test_generate_with_an_older_diffusers_is_one_line(monkeypatch, tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import tiny_pipelines

    folder = tiny_pipelines.saved_pipeline("z-image")
    monkeypatch.setattr(diffusers, "__version__", "0.35.2")
    rc = main(["generate", "--model", "z-image", "--model-path", str(folder), "--prompt", "x", "--device", "cpu",
               "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "diffusers>=0.37.0" in err[0], err


# ----------------------------------------------------------------------------- train: local folders only

def test_train_with_a_hub_id_is_one_line_before_any_diffusers_call(tmp_path, monkeypatch, capsys):
    diffusers = pytest.importorskip("diffusers")
    from PIL import Image

    def no_loading(*args, **kwargs):
        raise AssertionError("diffusers was asked to load (a Hub request for a non-local path)")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for cls in (diffusers.DiffusionPipeline, diffusers.ModelMixin):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(no_loading))
    data = tmp_path / "data"  # a valid dataset: without the check, loading the model comes next
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a caption")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: {name: sd3, pretrained_model_name_or_path: stabilityai/stable-diffusion-3.5-medium}\n"
                   "training: {max_steps: 1, mixed_precision: 'no'}\ndata: {resolution: 8, num_workers: 0}\n")
    rc = main(["train", "--config", str(cfg), "--dataset-path", str(data), "--output-dir", str(tmp_path / "out"),
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert "'stabilityai/stable-diffusion-3.5-medium' is not a local folder" in err[0]
    assert "--set model.pretrained_model_name_or_path=DIR" in err[0]


# ----------------------------------------------------------------------------- logging

_COMMAND_LINE_MODULES = {"cli.py", "demo.py", "tiny.py", "generate.py", "training/command.py", "tutorials/mnist/cli.py",
                         "export_gguf.py"}


def test_library_code_logs_instead_of_printing():
    """``print`` only in the command-line modules (their output is the user's); everything else
    uses ``logging.getLogger(__name__)``."""
    sources = [(os.path.relpath(os.path.join(d, f), PACKAGE), pathlib.Path(d, f))
               for d, _, files in os.walk(PACKAGE, followlinks=True) for f in files if f.endswith(".py")]
    assert any(rel.startswith("diffusers_patch/") for rel, _ in sources)  # the patches too
    offenders = []
    for rel, path in sources:
        if rel in _COMMAND_LINE_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, offenders


def test_verbosity_like_diffusers(monkeypatch):
    from twinflow import _logging

    monkeypatch.setattr(logging.getLogger("twinflow"), "level", logging.getLogger("twinflow").level)
    monkeypatch.setenv("TWINFLOW_VERBOSITY", "info")
    _logging._from_environment()
    assert twinflow.get_verbosity() == logging.INFO
    assert logging.getLogger("twinflow.pipelines").getEffectiveLevel() == logging.INFO
    twinflow.set_verbosity("error")
    assert logging.getLogger("twinflow.training.trainer").getEffectiveLevel() == logging.ERROR
    twinflow.set_verbosity(logging.WARNING)
    with pytest.raises(ValueError, match="expected one of"):
        twinflow.set_verbosity("loud")
    monkeypatch.setenv("TWINFLOW_VERBOSITY", "loud")
    _logging._from_environment()
    assert twinflow.get_verbosity() == logging.WARNING


# ----------------------------------------------------------------------------- --quiet everywhere

def _subcommand_parsers():
    """(argv prefix, parser) of every command and of the mnist sub-commands."""
    import argparse

    parser = build_parser()
    found = []

    def walk(p, prefix):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            found.append((prefix, p))
        for action in subs:
            for name, sub in action.choices.items():
                walk(sub, prefix + [name])
    walk(parser, [])
    return found


def test_every_command_takes_quiet():
    found = _subcommand_parsers()
    names = {" ".join(prefix) for prefix, _ in found}
    assert set(COMMANDS) - {"mnist"} <= names and {"mnist train", "mnist sample", "mnist evaluate",
                                                   "mnist train-classifier"} <= names
    for prefix, p in found:
        assert "--quiet" in p._option_string_actions, " ".join(prefix)


def test_demo_quiet(tmp_path, capfd):
    argv = ["demo", "--train-steps", "3", "--num-samples", "16", "--steps-list", "1", "--presets", "--image-size",
            "16", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    assert _bars(capfd.readouterr().err)  # the training bars, shown even off a terminal
    assert main(argv + ["--quiet"]) == 0
    out = capfd.readouterr()
    assert not _bars(out.err) and not _bars(out.out) and "wrote" in out.out


def test_generate_quiet(tmp_path, capfd):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import tiny_pipelines

    argv = ["generate", "--model", "sd3", "--model-path", str(tiny_pipelines.saved_pipeline("sd3")), "--prompt", "a",
            "--prompt", "b", "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu",
            "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    assert _bars(capfd.readouterr().err)  # the pipeline's bar over its steps
    assert main(argv + ["--quiet"]) == 0
    assert not _bars(capfd.readouterr().err)


def test_train_quiet(tmp_path, capfd):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from PIL import Image
    import tiny_pipelines

    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"caption {i}")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {{name: sd3, pretrained_model_name_or_path: {tiny_pipelines.saved_pipeline('sd3')}}}\n"
                   "training: {batch_size: 4, max_steps: 1, mixed_precision: 'no', checkpoint_every: 100, "
                   "sample_every: 100}\ndata: {resolution: 8, num_workers: 0}\n")
    assert main(["train", "--config", str(cfg), "--dataset-path", str(data), "--output-dir", str(tmp_path / "out"),
                 "--quiet"]) == 0
    assert not _bars(capfd.readouterr().err)
    assert (tmp_path / "out" / "pipeline").is_dir()


def test_mnist_quiet(tmp_path, capfd, monkeypatch):
    import importlib

    data = importlib.import_module("twinflow.tutorials.mnist.data")
    load = data.load_mnist  # 64 images: this checks the bars, not the digits
    for module in (data, importlib.import_module("twinflow.tutorials.mnist.evaluate")):
        monkeypatch.setattr(module, "load_mnist", lambda *a, **k: tuple(t[:64] for t in load(*a, **k)))
    run = tmp_path / "run"
    for argv in (["train", "--batch-size", "32", "--train-subset", "64", "--width", "8", "--max-steps", "1",
                  "--output-dir", str(run)],
                 ["sample", "--checkpoint", str(run), "--num-samples", "10", "--output-dir", str(tmp_path / "s")],
                 ["evaluate", "--checkpoint", str(run), "--steps", "1", "--num-samples", "20"],
                 ["train-classifier", "--epochs", "1", "--output", str(tmp_path / "c.safetensors")]):
        assert main(["mnist", *argv, "--quiet"]) == 0, argv
        assert not _bars(capfd.readouterr().err), argv
