"""The activation memory of a 1024² VAE decode, measured on this CPU for the published VAE
configs (bench/published_configs.json, random weights): the peak resident-set growth during
``vae.decode`` in float32, one fresh process per VAE, halved for bf16. bench/memory_table.py reads
the result for its peak-GPU-memory rows (the GPU's caching allocator holds about the same live
tensors; bench/gpu_memory.sh measures it there).

    python bench/vae_decode_cpu.py --threads 2 [--out bench/results/vae_decode_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quant_cpu import PeakRSS, _rss_mb  # noqa: E402

#: which pipelines share a VAE config (SD3.5 medium / large and Z-Image use the same AutoencoderKL)
PIPELINES = ("qwen-image", "z-image", "sd3.5-medium", "sd3.5-large")


def measure(pipeline: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import diffusers

    spec = json.loads((HERE / "published_configs.json").read_text())[pipeline]["components"]["vae"]
    cfg = {k: v for k, v in spec["config"].items() if not k.startswith("_")}
    torch.manual_seed(0)
    vae = getattr(diffusers, spec["class"]).from_config(cfg).eval()
    channels = cfg.get("latent_channels", cfg.get("z_dim"))
    shape = (1, channels, 1, 128, 128) if spec["class"] == "AutoencoderKLQwenImage" else (1, channels, 128, 128)
    latents = torch.randn(shape)
    base = _rss_mb()
    t0 = time.perf_counter()
    with torch.no_grad(), PeakRSS() as peak:
        image = vae.decode(latents).sample
    assert image.shape[-1] == 1024, image.shape
    grown = (peak.peak - base) * 2**20
    return {"class": spec["class"], "float32_peak_bytes": grown, "bf16_peak_bytes": grown / 2,
            "decode_s": time.perf_counter() - t0, "threads": threads}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "vae_decode_cpu.json")
    p.add_argument("--one", choices=PIPELINES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.threads)))
        return 0
    rows = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for name in PIPELINES:
        r = subprocess.run([sys.executable, __file__, "--one", name, "--threads", str(args.threads)], env=env,
                           check=True, capture_output=True, text=True)
        rows[name] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{name}: {rows[name]['class']} decode 1024² peak +{rows[name]['float32_peak_bytes'] / 1e9:.2f} GB "
              f"float32 ({rows[name]['decode_s']:.1f} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
