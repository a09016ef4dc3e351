"""The MNIST fine-tuning study (docs/mnist.md, "From a multi-step model to one step").

Each variant fine-tunes the shipped flow-matching checkpoint with ``twinflow mnist train
--init-from flow_matching`` settings and is scored along the way: at every step in --at, the
run is continued to that step (resume is exact, so this is one uninterrupted run) and
evaluated at 1 and 2 NFE on --samples class-balanced samples (seed 0); after the last
step, again on --final-samples. Rows go to docs/mnist/study/<variant>.jsonl; a step already
there is not measured again, so a stopped study continues where it stopped.

    python bench/mnist_finetune_study.py run er0            # one variant (see VARIANTS)
    python bench/mnist_finetune_study.py presets er0        # sampler settings on its final checkpoint
    python bench/mnist_finetune_study.py gap er0_cos4k      # by class: accuracy, diversity, sharpness
    python bench/mnist_finetune_study.py plot               # docs/mnist/finetune_study.png
    python bench/mnist_finetune_study.py table              # the final rows as a Markdown table
    python bench/mnist_finetune_study.py ship er0_const_seed1  # its checkpoint becomes the shipped `twinflow` one

Equivalent command of a variant (e.g. er05_frozen at 1000 steps):

    twinflow mnist train --init-from flow_matching --lr 2e-4 --max-steps 1000 --epochs 100 \\
        --threads 1 --loss enhanced_ratio=0.5 --loss ema_decay_rate=1.0 --output-dir runs/er05_frozen
    twinflow mnist evaluate --checkpoint runs/er05_frozen --steps 1 2 --num-samples 10000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "docs" / "mnist" / "study"

# name: (description, TrainSettings fields). All start from the shipped flow-matching model
# (1500 steps of batch 128) and keep its batch size, label dropout and sampling EMA.


def _variant(what: str, enhanced_ratio: float | None = None, frozen: bool = False, *,
             method: str = "twinflow", lr: float = 2e-4, **fields):
    """One VARIANTS entry: `frozen` takes the guidance from the frozen base (ema_decay_rate 1)
    instead of the EMA teacher; `enhanced_ratio` None keeps the recipe's own."""
    loss = {} if enhanced_ratio is None else {"enhanced_ratio": enhanced_ratio}
    if frozen:
        loss["ema_decay_rate"] = 1.0
    return what, dict(method=method, lr=lr, **fields, loss_overrides=loss)


VARIANTS = {
    "er0": _variant("TwinFlow, no guidance in the target (enhanced_ratio 0)", 0.0),
    "er05": _variant("TwinFlow recipe as is (enhanced_ratio 0.5, EMA teacher 0.99)"),
    "er05_frozen": _variant("enhanced_ratio 0.5, guidance from the frozen base (ema_decay_rate 1)", 0.5, True),
    "er025_frozen": _variant("enhanced_ratio 0.25, guidance from the frozen base (ema_decay_rate 1)", 0.25, True),
    "er025_frozen_seed1": _variant("as er025_frozen, seed 1", 0.25, True, seed=1),
    "er1_frozen": _variant("enhanced_ratio 1, guidance from the frozen base (ema_decay_rate 1)", 1.0, True),
    "er05_frozen_lr5e-4": _variant("as er05_frozen, lr 5e-4", 0.5, True, lr=5e-4),
    "er05_frozen_seed1": _variant("as er05_frozen, seed 1", 0.5, True, seed=1),
    "rcgm_er05_frozen": _variant("RCGM (no self-adversarial term), otherwise as er05_frozen", 0.5, True,
                                 method="rcgm"),
    # Two stages: the guided target for the first 200 steps (copied out of er05_frozen_seed1's
    # run at step 200), then no guidance.
    "two_stage": _variant("er05_frozen (seed 1) for 200 steps, then enhanced_ratio 0 (EMA teacher 0.99)", 0.0,
                          init_from="runs/study/er05_frozen_seed1_at200"),
    # Long unguided runs (issue 19), 2 threads, one training at a time: the constant lr that the
    # short study used, and a cosine decay to 0 over the run's 4000 steps.
    "er0_cos4k": _variant("enhanced_ratio 0, lr 2e-4 cosine-decayed to 0 over 4000 steps", 0.0,
                          lr_schedule="cosine", lr_decay_steps=4000),
    "er0_const": _variant("enhanced_ratio 0, constant lr 2e-4 (er0 run long)", 0.0),
    "er0_const_seed1": _variant("as er0_const, seed 1", 0.0, seed=1),
    # A decay tail as a new fine-tune (init_from the long run's sampling weights): fresh Adam
    # moments and EMA, so it first loses ground (stopped at 500 steps; rows kept).
    "er0_s1_tail2k": _variant("er0_const_seed1 at 8000 steps, then 2000 steps of lr 2e-4 cosine-decayed to 0", 0.0,
                              seed=1, init_from="runs/study/er0_const_seed1_at8000",
                              lr_schedule="cosine", lr_decay_steps=2000),
    # The decay as the same run: constant lr until lr_decay_start, then a cosine to 0 over 2000
    # steps. Up to the start this is the constant run itself, so the study branches from its
    # checkpoint there (`branch`, exact) instead of training those steps again.
    "er0_s1_decay8k": _variant("as er0_const_seed1 to 8000 steps, then lr cosine-decayed to 0 over 2000 steps", 0.0,
                               seed=1, lr_schedule="cosine", lr_decay_steps=2000, lr_decay_start=8000,
                               branch_from="runs/study/er0_const_seed1_at8000"),
    # For a GPU (bench/gpu_mnist_study.sh): the cosine over 10000 steps.
    "er0_cos10k": _variant("enhanced_ratio 0, lr 2e-4 cosine-decayed to 0 over 10000 steps", 0.0,
                           lr_schedule="cosine", lr_decay_steps=10000),
}


