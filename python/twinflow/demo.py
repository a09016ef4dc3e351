"""``twinflow demo``: one-step generation on a 2-D Gaussian mixture.

Samples the mixture's exact flow field with the UnifiedSampler at several step counts, then
trains a small MLP with the TwinFlow objective and with plain flow matching (seconds on a
CPU) and samples both with one and two network evaluations. Prints a table (steps, NFE, mean nearest-mode distance, modes covered, wall time), writes one
PNG scatter per setting and ``demo.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time
from typing import List

from tqdm.auto import tqdm

from .cli import positive_int, register_command

def render_scatter(points, path, *, modes=None, mode_radii=None, title: str = "",
                   size: int = 512, extent: float = 6.0) -> pathlib.Path:
    """Scatter plot of 2-D ``points`` [N, 2] into a PNG at ``path``.

    White canvas covering [−extent, extent]², faint axes, a grey circle of
    radius ``mode_radii[k]`` around each of ``modes`` [K, 2], points as small
    blue dots. Drawing is done with numpy; Pillow saves the image and adds the
    title. Points off the canvas are counted in the title.
    """
    import numpy as np

    path = pathlib.Path(path)
    size = int(size)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    canvas = np.full((size, size, 3), 255, dtype=np.uint8)
    scale = (size - 1) / (2.0 * extent)

    def to_px(xy):
        col = np.rint((xy[:, 0] + extent) * scale).astype(np.int64)
        row = np.rint((extent - xy[:, 1]) * scale).astype(np.int64)
        return row, col

    mid = int(round(extent * scale))
    canvas[mid, :] = (225, 225, 225)
    canvas[:, mid] = (225, 225, 225)
    if modes is not None:
        m = np.asarray(modes, dtype=np.float64).reshape(-1, 2)
        radii = np.full(len(m), 0.9) if mode_radii is None else np.broadcast_to(
            np.asarray(mode_radii, dtype=np.float64), (len(m),))
        ang = np.linspace(0.0, 2.0 * np.pi, 720, endpoint=False)
        for (cx, cy), r in zip(m, radii):
            ring = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], axis=1)
            rr, cc = to_px(ring)
            ok = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
            canvas[rr[ok], cc[ok]] = (160, 160, 160)
    finite = np.isfinite(pts).all(axis=1)
    rows, cols = to_px(np.where(finite[:, None], pts, 0.0))
    inside = finite & (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
    off = int(len(pts) - inside.sum())
    rows, cols = rows[inside], cols[inside]
    for dr in (-1, 0, 1):           # 3×3 dots
        for dc in (-1, 0, 1):
            r, c = np.clip(rows + dr, 0, size - 1), np.clip(cols + dc, 0, size - 1)
            canvas[r, c] = (31, 90, 180)
    label = title + (f"  ({off} off-canvas)" if off else "")
    from PIL import Image, ImageDraw

    img = Image.fromarray(canvas)
    if label:
        ImageDraw.Draw(img).text((6, 4), label, fill=(0, 0, 0))
    img.save(path)
    return path


def _add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps-list", type=positive_int, nargs="+", default=[1, 2, 4, 30], metavar="K",
                   help="Euler step counts (UnifiedSampler(sampling_steps=K, stochast_ratio=0))")
    p.add_argument("--presets", nargs="*", default=["multi-step"], metavar="NAME",
                   help="UnifiedSampler presets to run as well (none: pass the flag alone)")
    p.add_argument("--num-samples", type=positive_int, default=2000, help="samples per setting")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (the same for every setting)")
    p.add_argument("--output-dir", type=pathlib.Path, default=pathlib.Path("out/demo"),
                   help="where the PNGs and demo.json go (created if missing)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--image-size", type=positive_int, default=512, help="PNG side in pixels")
    p.add_argument("--train-steps", type=int, default=1500,
                   help="steps to train the toy MLP with the TwinFlow and flow-matching objectives "
                        "(0: only the exact field)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@register_command(
    "demo", add_arguments=_add_demo_arguments,
    help="one-step generation on a 2-D Gaussian mixture (exact flow, TwinFlow-trained MLP)",
    description=("Samples the exact velocity field of a 2-D mixture of 8 Gaussians (circle of radius 4, "
                 "std 0.3) with the UnifiedSampler at several step counts, trains a small MLP with the "
                 "TwinFlow and the flow-matching objectives and samples both with 1-2 network "
                 "evaluations; prints a table, writes one PNG scatter per setting and demo.json."),
)
def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from . import UnifiedSampler
    from .toy import (GaussianMixture2D, GaussianMixtureVelocity, fraction_near_modes,
                      mean_nearest_mode_distance, mode_coverage, train_toy)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: CUDA is not available")
    out_dir: pathlib.Path = args.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    n = args.num_samples
    mix = GaussianMixture2D(device=device)
    radii = (3.0 * mix.stds).cpu().numpy()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    exact = lambda: GaussianMixtureVelocity(mix)  # noqa: E731
    euler = lambda k, style="few": UnifiedSampler(sampling_steps=k, sampling_style=style)  # noqa: E731
    # (label, sampler, model factory): the exact field first, then trained networks.
    settings = [(f"euler-{k}", euler(k), exact) for k in args.steps_list]
    settings += [(name, UnifiedSampler.preset(name), exact) for name in args.presets]
    if args.train_steps > 0:
        # The product in miniature: the same small MLP trained with the TwinFlow objective and
        # with plain flow matching, then sampled with one or two network evaluations.
        twin = train_toy("twinflow", steps=args.train_steps, seed=args.seed, mixture=mix, progress=not args.quiet)
        fm = train_toy("flow_matching", steps=args.train_steps, seed=args.seed, mixture=mix, progress=not args.quiet)
        settings += [
            ("twinflow-net 1-nfe", UnifiedSampler.preset("1-nfe"), lambda: twin),
            ("twinflow-net 2-nfe", UnifiedSampler.preset("2-nfe"), lambda: twin),
            # A flow-matching net only knows tt = t: sample it with the "mul" style.
            ("fm-net euler-1", euler(1, "mul"), lambda: fm),
            ("fm-net euler-30", euler(30, "mul"), lambda: fm),
        ]

    # One-time costs (library init, first kernels) stay out of the timings.
    UnifiedSampler(sampling_steps=1).sample(
        GaussianMixtureVelocity(mix), torch.zeros(8, 2, dtype=mix.dtype, device=device))
    sync()

    rows: List[dict] = []
    ref = mix.sample(n, generator=torch.Generator(device=device).manual_seed(args.seed + 1))
    rows.append({
        "setting": "data", "steps": None, "nfe": 0, "model_calls": 0,
        "mean_nearest_mode_distance": mean_nearest_mode_distance(ref, mix),
        "modes_covered": mode_coverage(ref, mix), "fraction_near_modes": fraction_near_modes(ref, mix),
        "wall_time_s": 0.0,
        "image": render_scatter(ref.cpu().numpy(), out_dir / "data.png", modes=mix.means.cpu().numpy(),
                                mode_radii=radii, title=f"data: {n} mixture samples",
                                size=args.image_size).name,
    })
    for label, sampler, make in tqdm(settings, desc="demo", unit="setting", leave=False,
                                     disable=True if args.quiet else None):
        gen = torch.Generator(device=device).manual_seed(args.seed)
        noise = torch.randn(n, 2, generator=gen, dtype=mix.dtype, device=device)  # same noise for every setting
        field = _Counted(make())
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            x0 = sampler.sample(field, noise, generator=gen)
        sync()
        wall = time.perf_counter() - t0
        d = mean_nearest_mode_distance(x0, mix)
        cov = mode_coverage(x0, mix)
        near = fraction_near_modes(x0, mix)
        image = render_scatter(
            x0.detach().cpu().numpy(), out_dir / f"{label.replace(' ', '_')}.png", modes=mix.means.cpu().numpy(),
            mode_radii=radii, size=args.image_size,
            title=f"{label}: NFE {sampler.nfe}, mean NN-mode dist {d:.3f}, modes {cov}/{mix.num_modes}")
        rows.append({
            "setting": label, "steps": sampler.sampling_steps, "nfe": int(sampler.nfe), "model_calls": field.calls,
            "mean_nearest_mode_distance": d, "modes_covered": cov, "fraction_near_modes": near,
            "wall_time_s": wall,
            "image": image.name,
        })

    header = ("setting", "steps", "NFE", "mean NN-mode dist", "modes covered", "within 3σ", "wall ms")
    table = [header]
    for r in rows:
        table.append((
            r["setting"], "-" if r["steps"] is None else str(r["steps"]), str(r["nfe"]),
            f"{r['mean_nearest_mode_distance']:.4f}", f"{r['modes_covered']}/{mix.num_modes}",
            f"{100 * r['fraction_near_modes']:.1f}%",
            "-" if r["setting"] == "data" else f"{1e3 * r['wall_time_s']:.1f}",
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for j, row in enumerate(table):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))

    summary = {
        "command": "demo",
        "num_samples": n,
        "seed": args.seed,
        "device": str(device),
        "mixture": {
            "num_modes": mix.num_modes,
            "radius": float(mix.means.norm(dim=1).max()),
            "std": [round(float(v), 6) for v in mix.stds],
            "mode_radius_for_coverage": [round(float(v), 6) for v in radii],
            "expected_mean_nearest_mode_distance": round(float(mix.stds.mean()) * math.sqrt(math.pi / 2), 6),
        },
        "results": rows,
    }
    (out_dir / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("mean NN-mode dist: mean distance to the nearest mode centre (exact samples: "
          f"{summary['mixture']['expected_mean_nearest_mode_distance']:.3f}); modes covered: modes with a "
          "sample within 3σ; within 3σ: share of samples within 3σ of a mode (exact samples: 98.9%)")
    print(f"wrote {len(rows)} images and demo.json to {out_dir}")
    return 0


class _Counted:
    """Counts the model calls the sampler makes."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)

