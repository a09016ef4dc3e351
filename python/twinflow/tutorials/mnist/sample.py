"""Sampling MNIST digits from a checkpoint with the UnifiedSampler."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ... import UnifiedSampler
from ..._random import random_tensor

__all__ = ["sampler_for", "generate", "class_grid_labels", "save_grid"]


def sampler_for(method: str, steps: int, kind: str = "auto") -> UnifiedSampler:
    """``euler``: plain Euler on the flow (tt = t), what a flow-matching model is sampled with;
    ``twinflow``: the published few-step presets for 1/2/4 steps (else the any-step style).
    ``auto`` picks euler for flow_matching checkpoints, twinflow otherwise."""
    if kind == "auto":
        kind = "euler" if method == "flow_matching" else "twinflow"
    if kind == "euler":
        return UnifiedSampler(sampling_steps=steps, stochast_ratio=0.0, sampling_style="mul",
                              rfba_gap_steps=(0.0, 0.0))
    if kind == "twinflow":
        if steps in (1, 2, 4):
            return UnifiedSampler.preset(f"{steps}-nfe")
        return UnifiedSampler(sampling_steps=steps, sampling_style="any", rfba_gap_steps=(0.001, 0.5))
    raise ValueError(f"sampler must be auto, euler or twinflow, got {kind!r}")


@torch.no_grad()
def generate(model: torch.nn.Module, labels: torch.Tensor, sampler: UnifiedSampler,
             generator: Optional[torch.Generator] = None, batch_size: int = 500,
             progress: bool = False) -> torch.Tensor:
    """uint8 [N, 28, 28] digits of the given classes (label ``num_classes`` = unconditional)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    out = []
    for start in tqdm(range(0, labels.shape[0], batch_size), desc="sample", disable=not progress, leave=False):
        y = labels[start:start + batch_size].to(device)
        noise = random_tensor((y.shape[0], 1, 28, 28), generator, dtype=torch.float32, device=device)
        noise = noise.contiguous(memory_format=torch.channels_last)
        x = sampler.sample(model, noise, generator=generator, c=[y])
        out.append(((x[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)


def class_grid_labels(num_samples: int, num_classes: int = 10) -> torch.Tensor:
    """Labels for a grid with one class per row: 0,0,…,1,1,… (num_samples // num_classes each)."""
    per = max(1, num_samples // num_classes)
    return torch.arange(num_classes).repeat_interleave(per)


def save_grid(images: torch.Tensor, path, rows: int = 10, pad: int = 2, scale: int = 2) -> Path:
    """A PNG of uint8 [N, 28, 28] images in `rows` rows (row-major), white gaps between them."""
    from PIL import Image

    n = images.shape[0]
    cols = -(-n // rows)
    h, w = images.shape[1:]
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=np.uint8)
    for i, img in enumerate(images.numpy()):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(path)
    return path