def _rows(name, study: Path = STUDY):
    path = study / f"{name}.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


_SCHEDULE_KEYS = ("lr_schedule", "lr_decay_steps", "lr_decay_start")


def branch(src: Path, dst: Path, settings) -> None:
    """Copy run `src` to `dst` as a checkpoint of `settings`. Allowed only when the two differ in
    the lr schedule alone and give the same lr at every step `src` has taken (a constant-lr run
    up to a delayed cosine's start): then resuming `dst` is exactly a run of `settings` from the
    beginning, without training the shared steps again."""
    import dataclasses
    import shutil

    from twinflow.tutorials.mnist.train import _BUDGET_KEYS, TrainSettings, lr_at

    config = json.loads((src / "config.json").read_text())
    saved = config["settings"]
    defaults = dataclasses.asdict(TrainSettings())
    wanted = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(settings))).items() if k not in _BUDGET_KEYS}
    diff = sorted(k for k, v in wanted.items() if saved.get(k, defaults[k]) != v)
    if not set(diff) <= set(_SCHEDULE_KEYS):
        raise ValueError(f"branch {src} → {dst}: settings differ beyond the lr schedule ({', '.join(diff)})")
    old = TrainSettings(**{k: saved.get(k, defaults[k]) for k in defaults})
    steps = config["progress"]["step"]
    if any(lr_at(old, k) != lr_at(settings, k) for k in range(steps)):
        raise ValueError(f"branch {src} → {dst}: the two schedules differ within the {steps} steps taken")
    shutil.copytree(src, dst)
    config["settings"].update({k: wanted[k] for k in _SCHEDULE_KEYS})
    config["branched_from"] = {"path": str(src), "step": steps}
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def run(name: str, at, samples: int, final_samples: int, threads: int, runs: Path, device: str = "cpu",
        study: Path = STUDY) -> None:
    import torch

    from twinflow.tutorials.mnist.evaluate import evaluate
    from twinflow.tutorials.mnist.train import TrainSettings, train

    torch.set_num_threads(threads)
    _, fields = VARIANTS[name]
    fields = dict(fields)
    branch_from = fields.pop("branch_from", None)
    out = runs / name
    if branch_from is not None and not (out / "config.json").is_file():
        branch(ROOT / branch_from, out, TrainSettings(**{"init_from": "flow_matching", **fields}))
    study.mkdir(parents=True, exist_ok=True)
    done = {(r["step"], r["num_samples"]) for r in _rows(name, study)}
    plan = [(k, samples) for k in at] + [(at[-1], final_samples)]
    for step, n in plan:
        if (step, n) in done:
            continue
        settings = TrainSettings(**{"init_from": "flow_matching", **fields}, epochs=100, max_steps=step,
                                 checkpoint_every=100000)
        cfg = train(settings, out, progress=False, device=device)
        t0 = time.perf_counter()
        rows = evaluate(out, steps=[1, 2], num_samples=n, progress=False, device=device)
        step = cfg["progress"]["step"]  # the checkpoint's own step (a stopped run may be past the plan)
        for r in rows:
            record = {"variant": name, "step": step, "total_steps": cfg["total"]["steps"],
                      "train_s": round(cfg["progress"]["elapsed_s"], 1), "device": device, "threads": threads, **r}
            with open(study / f"{name}.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
        print(f"{name} step {step}: evaluated {n} samples in {time.perf_counter() - t0:.0f} s", flush=True)


# Sampler settings compared on one checkpoint (presets subcommand): the published presets,
# then other start gaps (1 NFE) and other intermediate times and noise ratios (2 NFE).
PRESETS = {
    "1-nfe (preset: t 0.999 -> 0)": dict(sampling_steps=1, stochast_ratio=0.8, rfba_gap_steps=(0.001, 0.7)),
    "1-nfe, t 1.0 -> 0": dict(sampling_steps=1, stochast_ratio=0.0, rfba_gap_steps=(0.0, 0.7)),
    "1-nfe, t 0.98 -> 0": dict(sampling_steps=1, stochast_ratio=0.0, rfba_gap_steps=(0.02, 0.7)),
    "2-nfe (preset: mid 0.6, s 1.0)": dict(sampling_steps=2, stochast_ratio=1.0, rfba_gap_steps=(0.001, 0.6)),
    "2-nfe, mid 0.4, s 1.0": dict(sampling_steps=2, stochast_ratio=1.0, rfba_gap_steps=(0.001, 0.4)),
    "2-nfe, mid 0.8, s 1.0": dict(sampling_steps=2, stochast_ratio=1.0, rfba_gap_steps=(0.001, 0.8)),
    "2-nfe, mid 0.6, s 0.5": dict(sampling_steps=2, stochast_ratio=0.5, rfba_gap_steps=(0.001, 0.6)),
    "2-nfe, mid 0.6, s 0 (deterministic)": dict(sampling_steps=2, stochast_ratio=0.0, rfba_gap_steps=(0.001, 0.6)),
}


def presets(name: str, samples: int, threads: int, runs: Path) -> None:
    import torch

    from twinflow import UnifiedSampler
    from twinflow.tutorials.mnist.checkpoint import load_model
    from twinflow.tutorials.mnist.data import load_mnist
    from twinflow.tutorials.mnist.metrics import features, load_classifier, sample_metrics
    from twinflow.tutorials.mnist.sample import generate

    torch.set_num_threads(threads)
    model, config = load_model(runs / name)
    clf = load_classifier()
    ref, _ = features(clf, load_mnist("test")[0])
    labels = torch.arange(10).repeat(-(-samples // 10))[:samples]
    path = STUDY / f"{name}_presets.jsonl"
    for label, kw in PRESETS.items():
        s = UnifiedSampler(sampling_style="few", **kw)
        images = generate(model, labels, s, generator=torch.Generator().manual_seed(0))
        record = {"variant": name, "step": config["progress"]["step"], "sampler": label, "settings": s.to_dict(),
                  "nfe": s.nfe, **sample_metrics(clf, images, labels, ref)}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


def guidance(names, runs: Path, n: int = 1000) -> None:
    """Effective guidance scale w of each variant's current checkpoint: the least-squares w in
    F(x_t, t, t, c) − u ≈ w·(c − u), where c and u are the BASE model's conditional and
    unconditional velocities at the same points (real test digits, t ~ U(0.1, 0.9), seed 0).
    The base itself gives w = 1; a model that learned CFG at scale 1 + r from the base gives 1 + r."""
    import torch

    from twinflow.tutorials.mnist.checkpoint import load_model, shipped_checkpoint
    from twinflow.tutorials.mnist.data import load_mnist
    from twinflow.tutorials.mnist.train import to_model_input

    base, _ = load_model(shipped_checkpoint("flow_matching"))
    images, labels = load_mnist("test")
    g = torch.Generator().manual_seed(0)
    x = to_model_input(images[:n])
    y = labels[:n]
    t = 0.1 + 0.8 * torch.rand(n, generator=g)
    z = torch.randn(x.shape, generator=g).contiguous(memory_format=torch.channels_last)
    x_t = t.view(-1, 1, 1, 1) * z + (1 - t.view(-1, 1, 1, 1)) * x
    null = base.null_labels(n)
    with torch.no_grad():
        c, u = base(x_t, t, t, c=[y]), base(x_t, t, t, c=[null])
        d = (c - u).flatten(1)
        out = {}
        for name in names:
            model, config = load_model(runs / name) if name != "base" else (base, {"progress": {"step": 0}})
            f = (model(x_t, t, t, c=[y]) - u).flatten(1)
            w = float((f * d).sum() / (d * d).sum())
            out[name] = {"step": config["progress"]["step"], "w": round(w, 3)}
            print(name, out[name], flush=True)
    path = STUDY / "guidance.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**old, **out}, indent=1) + "\n")


def gap(name: str, samples: int, threads: int, runs: Path) -> None:
    """What separates a variant's 1- and 2-NFE samples from the base's 50 Euler steps, by class:
    accuracy (off-class samples), diversity (the trace of the class's feature covariance over the
    test images' own) and sharpness (mean absolute pixel gradient over the test images'), each
    with the class's own FID against its test images. Writes docs/mnist/study/gap_<variant>.json."""
    import torch

    from twinflow.tutorials.mnist.checkpoint import load_model, shipped_checkpoint
    from twinflow.tutorials.mnist.data import load_mnist
    from twinflow.tutorials.mnist.metrics import features, frechet_distance, load_classifier
    from twinflow.tutorials.mnist.sample import generate, sampler_for

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    clf = load_classifier()
    test_images, test_labels = load_mnist("test")
    ref_feats, _ = features(clf, test_images)
    labels = torch.arange(10).repeat_interleave(samples // 10)

    def sharpness(images):
        x = images.double()
        return float((x[:, 1:, :] - x[:, :-1, :]).abs().mean() + (x[:, :, 1:] - x[:, :, :-1]).abs().mean())

    def describe(images):
        feats, preds = features(clf, images)
        rows = {}
        for c in range(10):
            mine, ref = feats[labels == c], ref_feats[test_labels == c]
            rows[c] = {"accuracy": round(float((preds[labels == c] == c).double().mean()), 3),
                       "fid": round(frechet_distance(mine, ref), 1),
                       "diversity": round(float(torch.cov(mine.double().T).trace() / torch.cov(ref.double().T).trace()), 3),
                       "sharpness": round(sharpness(images[labels == c]) / sharpness(test_images[test_labels == c]), 3)}
        return rows

    model, config = load_model(runs / name)
    base, _ = load_model(shipped_checkpoint("flow_matching"))
    out = {"variant": name, "step": config["progress"]["step"], "samples": samples, "seed": 0, "by_class": {}}
    for label, net, sampler in ((f"{name} 1-NFE", model, sampler_for("twinflow", 1)),
                                (f"{name} 2-NFE", model, sampler_for("twinflow", 2)),
                                ("base 50 Euler steps", base, sampler_for("flow_matching", 50))):
        images = generate(net, labels, sampler, generator=torch.Generator().manual_seed(0))
        out["by_class"][label] = describe(images)
        print(label, json.dumps(out["by_class"][label]), flush=True)
    (STUDY / f"gap_{name}.json").write_text(json.dumps(out, indent=1) + "\n")


def _reference():
    """Flow matching (the base) sampled with 50 Euler steps, measured with the same metric."""
    path = STUDY / "base_flow_matching.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def plot(out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # a file, no window
    import matplotlib.pyplot as plt

    ref = _reference()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, nfe in zip(axes, (1, 2)):
        for i, name in enumerate(VARIANTS):
            rows = [r for r in _rows(name) if r["nfe"] == nfe and r["num_samples"] < 10000]
            if rows:  # the long runs in strong colours of their own, the short ones in tab20's
                long = {"er0_const": "tab:red", "er0_const_seed1": "tab:orange", "er0_cos4k": "tab:blue",
                        "er0_cos10k": "tab:green", "er0_s1_decay8k": "tab:purple", "er0_s1_tail2k": "tab:brown"}
                ax.plot([r["total_steps"] - 1500 for r in rows], [r["fid"] for r in rows], marker="o", ms=3,
                        color=long.get(name, plt.cm.tab20(i % 20)), lw=2.2 if name in long else 1.0, label=name)
        if "fid_50step_2k" in ref:
            ax.axhline(ref["fid_50step_2k"], color="k", ls="--", lw=1,
                       label=f"base, 50 Euler steps ({ref['fid_50step_2k']:.1f})")
        ax.set_title(f"{nfe} NFE")
        ax.set_xlabel("fine-tuning steps (batch 128) after the 1500-step base")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("classifier-FID, 2k samples (lower is better)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def table() -> None:
    print("| variant | what | fine-tune steps | 1-NFE FID | 2-NFE FID | 1-NFE accuracy | train s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, (what, _) in VARIANTS.items():
        final = [r for r in _rows(name) if r["num_samples"] >= 10000]
        by_nfe = {r["nfe"]: r for r in final}
        if 1 in by_nfe and 2 in by_nfe:
            print(f"| {name} | {what} | {by_nfe[1]['total_steps'] - 1500} | {by_nfe[1]['fid']:.1f} | "
                  f"{by_nfe[2]['fid']:.1f} | {by_nfe[1]['accuracy']:.3f} | {by_nfe[1]['train_s']:.0f} |")


SHIPPED_TWINFLOW = ROOT / "python" / "twinflow" / "tutorials" / "mnist" / "weights" / "twinflow"


def ship(name: str, runs: Path, threads: int, dest: Path = SHIPPED_TWINFLOW) -> None:
    """Make variant `name`'s current checkpoint the shipped `twinflow` one: its sampling weights
    and config (no optimizer state), with the command that trains it, and the 10k-sample
    metrics at 1, 2 and 4 NFE measured on the copy."""
    import shutil

    import torch

    from twinflow.tutorials.mnist.evaluate import evaluate

    torch.set_num_threads(threads)
    src = runs / name
    config = json.loads((src / "config.json").read_text())
    st = config["settings"]
    if config["status"] != "finished":
        raise ValueError(f"{src}: the run is not finished ({config['status']})")
    steps = config["progress"]["step"]
    loss = " ".join(f"--loss {k}={v}" for k, v in st["loss_overrides"].items())
    config["command"] = (
        f"twinflow mnist train --init-from flow_matching --lr {st['lr']:g} --max-steps {steps} --epochs 100 "
        f"--seed {st['seed']} --threads 2 --checkpoint-every 100000 {loss} --output-dir runs/study/{name}")
    config["run_note"] = (
        f"run as variant {name} of bench/mnist_finetune_study.py (python bench/mnist_finetune_study.py run {name} "
        f"--threads 2 --at $(seq 250 250 {steps})): the same settings, continued to each --at step and scored "
        "there; resuming is exact, so the weights are those of one uninterrupted run of the command")
    config["study"] = f"docs/mnist.md, 'Long unguided fine-tunes'; variant {name} of bench/mnist_finetune_study.py"
    config["metrics_command"] = "twinflow mnist evaluate --checkpoint twinflow --steps 1 2 4 --num-samples 10000"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "model.safetensors", dest / "model.safetensors")
    # Written before the evaluation too: `evaluate` loads the copy, config included.
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    config["metrics"] = evaluate(dest, steps=[1, 2, 4], num_samples=10000, progress=False)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(json.dumps(config["metrics"], indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("variant", choices=sorted(VARIANTS))
    r.add_argument("--at", type=int, nargs="+", default=[100, 200, 400, 600, 800, 1000])
    r.add_argument("--samples", type=int, default=2000)
    r.add_argument("--final-samples", type=int, default=10000)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--runs", type=Path, default=ROOT / "runs" / "study")
    r.add_argument("--device", default="cpu")
    r.add_argument("--study-dir", type=Path, default=STUDY, help="where the JSONL rows go")
    ps = sub.add_parser("presets", help="compare sampler settings on a variant's final checkpoint")
    ps.add_argument("variant", choices=sorted(VARIANTS))
    ps.add_argument("--samples", type=int, default=10000)
    ps.add_argument("--threads", type=int, default=1)
    ps.add_argument("--runs", type=Path, default=ROOT / "runs" / "study")
    gs = sub.add_parser("guidance", help="effective guidance scale of variants' current checkpoints")
    gs.add_argument("variants", nargs="+", choices=sorted(VARIANTS) + ["base"])
    gs.add_argument("--runs", type=Path, default=ROOT / "runs" / "study")
    gp = sub.add_parser("gap", help="per-class accuracy, diversity and sharpness against the base's 50 steps")
    gp.add_argument("variant", choices=sorted(VARIANTS))
    gp.add_argument("--samples", type=int, default=2000)
    gp.add_argument("--threads", type=int, default=2)
    gp.add_argument("--runs", type=Path, default=ROOT / "runs" / "study")
    pl = sub.add_parser("plot")
    pl.add_argument("--output", type=Path, default=ROOT / "docs" / "mnist" / "finetune_study.png")
    sub.add_parser("table")
    sh = sub.add_parser("ship", help="make a variant's checkpoint the shipped `twinflow` one (and measure it)")
    sh.add_argument("variant", choices=sorted(VARIANTS))
    sh.add_argument("--threads", type=int, default=2)
    sh.add_argument("--runs", type=Path, default=ROOT / "runs" / "study")
    args = p.parse_args(argv)
    if args.cmd == "run":
        run(args.variant, sorted(args.at), args.samples, args.final_samples, args.threads, args.runs, args.device,
            args.study_dir)
    elif args.cmd == "presets":
        presets(args.variant, args.samples, args.threads, args.runs)
    elif args.cmd == "guidance":
        guidance(args.variants, args.runs)
    elif args.cmd == "gap":
        gap(args.variant, args.samples, args.threads, args.runs)
    elif args.cmd == "plot":
        plot(args.output)
    elif args.cmd == "ship":
        ship(args.variant, args.runs, args.threads)
    else:
        table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
