"""Benchmark of ONE interval of the UCGM sampler update on float32 CPU latents.

How to run (from the repository root, with the package built and installed
into .venv; diffusers is optional):

    .venv/bin/python bench/sampler_step.py                      # torch's default thread count
    .venv/bin/python bench/sampler_step.py --threads 1 --repeats 300
    .venv/bin/python bench/sampler_step.py --threads 4 --shapes 1x16x128x128

For each latent shape and stochast ratio s ∈ {0, 1} it times, interleaved
round-robin so that drift hits every method alike, with warm-up, the median
over --repeats samples (each the mean of --number back-to-back calls):

  ours-fresh   twinflow.ucgm_step(x, v, t_c, t_n, s, noise)       (allocates its result)
  ours-out     the same with a preallocated out= (check_finite=True, the default: the
               kernel also reports whether every output is finite, in the same pass)
  ours-out unchecked   the same with check_finite=False: the kernel without the
               finite flag. The check's cost is measured in a second table, the two
               variants timed in ABBA rounds (the interleaved order favours whichever
               runs second)
  ours-out [rayon pool]   the same kernel run on a separate rayon pool instead of
               torch's OpenMP pool (the default; see src/pool.rs)
  (a)          diffusers FlowMatchEulerDiscreteScheduler.step(v, t, x, return_dict=False)
               — its Euler step x + (σ_next − σ)·v. For s = 1 it is still that
               deterministic Euler step, NOT the s = 1 update: it is the baseline
               of "what a stock scheduler step costs", not a like-for-like result.
  (a')         only when the installed diffusers has `stochastic_sampling`, s = 1:
               that mode's step, which is (1 − σ_next)·x̂ + σ_next·ε — our s = 1
               update — but draws ε itself each call (RNG cost included).
  (b)          the same update as plain eager torch ops in Python
  (c)          dst.copy_(src) of one latent: the memory-bandwidth floor

Threads: torch ops and twinflow's fused kernels share torch's OpenMP pool
(torch.set_num_threads sizes both). The rayon row uses its own pool, sized by
RAYON_NUM_THREADS (default: one per CPU); --threads N sets that too (only if not
already set). Because methods are interleaved, every method runs right after
torch ops whose OpenMP workers are still spin-waiting, as in a real sampling
loop where the model's torch ops precede every step: a separate pool competes
with those workers, which is why the default is torch's own pool.

Columns: median µs; "× copy" = median / copy; "× BW floor" = median / (copy ×
arrays moved / 2), i.e. the time relative to a copy scaled to the same memory
traffic (1.0 = as fast as memory allows; an update that moves 3 arrays costs at
least 1.5 copies). Arrays moved: s = 0 reads x, v and writes out (3); s = 1
reads x, v, noise and writes out (4); (a) moves 3, (a') 3 plus drawing ε;
copy 2. "GB/s" = arrays moved × array bytes / median. "vs (a)" = median / (a).

(a)'s step counter is reset before every call (its private `_step_index`), so
every call does the same interval; σ, σ_next of that interval are the t_c, t_n
used by all methods, and the results are cross-checked before timing.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch


def _parse_shape(text: str) -> Tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape like 1x16x128x128 expected, got {text!r}")
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"shape dims must be >= 1, got {text!r}")
    return shape


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_interleaved(fns: Dict[str, Callable[[], object]], repeats: int, number: int,
                     warmup: int) -> Dict[str, List[float]]:
    """Per-call times in µs: `repeats` samples per method, methods interleaved."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    clock = time.perf_counter_ns
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock()
            for _ in range(number):
                fn()
            samples[name].append((clock() - t0) / number / 1e3)
    return samples


def time_paired(checked: Callable[[], object], unchecked: Callable[[], object], repeats: int,
                number: int) -> Tuple[float, float, float]:
    """The cost of the finite check alone: (checked µs, unchecked µs, median of the per-round
    ratios). Each round times checked, unchecked, unchecked, checked (ABBA), so both variants
    follow each method equally often: in the interleaved table above "ours-out" always runs
    right after "ours-fresh", whose fresh output evicts the cache, and "unchecked" right after
    "ours-out", on warm arrays, which biased the earlier comparisons against the check."""
    clock = time.perf_counter_ns
    a: List[float] = []
    b: List[float] = []
    ratios: List[float] = []
    for _ in range(repeats):
        t = []
        for fn in (checked, unchecked, unchecked, checked):
            t0 = clock()
            for _ in range(number):
                fn()
            t.append((clock() - t0) / number / 1e3)
        a += [t[0], t[3]]
        b += [t[1], t[2]]
        ratios.append((t[0] + t[3]) / (t[1] + t[2]))
    return statistics.median(a), statistics.median(b), statistics.median(ratios)


