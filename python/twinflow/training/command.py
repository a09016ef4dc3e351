"""``twinflow train``: fine-tune a diffusers backbone into a few-step TwinFlow model.

Single process: ``twinflow train --config sd35_lora_2order --dataset-path data.parquet
--output-dir runs/x``; several: the same under ``torchrun --nproc_per_node=N -m twinflow train ...``.
torch/diffusers are imported inside the command so that ``twinflow --help`` stays fast.
"""

from __future__ import annotations

import argparse

from ..cli import register_command


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True,
                   help="a YAML config file, or the name of one shipped in the package (sd35_lora_2order, "
                        "qwen_image_full_2order, ...: the repository's configs/; see docs/large_training.md)")
    p.add_argument("--dataset-path", required=True,
                   help="a .parquet file of (text, image_bytes) rows, optionally precomputed latents/text_embeds; "
                        "or a folder of images with .txt captions")
    p.add_argument("--output-dir", required=True, help="checkpoints/, samples/, metrics.jsonl, pipeline/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set training.lr=1e-4 (repeatable; value parsed as YAML)")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="auto: continue from the newest complete checkpoint in the output dir; or a checkpoint folder")
    p.add_argument("--overwrite", action="store_true",
                   help="start fresh even though --output-dir holds checkpoints of an earlier run (deletes them)")
    p.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true", help="no progress bar")


def check_model_folder(cfg) -> None:
    """Training reads a local pipeline folder and downloads nothing: anything else is one line
    here, before diffusers (which would ask the Hub) sees the path."""
    import pathlib

    given = cfg.model.pretrained_model_name_or_path
    if not pathlib.Path(given).expanduser().is_dir():
        raise ValueError(f"{cfg.source}: model.pretrained_model_name_or_path: {given!r} is not a local folder "
                         "(twinflow train reads a diffusers pipeline folder and downloads nothing: fetch it first, "
                         "e.g. `hf download ORG/NAME --local-dir DIR`, then --set "
                         "model.pretrained_model_name_or_path=DIR)")


@register_command("train", help="fine-tune a diffusers model with the TwinFlow objective (torchrun-ready)",
                  add_arguments=_add_arguments)
def run(args: argparse.Namespace) -> int:
    from .._logging import no_library_progress_bars
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    check_model_folder(cfg)
    with no_library_progress_bars(args.quiet):
        return _train(cfg, args)


def _train(cfg, args: argparse.Namespace) -> int:
    import sys

    from .distributed import init_distributed, shutdown
    from .trainer import NonFiniteLoss, Trainer

    d = init_distributed()
    trainer = None
    try:
        trainer = Trainer(cfg, dataset_path=args.dataset_path, output_dir=args.output_dir, d=d,
                          resume=args.resume, progress=not args.quiet, overwrite=args.overwrite)
        if d.main and trainer.step:
            print(f"twinflow train: resumed from {trainer.last_checkpoint} at step {trainer.step}", file=sys.stderr)
        trainer.fit()
        if d.main:
            out = trainer.out
            lora = " and the LoRA adapter in " + str(out / "lora") if (out / "lora").is_dir() else ""
            print(f"twinflow train: {trainer.step} steps done; the pipeline is in {out / 'pipeline'}{lora} "
                  f"(load it with twinflow.load_pipeline), checkpoints in {out / 'checkpoints'}", file=sys.stderr)
    except NonFiniteLoss as e:
        print(f"twinflow train: error: {e}", file=sys.stderr)
        return 3
    finally:
        if trainer is not None:
            trainer.close()
        shutdown()
    return 0
