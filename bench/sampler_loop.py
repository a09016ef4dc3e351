"""Benchmark of the whole sampling loop: ``UnifiedSampler.sample`` end to end on CPU.

How to run (from the repository root, with the package built and installed):

    .venv/bin/python bench/sampler_loop.py
    .venv/bin/python bench/sampler_loop.py --threads 1 --repeats 30 --steps 1 4 30

The model is deliberately cheap (two elementwise torch ops), so what is timed is the loop
itself: time grid, model-call plumbing, random draws and the update. For each latent shape,
step count and stochast ratio s it times, interleaved round-robin with warm-up, the median
over --repeats calls of:

  ours      UnifiedSampler(sampling_steps=K, stochast_ratio=s, sampling_style="mul").sample(
                model, noise, generator=g)
  torch     the same sampler written as a plain PyTorch loop in Python (the baseline a user
            would write: x̂ = x − t·F, ẑ = x + (1 − t)·F, x ← (1 − t_n)·x̂ + t_n·(√(1−s)·ẑ + √s·ε))
  model     the K model calls alone (the floor both loops share)

Both loops get generators of the same seed and must agree to float32 rounding (checked
before timing). "loop µs/NFE" = (median − model) / K: the per-evaluation cost of the loop.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch


def model(x: torch.Tensor, t: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
    """A cheap velocity field: x-dependent, and t-dependent through a broadcast."""
    return x * 0.1 - t.view(-1, *[1] * (x.dim() - 1))


def plain_torch_loop(noise: torch.Tensor, grid: List[float], s: float, generator: torch.Generator) -> torch.Tensor:
    """The sampler as a user would write it in PyTorch (order 1, "mul" style, no extrapolation)."""
    x = noise
    b = noise.shape[0]
    n = len(grid) - 1
    for i in range(n):
        t_c, t_n = grid[i], grid[i + 1]
        t = torch.full((b,), t_c, dtype=x.dtype)
        f = model(x, t, t)
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype) if s > 0 else None
        x_hat = x - t_c * f
        if i + 1 == n:
            return x_hat
        if s == 0:
            x = x - (t_c - t_n) * f
        else:
            z_hat = x + (1 - t_c) * f
            x = (1 - t_n) * x_hat + t_n * (math.sqrt(1 - s) * z_hat + math.sqrt(s) * eps)
    return x


def time_interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int) -> Dict[str, List[float]]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter_ns()
            fn()
            samples[name].append((time.perf_counter_ns() - t0) / 1e3)
    return samples


def _parse_shape(text: str):
    return tuple(int(p) for p in text.lower().split("x"))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per method (median taken)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 4, 30])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--shapes", type=_parse_shape, nargs="+", default=[(2, 4, 8, 8), (1, 16, 128, 128)],
                    metavar="BxCxHxW")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    import twinflow
    from twinflow import UnifiedSampler

    print("# UCGM sampler: the whole loop, float32 CPU, cheap model")
    print()
    print(f"- torch {torch.__version__}, threads {torch.get_num_threads()}, {os.cpu_count()} logical CPUs, "
          f"python {platform.python_version()}, twinflow {twinflow.__version__}; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    print(f"- {args.repeats} calls per method, interleaved, {args.warmup} warm-up; median µs per sample() call")
    print()
    print("| shape | steps | s | ours µs | plain torch µs | model only µs | ours loop µs/NFE | torch loop µs/NFE "
          "| ours / torch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape in args.shapes:
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        for steps in args.steps:
            for s in args.ratios:
                sampler = UnifiedSampler(sampling_steps=steps, stochast_ratio=s, sampling_style="mul")
                grid = sampler.timesteps.tolist()
                ours = sampler.sample(model, noise, generator=torch.Generator().manual_seed(1))
                ref = plain_torch_loop(noise, grid, s, torch.Generator().manual_seed(1))
                torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
                b = shape[0]
                t_once = torch.full((b,), 0.5)

                def model_only():
                    for _ in range(steps):
                        model(noise, t_once, t_once)

                fns = {
                    "ours": lambda: sampler.sample(model, noise, generator=torch.Generator().manual_seed(1)),
                    "torch": lambda: plain_torch_loop(noise, grid, s, torch.Generator().manual_seed(1)),
                    "model": model_only,
                }
                med = {k: statistics.median(v) for k, v in time_interleaved(fns, args.repeats, args.warmup).items()}
                per = {k: (med[k] - med["model"]) / steps for k in ("ours", "torch")}
                print(f"| {'×'.join(map(str, shape))} | {steps} | {s:g} | {med['ours']:.1f} | {med['torch']:.1f} | "
                      f"{med['model']:.1f} | {per['ours']:.1f} | {per['torch']:.1f} | "
                      f"{med['ours'] / med['torch']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