def _check(label: str, got: torch.Tensor, want: torch.Tensor, problems: List[str]) -> None:
    if got.shape != want.shape or got.dtype != want.dtype:
        problems.append(f"{label}: shape/dtype {tuple(got.shape)}/{got.dtype} != {tuple(want.shape)}/{want.dtype}")
        return
    err = (got - want).abs().max().item()
    scale = want.abs().max().item() or 1.0
    if not err <= 1e-5 * scale:
        problems.append(f"{label}: max |diff| {err:.3g} (scale {scale:.3g})")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads(N) (default: leave torch's default)")
    ap.add_argument("--repeats", type=int, default=100, help="timed samples per method (median taken)")
    ap.add_argument("--number", type=int, default=5, help="back-to-back calls per timed sample")
    ap.add_argument("--warmup", type=int, default=10, help="untimed calls per method first")
    ap.add_argument("--shapes", type=_parse_shape, nargs="+",
                    default=[(1, 16, 128, 128), (4, 16, 128, 128)], metavar="BxCxHxW")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 1.0], metavar="S",
                    help="stochast ratios s to time (s > 0 uses a pre-drawn noise tensor)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.number < 1 or args.warmup < 0:
        ap.error("--repeats and --number must be >= 1, --warmup >= 0")
    if any(not (0.0 <= s <= 1.0) for s in args.ratios):
        ap.error("--ratios: each s must lie in [0, 1]")
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
        # twinflow's fused kernels run on torch's OpenMP pool (follows set_num_threads); the
        # rayon comparison row reads RAYON_NUM_THREADS when its pool first starts.
        os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))

    notes: List[str] = []
    try:
        import twinflow
        from twinflow import ucgm_step
        from twinflow._core import set_cpu_pool
        tf_version = getattr(twinflow, "__version__", None)
        if tf_version is None:
            try:
                from importlib.metadata import version
                tf_version = version("twinflow")
            except Exception:
                tf_version = "(version unknown)"
    except ImportError as e:
        ucgm_step = None
        tf_version = None
        notes.append(f"NOTE: `import twinflow` failed ({e}); the ours-* rows are skipped. "
                     "Build and install the package first (maturin develop --release).")
    try:
        import diffusers
        from diffusers import FlowMatchEulerDiscreteScheduler
        df_version = diffusers.__version__
    except ImportError as e:
        FlowMatchEulerDiscreteScheduler = None
        df_version = None
        notes.append(f"NOTE: `import diffusers` failed ({e}); baseline (a) is skipped and the "
                     "'vs (a)' column is empty. Install it (pip install 'diffusers>=0.35') to compare.")

    print("# UCGM sampler: one interval, float32 CPU")
    print()
    print(f"- torch {torch.__version__}, threads {torch.get_num_threads()}, CPU {_cpu_name()} "
          f"({os.cpu_count()} logical), python {platform.python_version()}")
    print(f"- twinflow {tf_version or 'not importable'}, diffusers {df_version or 'not installed'}; "
          f"RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', '(unset: one per CPU)')}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print(f"- {args.repeats} samples × {args.number} calls per method, {args.warmup} warm-up calls; "
          "median per call")
    for n in notes:
        print(f"- {n}")
    print()

    # The interval: σ_10 → σ_11 of a 20-step default diffusers schedule (or the same linear grid).
    sched = sched_stoch = None
    step_idx = 10
    if FlowMatchEulerDiscreteScheduler is not None:
        sched = FlowMatchEulerDiscreteScheduler()
        sched.set_timesteps(20)
        t_c, t_n = float(sched.sigmas[step_idx]), float(sched.sigmas[step_idx + 1])
        timestep = sched.timesteps[step_idx]
        if "stochastic_sampling" in inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters:
            sched_stoch = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
            sched_stoch.set_timesteps(20)
    else:
        grid = torch.linspace(1.0, 0.0, 21, dtype=torch.float32)  # same float32 values diffusers would use
        t_c, t_n = float(grid[step_idx]), float(grid[step_idx + 1])
        timestep = None
    print(f"- interval t_c = {t_c:.6f} → t_n = {t_n:.6f}")
    print()

    header = ("shape", "s", "method", "median µs", "IQR µs", "× copy", "× BW floor", "GB/s", "vs (a)")
    rows: List[Tuple[str, ...]] = []
    check_rows: List[Tuple[str, ...]] = []
    problems: List[str] = []
    gen = torch.Generator().manual_seed(args.seed)

    for shape in args.shapes:
        x = torch.randn(shape, generator=gen, dtype=torch.float32)
        v = torch.randn(shape, generator=gen, dtype=torch.float32)
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)  # pre-drawn ε for s > 0
        out = torch.empty_like(x)
        dst = torch.empty_like(x)
        nbytes = x.numel() * x.element_size()
        shape_s = "×".join(map(str, shape))

        for s in args.ratios:
            stoch = s > 0
            eps = noise if stoch else None
            sq1, sqs = math.sqrt(1.0 - s), math.sqrt(s)

            if stoch:
                def eager(x=x, v=v, noise=noise, s=s):
                    return (1 - t_n) * (x - t_c * v) + t_n * (((1 - s) ** 0.5) * (x + (1 - t_c) * v)
                                                             + (s ** 0.5) * noise)
            else:
                def eager(x=x, v=v):
                    return x - (t_c - t_n) * v

            # Reference in float64 for the cross-checks.
            xd, vd = x.double(), v.double()
            if stoch:
                ref = ((1 - t_n) * (xd - t_c * vd)
                       + t_n * (sq1 * (xd + (1 - t_c) * vd) + sqs * noise.double())).float()
            else:
                ref = (xd - (t_c - t_n) * vd).float()

            fns: Dict[str, Callable[[], object]] = {}
            arrays: Dict[str, int] = {}
            moved = 4 if stoch else 3
            if ucgm_step is not None:
                fns["ours-fresh"] = lambda: ucgm_step(x, v, t_c, t_n, s, eps)
                fns["ours-out"] = lambda: ucgm_step(x, v, t_c, t_n, s, eps, out=out)
                fns["ours-out unchecked"] = lambda: ucgm_step(x, v, t_c, t_n, s, eps, out=out, check_finite=False)

                def ours_rayon():
                    # The same kernel on a separate rayon pool instead of torch's OpenMP pool.
                    set_cpu_pool("rayon")
                    try:
                        return ucgm_step(x, v, t_c, t_n, s, eps, out=out)
                    finally:
                        set_cpu_pool("openmp")

                fns["ours-out [rayon pool]"] = ours_rayon
                arrays["ours-fresh"] = arrays["ours-out"] = arrays["ours-out [rayon pool]"] = moved
                arrays["ours-out unchecked"] = moved
                _check(f"{shape_s} s={s} ours-fresh", ucgm_step(x, v, t_c, t_n, s, eps), ref, problems)
                out.fill_(float("nan"))
                got = ucgm_step(x, v, t_c, t_n, s, eps, out=out)
                if got is not out and got.data_ptr() != out.data_ptr():
                    problems.append(f"{shape_s} s={s} ours-out: did not return `out`")
                _check(f"{shape_s} s={s} ours-out", out, ref, problems)
            if sched is not None:
                label_a = "(a) diffusers step" + (" [Euler, not s=1]" if stoch else "")

                def diffusers_step(sched=sched):
                    sched._step_index = step_idx  # every call does the same interval
                    return sched.step(v, timestep, x, return_dict=False)[0]

                fns[label_a] = diffusers_step
                arrays[label_a] = 3
                euler_ref = (xd - (t_c - t_n) * vd).float()
                _check(f"{shape_s} s={s} diffusers Euler", diffusers_step(), euler_ref, problems)
                if stoch and s == 1.0 and sched_stoch is not None:
                    label_a2 = "(a') diffusers stochastic_sampling [own ε]"

                    def diffusers_stoch(sched=sched_stoch):
                        sched._step_index = step_idx
                        return sched.step(v, timestep, x, return_dict=False)[0]

                    fns[label_a2] = diffusers_stoch
                    arrays[label_a2] = 3
            fns["(b) torch eager"] = eager
            arrays["(b) torch eager"] = moved
            _check(f"{shape_s} s={s} torch eager", eager(), ref, problems)
            fns["(c) copy_"] = lambda: dst.copy_(x)
            arrays["(c) copy_"] = 2

            samples = time_interleaved(fns, args.repeats, args.number, args.warmup)
            if ucgm_step is not None:
                c, u, r = time_paired(fns["ours-out"], fns["ours-out unchecked"], args.repeats, args.number)
                check_rows.append((shape_s, f"{s:g}", f"{c:.1f}", f"{u:.1f}", f"{r:.3f}"))
            med = {k: statistics.median(vs) for k, vs in samples.items()}
            copy_us = med["(c) copy_"]
            base = med.get(label_a) if sched is not None else None
            for name, m in med.items():
                q = statistics.quantiles(samples[name], n=4) if len(samples[name]) >= 2 else [m, m, m]
                rows.append((
                    shape_s, f"{s:g}", name, f"{m:.1f}", f"{q[2] - q[0]:.1f}",
                    f"{m / copy_us:.2f}", f"{m / (copy_us * arrays[name] / 2):.2f}",
                    f"{arrays[name] * nbytes / (m * 1e3):.1f}",
                    "-" if base is None else f"{m / base:.2f}",
                ))

    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()
    if check_rows:
        print("The finite check's cost: `ours-out` (check_finite=True) against `ours-out unchecked`, "
              "timed in ABBA rounds (see time_paired); ratio = median over rounds of checked / unchecked.")
        print()
        print("| shape | s | checked µs | unchecked µs | checked / unchecked |")
        print("|---|---|---:|---:|---:|")
        for r in check_rows:
            print("| " + " | ".join(r) + " |")
        print()
    if problems:
        print("CROSS-CHECK FAILURES (results differ from the float64 reference beyond 1e-5 relative):")
        for p in problems:
            print(f"- {p}")
        return 1
    print("Cross-checks passed: every timed method's result matches the float64 reference of its own "
          "update within 1e-5 relative (diffusers against the Euler step; (a') not checked: own ε).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
