"""Benchmark of ONE TwinFlow training step (forward + backward + AdamW step) on a small UNet.

How to run (from the repository root, with the package built and installed into .venv):

    .venv/bin/python bench/train_step.py                          # batch 128, CPU unless CUDA
    .venv/bin/python bench/train_step.py --steps 10 --threads 2
    .venv/bin/python bench/train_step.py --device cuda --batch-size 256 --channels-last

Model: a ~2M-parameter class-conditional UNet stand-in for 1×28×28 MNIST-like inputs
(``SmallUNet`` below: 3 resolutions 28/14/7, residual blocks with GroupNorm, sinusoidal
embeddings of the signed t and of tt, a label embedding with a "null" class for ``uncond``).
Data: random images in [−1, 1] and random labels (the work per step does not depend on the
values).  ``cond = [labels]`` and ``uncond = [null labels]`` are passed, so the TwinFlow
recipe runs all its model calls (8 per step with N = 2, 6 once TwinFlowLoss batches its
independent pairs; RCGM 5, batched 4; flow matching 1).

For each recipe (twinflow, rcgm, flow_matching) it compares, in the same run:

  (a) ours       twinflow.TwinFlowLoss(recipe=...)
  (b) reference  the plain-PyTorch transcription of docs/algorithm.md §3 in tests/twinflow_reference.py
                 (ReferenceTwinFlowLoss: same call order, random draws and EMA teacher)

Each (recipe, method) cell runs in its own subprocess (fresh allocator, clean peak memory):
--warmup steps, then --steps timed steps; the table shows the median.  Before timing, one
step of both methods at batch 8 is cross-checked (same generator seed → same loss).

Columns: ms/step (median), images/s (= batch / median), model forward passes per step
(counted on every SmallUNet instance: online model and EMA teacher), rows forwarded / batch
(the sum of the batch sizes of those passes over B: the calls on sub-batches are partial),
peak memory:
  CUDA: torch.cuda.max_memory_allocated() during the timed steps minus the memory allocated
        before them (model, optimizer state and data excluded once warm);
  CPU:  the peak resident set size (VmHWM from /proc/self/status, reset by writing "5" to
        /proc/self/clear_refs before the timed steps) minus the RSS at that moment; where the
        reset is not allowed, resource.getrusage(RUSAGE_SELF).ru_maxrss minus the RSS before
        the warm-up step.  (tracemalloc does not see torch's allocations.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as Fn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

RECIPES = ("twinflow", "rcgm", "flow_matching")
METHODS = ("ours", "reference")
N_CLASSES = 10


# ----------------------------------------------------------------------------- the model

FORWARD_PASSES = [0]
FORWARD_ROWS = [0]


def sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    a = (1000.0 * t.float())[:, None] * freqs[None]
    return torch.cat([torch.sin(a), torch.cos(a)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.n1 = nn.GroupNorm(4, cin)
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.e = nn.Linear(emb, cout)
        self.n2 = nn.GroupNorm(4, cout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, e):
        h = self.c1(Fn.silu(self.n1(x)))
        h = h + self.e(e)[:, :, None, None]
        h = self.c2(Fn.silu(self.n2(h)))
        return h + self.skip(x)


class SmallUNet(nn.Module):
    """Class-conditional UNet for 1×28×28, called as model(x_t, t=t, tt=tt, c=[labels])."""

    def __init__(self, ch: int = 44, mult=(1, 2, 4), emb: int = 192, n_classes: int = N_CLASSES):
        super().__init__()
        self.temb = nn.Sequential(nn.Linear(128, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.ttemb = nn.Sequential(nn.Linear(128, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = nn.Embedding(n_classes + 1, emb)  # index n_classes = unconditional
        c1, c2, c3 = (ch * m for m in mult)
        self.inp = nn.Conv2d(1, c1, 3, padding=1)
        self.d1 = ResBlock(c1, c1, emb)
        self.down1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)     # 28 → 14
        self.d2 = ResBlock(c1, c2, emb)
        self.down2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)     # 14 → 7
        self.d3 = ResBlock(c2, c3, emb)
        self.mid = ResBlock(c3, c3, emb)
        self.u3 = ResBlock(c3 + c3, c2, emb)
        self.u2 = ResBlock(c2 + c2, c1, emb)
        self.u1 = ResBlock(c1 + c1, c1, emb)
        self.out = nn.Sequential(nn.GroupNorm(4, c1), nn.SiLU(), nn.Conv2d(c1, 1, 3, padding=1))

    def forward(self, x, t, tt, c=None):
        FORWARD_PASSES[0] += 1
        FORWARD_ROWS[0] += int(x.shape[0])
        e = self.temb(sinusoidal(t, 128)) + self.ttemb(sinusoidal(tt, 128)) * (t - tt).float()[:, None]
        if c is not None:
            e = e + self.label(c[0])
        e = Fn.silu(e)
        h0 = self.inp(x)
        h1 = self.d1(h0, e)                       # 28
        h2 = self.d2(self.down1(h1), e)           # 14
        h3 = self.d3(self.down2(h2), e)           # 7
        m = self.mid(h3, e)
        u = self.u3(torch.cat([m, h3], 1), e)     # 7
        u = Fn.interpolate(u, scale_factor=2.0, mode="nearest")
        u = self.u2(torch.cat([u, h2], 1), e)     # 14
        u = Fn.interpolate(u, scale_factor=2.0, mode="nearest")
        u = self.u1(torch.cat([u, h1], 1), e)     # 28
        return self.out(u)


# ----------------------------------------------------------------------------- helpers

def _status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_kb() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r


def _make_loss(method: str, recipe: str):
    if method == "ours":
        from twinflow import TwinFlowLoss
        return TwinFlowLoss(recipe=recipe)
    from twinflow_reference import ReferenceTwinFlowLoss
    return ReferenceTwinFlowLoss(recipe)


def _setup(batch: int, device: torch.device, channels_last: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = SmallUNet().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(batch, 1, 28, 28, generator=g) * 2 - 1).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, N_CLASSES, (batch,), generator=g).to(device)
    null = torch.full((batch,), N_CLASSES, dtype=torch.long, device=device)
    return model, x, [labels], [null]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- one cell

def run_cell(recipe: str, method: str, batch: int, steps: int, warmup: int, device: torch.device,
             channels_last: bool, bf16: bool) -> Dict:
    model, x, cond, uncond = _setup(batch, device, channels_last)
    loss_fn = _make_loss(method, recipe)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(1)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model, x, cond=cond, uncond=uncond, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    rss0 = _status_kb("VmRSS")
    for _ in range(warmup):
        step()
    _sync(device)
    mem_method = ""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        mem_method = "cuda max_memory_allocated"
    else:
        if _reset_hwm():
            base = _status_kb("VmRSS") * 1024
            mem_method = "VmHWM (reset) - VmRSS"
        else:
            base = (rss0 or 0) * 1024
            mem_method = "ru_maxrss - VmRSS before warm-up"
    times: List[float] = []
    passes: List[int] = []
    rows: List[int] = []
    for _ in range(steps):
        FORWARD_PASSES[0] = 0
        FORWARD_ROWS[0] = 0
        _sync(device)
        t0 = time.perf_counter()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        passes.append(FORWARD_PASSES[0])
        rows.append(FORWARD_ROWS[0])
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    elif mem_method.startswith("VmHWM"):
        peak = _status_kb("VmHWM") * 1024 - base
    else:
        peak = _maxrss_kb() * 1024 - base
    calls = getattr(loss_fn, "last_stats", {}).get("model_calls")
    return dict(recipe=recipe, method=method, ms=1e3 * statistics.median(times),
                ms_min=1e3 * min(times), passes=statistics.median(passes),
                rows_per_batch=statistics.median(rows) / batch, model_calls=calls,
                peak_bytes=int(peak), mem_method=mem_method, loss=float(loss.detach()),
                params=sum(p.numel() for p in model.parameters()))


def cross_check(device: torch.device) -> List[str]:
    """One step of both methods at batch 8 with the same seed: the losses must agree."""
    lines = []
    for recipe in RECIPES:
        vals = []
        for method in METHODS:
            model, x, cond, uncond = _setup(8, device, False)
            lf = _make_loss(method, recipe)
            loss = lf(model, x, cond=cond, uncond=uncond, generator=torch.Generator(device=device).manual_seed(3))
            vals.append(float(loss.detach()))
        rel = abs(vals[0] - vals[1]) / max(abs(vals[1]), 1e-30)
        lines.append(f"{recipe}: ours {vals[0]:.7g}, reference {vals[1]:.7g}, rel. diff {rel:.2e}")
    return lines


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per cell (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="run the step under bf16 autocast")
    ap.add_argument("--no-check", action="store_true", help="skip the batch-8 cross-check")
    ap.add_argument("--in-process", action="store_true", help="run cells in this process (no isolation)")
    ap.add_argument("--cell", help=argparse.SUPPRESS)  # internal: recipe:method, print JSON
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)

    if args.cell:
        recipe, method = args.cell.split(":")
        res = run_cell(recipe, method, args.batch_size, args.steps, args.warmup, device,
                       args.channels_last, args.bf16)
        print("CELL " + json.dumps(res))
        return 0

    recipes = [r for r in args.recipes.split(",") if r]
    methods = [m for m in args.methods.split(",") if m]
    n_params = sum(p.numel() for p in SmallUNet().parameters())
    print(f"# TwinFlow training step: batch {args.batch_size}, device {device}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}, {platform.machine()}")
    print(f"# model: SmallUNet 1x28x28 + label, {n_params / 1e6:.2f}M parameters"
          f"{', channels_last' if args.channels_last else ''}{', bf16 autocast' if args.bf16 else ''}; "
          f"AdamW; {args.warmup} warm-up + {args.steps} timed steps per cell")
    if not args.no_check and "ours" in methods and "reference" in methods:
        print("# cross-check (batch 8, same seed):")
        for line in cross_check(device):
            print("#   " + line)

    results = []
    for recipe in recipes:
        for method in methods:
            if args.in_process:
                results.append(run_cell(recipe, method, args.batch_size, args.steps, args.warmup, device,
                                        args.channels_last, args.bf16))
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--cell", f"{recipe}:{method}",
                   "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--device", str(device)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.channels_last:
                cmd.append("--channels-last")
            if args.bf16:
                cmd.append("--bf16")
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((l for l in out.stdout.splitlines() if l.startswith("CELL ")), None)
            if out.returncode != 0 or line is None:
                print(f"# {recipe}/{method} failed:\n{out.stdout}\n{out.stderr}", file=sys.stderr)
                results.append(dict(recipe=recipe, method=method, error=True))
                continue
            results.append(json.loads(line[5:]))

    mem_note = next((r["mem_method"] for r in results if "mem_method" in r), "")
    print()
    print("| recipe | method | ms/step (median) | images/s | model forward passes/step | rows forwarded / batch | peak memory (MiB) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    by = {(r["recipe"], r["method"]): r for r in results}
    for r in results:
        if r.get("error"):
            print(f"| {r['recipe']} | {r['method']} | failed | | | | |")
            continue
        name = "(a) TwinFlowLoss" if r["method"] == "ours" else "(b) reference (plain PyTorch)"
        print(f"| {r['recipe']} | {name} | {r['ms']:.1f} | {args.batch_size / (r['ms'] / 1e3):.1f} | "
              f"{r['passes']:g} | {r['rows_per_batch']:.2f} | {r['peak_bytes'] / 2**20:.1f} |")
    print()
    print(f"# peak memory: {mem_note}")
    for recipe in recipes:
        a, b = by.get((recipe, "ours")), by.get((recipe, "reference"))
        if a and b and not a.get("error") and not b.get("error"):
            print(f"# {recipe}: ours/reference time {a['ms'] / b['ms']:.3f}x, "
                  f"memory {a['peak_bytes'] / max(b['peak_bytes'], 1):.3f}x, "
                  f"last_stats model_calls {a['model_calls']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
