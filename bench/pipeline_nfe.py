"""Wall time of a stock diffusers pipeline: its default scheduler and steps versus
TwinFlowScheduler at 1, 2 and 4 NFE, in the same run.

    .venv/bin/python bench/pipeline_nfe.py                 # CPU, random-weight SD3-style transformer
    .venv/bin/python bench/pipeline_nfe.py --repeats 5 --layers 8

The pipeline is diffusers' StableDiffusion3Pipeline with a random-weight SD3Transformer2DModel
small enough for a CPU (--layers, --heads, --head-dim; 16 latent channels, patch 2), a tiny
VAE and prompt embeddings passed directly (no text encoders: their cost is the same for every
scheduler). The baseline is the pipeline's own FlowMatchEulerDiscreteScheduler at its default
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


def build(args):
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=args.latent, patch_size=2, in_channels=16, out_channels=16, num_layers=args.layers,
        attention_head_dim=args.head_dim, num_attention_heads=args.heads, joint_attention_dim=64,
        caption_projection_dim=args.heads * args.head_dim, pooled_projection_dim=64).eval()
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=1, sample_size=args.latent, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Timed:
    """Wraps scheduler.step to add up the time spent in it."""

    def __init__(self, scheduler):
        self.scheduler, self.seconds = scheduler, 0.0
        self._step = scheduler.step

        def step(*a, **k):
            t0 = time.perf_counter()
            try:
                return self._step(*a, **k)
            finally:
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
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = build(args)
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    g = torch.Generator().manual_seed(1)
    emb = dict(prompt_embeds=torch.randn(1, 16, 64, generator=g), pooled_prompt_embeds=torch.randn(1, 64, generator=g),
               negative_prompt_embeds=torch.randn(1, 16, 64, generator=g),
               negative_pooled_prompt_embeds=torch.randn(1, 64, generator=g))
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
    for label, sched, steps, cfg in settings:
        pipe.scheduler = sched
        timed = Timed(sched)
        times, shares = [], []
        for r in range(args.repeats + 1):  # the first run warms up
            calls.clear()
            timed.seconds = 0.0
            t0 = time.perf_counter()
            with torch.no_grad():
                pipe(height=size * 1, width=size * 1, num_inference_steps=steps, guidance_scale=cfg,
                     generator=torch.Generator().manual_seed(r), output_type="pt", **emb)
            wall = time.perf_counter() - t0
            if r:
                times.append(wall)
                shares.append(timed.seconds / wall)
        sched.step = timed._step
        med = statistics.median(times)
        base = base or med
        rows.append((label, steps, len(calls), sum(calls), med * 1e3, 100 * statistics.median(shares), base / med))
    pipe.scheduler = stock

    print(f"# SD3 pipeline, random-weight transformer ({n_params / 1e6:.1f}M params, {args.layers} layers, "
          f"{(args.latent // 2) ** 2} tokens), torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"median of {args.repeats} runs")
    print()
    print("| scheduler | num_inference_steps | transformer calls | rows through the transformer | wall ms | scheduler share | speed-up vs stock |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, steps, n, rws, ms, share, speed in rows:
        print(f"| {label} | {steps} | {n} | {rws} | {ms:.0f} | {share:.2f}% | {speed:.1f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
