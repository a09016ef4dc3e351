"""Wall time of a stock diffusers pipeline: its default scheduler and steps versus
TwinFlowScheduler at 1, 2 and 4 NFE, in the same run.

    .venv/bin/python bench/pipeline_nfe.py                 # CPU, random-weight SD3-style transformer
    .venv/bin/python bench/pipeline_nfe.py --repeats 5 --layers 8
    python bench/pipeline_nfe.py --transformer sd3.5-medium --device cuda --dtype bfloat16 --latent 128 --text-len 333
                                                           # full size, what bench/gpu_pipeline.sh runs

The pipeline is diffusers' StableDiffusion3Pipeline with a random-weight SD3Transformer2DModel
small enough for a CPU (--layers, --heads, --head-dim; 16 latent channels, patch 2), a tiny
VAE and prompt embeddings passed directly (no text encoders: their cost is the same for every
scheduler). ``--transformer sd3.5-medium`` builds the published SD3.5-medium transformer config
instead (2.5B parameters, random weights, created directly on ``--device`` in ``--dtype``); the VAE
stays tiny and does not upsample, so ``--latent 128`` has the token count of a 1024×1024 image. The
baseline is the pipeline's own FlowMatchEulerDiscreteScheduler at its default
28 steps with classifier-free guidance (guidance_scale 7.0, so each call runs a doubled
batch); TwinFlow runs without guidance, as distilled few-step models do. Weights are random,
so this measures cost, not image quality.

Columns: median wall time of the whole pipeline call, transformer calls, rows through the
transformer (calls × batch rows), and the share of the time spent inside scheduler.step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from twinflow import TwinFlowScheduler

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (written here: no download).
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                   qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))


def transformer_config(args) -> dict:
    if args.transformer == "sd3.5-medium":
        return dict(SD35_MEDIUM)
    return dict(sample_size=args.latent, patch_size=2, in_channels=16, out_channels=16, num_layers=args.layers,
                attention_head_dim=args.head_dim, num_attention_heads=args.heads, joint_attention_dim=64,
                caption_projection_dim=args.heads * args.head_dim, pooled_projection_dim=64)


def build(args):
    torch.manual_seed(0)
    with torch.device(args.device):  # a full-size model is created on the GPU directly
        transformer = SD3Transformer2DModel(**transformer_config(args)).to(args.dtype).eval()
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=1, sample_size=args.latent, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.vae.to(args.device, args.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timed:
    """Wraps scheduler.step to add up the time spent in it (synchronising CUDA around it)."""

    def __init__(self, scheduler, device):
        self.scheduler, self.seconds = scheduler, 0.0
        self._step = scheduler.step

        def step(*a, **k):
            sync(device)
            t0 = time.perf_counter()
            try:
                return self._step(*a, **k)
            finally:
                sync(device)
                self.seconds += time.perf_counter() - t0

        scheduler.step = step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--latent", type=int, default=64, help="latent side (tokens = (latent/2)²)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--transformer", choices=("cpu-small", "sd3.5-medium"), default="cpu-small",
                    help="cpu-small: --layers/--heads/--head-dim; sd3.5-medium: the published config")
    ap.add_argument("--text-len", type=int, default=16, help="prompt tokens (333 = SD3's 77 CLIP + 256 T5)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    args.dtype = getattr(torch, args.dtype)

    pipe = build(args)
    cfg = pipe.transformer.config
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    g = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(args.device, args.dtype)

    text = (1, args.text_len, cfg.joint_attention_dim)
    emb = dict(prompt_embeds=randn(*text), pooled_prompt_embeds=randn(1, cfg.pooled_projection_dim),
               negative_prompt_embeds=randn(*text), negative_pooled_prompt_embeds=randn(1, cfg.pooled_projection_dim))
    size = args.latent  # the tiny VAE does not upsample: image side = latent side
    stock = pipe.scheduler
    settings = [
        ("FlowMatchEuler (stock), CFG 7.0", stock, 28, 7.0),
        ("TwinFlow 1-NFE", TwinFlowScheduler.preset("1-nfe"), 1, 1.0),
        ("TwinFlow 2-NFE", TwinFlowScheduler.preset("2-nfe"), 2, 1.0),
        ("TwinFlow 4-NFE", TwinFlowScheduler.preset("4-nfe"), 4, 1.0),
        ("TwinFlow order 2, 4 steps", TwinFlowScheduler(sampling_order=2, rfba_gap_steps=(0.001, 0.5)), 4, 1.0),
    ]
    calls = []
    pipe.transformer.register_forward_hook(lambda m, a, k, out: calls.append(k["hidden_states"].shape[0]),
                                           with_kwargs=True)
    rows = []
    base = None
    for label, sched, steps, guidance in settings:
        pipe.scheduler = sched
        timed = Timed(sched, args.device)
        times, shares = [], []
        for r in range(args.repeats + 1):  # the first run warms up
            calls.clear()
            timed.seconds = 0.0
            sync(args.device)
            t0 = time.perf_counter()
            with torch.no_grad():
                pipe(height=size * 1, width=size * 1, num_inference_steps=steps, guidance_scale=guidance,
                     generator=torch.Generator().manual_seed(r), output_type="pt", **emb)
            sync(args.device)
            wall = time.perf_counter() - t0
            if r:
                times.append(wall)
                shares.append(timed.seconds / wall)
        sched.step = timed._step
        med = statistics.median(times)
        base = base or med
        rows.append((label, steps, len(calls), sum(calls), med * 1e3, 100 * statistics.median(shares), base / med))
    pipe.scheduler = stock

    where = (torch.cuda.get_device_name(args.device) if args.device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"# SD3 pipeline, random-weight transformer ({args.transformer}: {n_params / 1e6:.1f}M params, "
          f"{cfg.num_layers} layers, {(args.latent // 2) ** 2} image + {args.text_len} text tokens), "
          f"{str(args.dtype).replace('torch.', '')}, {where}, torch {torch.__version__}; median of {args.repeats} runs")
    print()
    print("| scheduler | num_inference_steps | transformer calls | rows through the transformer | wall ms | scheduler share | speed-up vs stock |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, steps, n, rws, ms, share, speed in rows:
        print(f"| {label} | {steps} | {n} | {rws} | {ms:.0f} | {share:.2f}% | {speed:.1f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
