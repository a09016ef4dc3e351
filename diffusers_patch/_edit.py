"""What the editing families (Qwen-Image-Edit, FLUX Kontext) share: one reference image per
text, as PIL images (what their pipelines take), from PIL images or the [-1, 1] pixel tensors
of the training data."""

from __future__ import annotations

from typing import List

import torch

__all__ = ["reference_images", "to_pil"]


def to_pil(pixels: torch.Tensor):
    """A [3, H, W] tensor in [-1, 1] as the RGB image it was decoded from
    (``twinflow.training.data.load_image``'s u / 127.5 − 1 inverted and rounded: exact for
    decoded images)."""
    import numpy as np
    from PIL import Image

    arr = ((pixels.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(np.ascontiguousarray(arr.permute(1, 2, 0).numpy()))


def reference_images(family: str, references, count: int) -> List:
    """`references` — PIL images, or a [B, 3, H, W] tensor in [-1, 1] — as `count` PIL images;
    ValueError when they are missing or not one per text."""
    from PIL import Image

    if references is None:
        raise ValueError(f"{family} edits a reference image: its text encoding needs one reference image per text "
                         "(references=)")
    if isinstance(references, torch.Tensor):
        if references.dim() != 4 or references.shape[1] != 3:
            raise ValueError(f"{family}: references as a tensor must be [B, 3, H, W] pixels in [-1, 1], "
                             f"got shape {tuple(references.shape)}")
        references = [to_pil(r) for r in references]
    elif isinstance(references, Image.Image):
        references = [references]
    references = list(references)
    if len(references) != count or not all(isinstance(r, Image.Image) for r in references):
        raise ValueError(f"{family}: expected {count} reference images (PIL images or a [B, 3, H, W] tensor), "
                         f"one per text; got {len(references)} of types "
                         f"{sorted({type(r).__name__ for r in references})}")
    return [r.convert("RGB") for r in references]
