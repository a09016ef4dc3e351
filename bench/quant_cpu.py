"""Quantized and GGUF loading on this CPU: peak RSS and wall time of load + one 2-NFE generation
for a mid-size random-weight TwinFlow Qwen-Image transformer (≈ 264M parameters), one mode per
fresh process, each against bf16 (the baseline) in the same run; and the cost in quality: the
image's relative error and PSNR against bf16's at the same seed.

    python bench/quant_cpu.py --threads 2 [--out bench/results/quant_cpu.json]

Modes: bf16 (baseline), int8 / fp8 (torchao weight-only, ``load_pipeline(quantization_config=...)``),
gguf-q8_0 / gguf-q4_k / gguf-bf16 (``twinflow export-gguf`` files, loaded with
``load_pipeline(base, transformer="x.gguf")``). nf4 / bnb-int8 need CUDA (bench/gpu_memory.sh).
Peak RSS is sampled from /proc every 2 ms while loading and generating; "model MB" subtracts
the RSS after the imports, so it is what loading and running the pipeline added. Run it alone: the times are only comparable then.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

MODES = ("bf16", "int8", "fp8", "gguf-bf16", "gguf-q8_0", "gguf-q4_k")
SIZE = 128  # pixels; 256 image tokens for this pipeline
CONFIG = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=7, attention_head_dim=128,
              num_attention_heads=8, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(16, 56, 56))


def _rss_mb() -> float:
    """The current resident set (MB), from /proc (ru_maxrss would keep the imports' peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRSS:
    """The highest resident set seen while the block runs (sampled every 2 ms in a thread)."""

    def __enter__(self):
        import threading

        self.peak, self._stop = _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def build(folder: pathlib.Path, layers: int) -> int:
    """The tiny Qwen-Image pipeline with a mid-size transformer (trained-looking aux weights), bf16."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    from twinflow import diffusers_patch
    from twinflow.tiny import build as tiny

    pipe = tiny("qwen-image")
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(**{**CONFIG, "num_layers": layers})
    patched = diffusers_patch.patch(transformer, "qwen-image")
    with torch.no_grad():
        for name, p in patched.named_parameters():
            if name.startswith("time_text_embed_2."):
                p.add_(0.05 * torch.randn_like(p))
    pipe.transformer = patched.to(torch.bfloat16)
    pipe.to(torch.bfloat16)
    pipe.save_pretrained(folder)  # the published layout: the stock class's config, the aux keys beside
    return sum(p.numel() for p in patched.parameters())


def run_mode(mode: str, folder: pathlib.Path, files: pathlib.Path, out: pathlib.Path, threads: int) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    import diffusers  # noqa: F401
    import torchao  # noqa: F401

    import twinflow  # imports done: the baseline RSS below includes them

    base_rss = _rss_mb()
    kw = {}
    if mode in ("int8", "fp8"):
        kw["quantization_config"] = mode
    elif mode.startswith("gguf-"):
        kw["transformer"] = files / f"{mode}.gguf"
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        pipe = twinflow.load_pipeline(folder, "qwen-image", dtype=torch.bfloat16, **kw)
        load_s = time.perf_counter() - t0
        pipe.set_progress_bar_config(disable=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            image = pipe(prompt="a cat", height=SIZE, width=SIZE, num_inference_steps=2, true_cfg_scale=1.0,
                         output_type="pt", generator=torch.Generator().manual_seed(0)).images
        gen_s = time.perf_counter() - t0
    np.save(files / f"{mode}.npy", image.float().numpy())
    out.write_text(json.dumps({"mode": mode, "load_s": load_s, "generate_s": gen_s, "peak_rss_mb": peak.peak,
                               "import_rss_mb": base_rss}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=CONFIG["num_layers"], help="transformer blocks (7: ≈ 264M parameters)")
    p.add_argument("--out", type=pathlib.Path, default=None, help="also write the rows as JSON here")
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # internal: one mode in this process
    p.add_argument("--folder", type=pathlib.Path, help=argparse.SUPPRESS)
    p.add_argument("--files", type=pathlib.Path, help=argparse.SUPPRESS)
    p.add_argument("--row", type=pathlib.Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        run_mode(args.mode, args.folder, args.files, args.row, args.threads)
        return 0
    import numpy as np

    from twinflow import gguf_files

    work = pathlib.Path(tempfile.mkdtemp(prefix="twinflow-quant-cpu-"))
    folder, files = work / "pipe", work / "files"
    files.mkdir()
    params = build(folder, args.layers)
    for t in ("BF16", "Q8_0", "Q4_K"):
        gguf_files.export_gguf(folder, files / f"gguf-{t.lower()}.gguf", t)
    for f in list(folder.rglob("*")) + list(files.glob("*.gguf")):  # every mode reads from a warm page cache
        if f.is_file():
            f.read_bytes()
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for mode in MODES:
        row = files / f"{mode}.json"
        subprocess.run([sys.executable, __file__, "--mode", mode, "--folder", str(folder), "--files", str(files),
                        "--row", str(row), "--threads", str(args.threads)], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows.append(json.loads(row.read_text()))
    ref = np.load(files / "bf16.npy")
    base = rows[0]
    for r in rows:
        img = np.load(files / f"{r['mode']}.npy")
        mse = float(((img - ref) ** 2).mean())
        r["rel_err"] = float(np.linalg.norm(img - ref) / np.linalg.norm(ref))
        r["psnr_db"] = None if mse == 0 else float(10 * np.log10(1.0 / mse))
        r["model_mb"] = r["peak_rss_mb"] - r["import_rss_mb"]
        r["gguf_mb"] = ((files / f"{r['mode']}.gguf").stat().st_size / 2**20
                        if r["mode"].startswith("gguf-") else None)
    print(f"transformer: {params / 1e6:.0f}M parameters, {SIZE}x{SIZE} px, 2 NFE, {args.threads} threads")
    print("| mode | load s | 2-NFE s | (load + 2 NFE) × bf16 | peak RSS MB | model MB | × bf16 | "
          "rel. error vs bf16 | PSNR dB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        psnr = "exact" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}"
        wall = (r["load_s"] + r["generate_s"]) / (base["load_s"] + base["generate_s"])
        ratio = r["model_mb"] / base["model_mb"] if base["model_mb"] > 0 else float("nan")
        print(f"| {r['mode']} | {r['load_s']:.2f} | {r['generate_s']:.2f} | {wall:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['model_mb']:.0f} | {ratio:.2f} | {r['rel_err']:.2e} | {psnr} |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"params": params, "size": SIZE, "threads": args.threads, "rows": rows},
                                       indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
