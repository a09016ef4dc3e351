"""A few TwinFlow training steps of a random-weight SD3.5-medium transformer: images/s and
peak memory (the Python half of bench/gpu_train.sh).

Builds, without downloads, a pipeline folder holding only ``transformer/`` (the published
SD3.5-medium config, random weights) and a parquet of precomputed random latents and text
embeddings of SD3.5's shapes (so no VAE or text encoder is loaded), then runs
``twinflow.training.Trainer`` with the published LoRA or full settings (configs/sd35_*_2order.yaml)
in bf16 autocast: one warm-up step, then ``--steps`` timed steps.

    python bench/gpu_train.py --mode lora --steps 4            # on a GPU
    python bench/gpu_train.py --size tiny --resolution 64      # CPU smoke test of this script
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

# stabilityai/stable-diffusion-3.5-medium transformer/config.json (2.5B parameters)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
TINY = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=24, out_channels=16,
            pos_embed_max_size=96, dual_attention_layers=(0,), qk_norm="rms_norm")
TEXT_TOKENS = 77 + 256  # CLIP + T5 tokens of StableDiffusion3Pipeline's prompt_embeds


def make_inputs(work: pathlib.Path, size: dict, resolution: int, rows: int) -> tuple:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file

    from twinflow.training.data import tensor_bytes

    folder = work / "sd35-random"
    if not (folder / "transformer").is_dir():
        torch.manual_seed(0)
        SD3Transformer2DModel(**size).to(torch.bfloat16).save_pretrained(folder / "transformer")
    g = torch.Generator().manual_seed(0)
    lat = resolution // 8
    text = (TEXT_TOKENS, size["joint_attention_dim"])

    def embeds(n=None):
        lead = () if n is None else (n,)
        return {"prompt_embeds": torch.randn(*lead, *text, generator=g).bfloat16(),
                "pooled_prompt_embeds": torch.randn(*lead, size["pooled_projection_dim"], generator=g).bfloat16()}

    table = [{"latents": tensor_bytes({"latents": torch.randn(size["in_channels"], lat, lat, generator=g)}),
              "text_embeds": tensor_bytes(embeds())} for _ in range(rows)]
    pq.write_table(pa.Table.from_pylist(table), work / "data.parquet", row_group_size=8)
    save_file(embeds(1), str(work / "null.safetensors"))
    return folder, work / "data.parquet", work / "null.safetensors"


def run(args) -> dict:
    from twinflow.training.config import load_config
    from twinflow.training.distributed import init_distributed, shutdown
    from twinflow.training.trainer import Trainer

    size = SD35_MEDIUM if args.size == "sd35-medium" else TINY
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="twinflow-gpu-train-"))
    work.mkdir(parents=True, exist_ok=True)
    d = init_distributed()
    rows = args.batch_size * d.world * (args.steps + 1)
    folder, data, null = make_inputs(work, size, args.resolution, rows)
    sets = [f"model.pretrained_model_name_or_path={folder}", f"data.null_text_embeds={null}",
            f"data.resolution={args.resolution}", f"training.batch_size={args.batch_size}",
            f"training.max_steps={args.steps + 1}", "training.checkpoint_every=1000000",
            "training.sample_every=1000000", "data.num_workers=0",
            f"training.gradient_checkpointing={'true' if args.mode == 'full' else 'false'}"]
    if args.size == "tiny":  # the published targets minus those a 2-layer model lacks
        sets.append("lora.target_modules=[to_q, to_k, to_v, to_out.0]")
    cfg = load_config(ROOT / "configs" / f"sd35_{args.mode}_2order.yaml", sets)
    trainer = Trainer(cfg, dataset_path=data, output_dir=work / f"run-{args.mode}", d=d, progress=False)
    batches = trainer.micro_batches()
    trainer.model.train()
    trainer.train_step(batches)  # warm-up: allocations, kernels, the EMA copy's first update
    if d.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        stats = trainer.train_step(batches)
    if d.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    n_params = sum(p.numel() for p in trainer.raw.parameters())
    trained = sum(p.numel() for p in trainer.params)
    result = {"mode": args.mode, "size": args.size, "device": str(d.device),
              "gpu": torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu",
              "processes": d.world, "strategy": trainer.strategy, "bf16_autocast": trainer.autocast,
              "resolution": args.resolution, "batch_per_process": args.batch_size, "steps": args.steps,
              "params": n_params, "trained_params": trained, "model_calls_per_step": stats["model_calls"],
              "s_per_step": elapsed / args.steps,
              "images_per_s": args.batch_size * d.world * args.steps / elapsed,
              "peak_memory_gib": (torch.cuda.max_memory_allocated(d.device) / 2**30 if d.device.type == "cuda"
                                  else None),
              "loss": stats["loss"]}
    shutdown()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("lora", "full"), default="lora")
    p.add_argument("--size", choices=("sd35-medium", "tiny"), default="sd35-medium")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--workdir", default=None, help="keeps the random model and data between runs")
    args = p.parse_args(argv)
    result = run(args)
    if result is not None:
        print(json.dumps(result))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
