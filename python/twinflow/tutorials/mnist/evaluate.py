"""``evaluate``: classifier-FID, accuracy and coverage of a checkpoint at several step counts."""

from __future__ import annotations

import os
import time
from typing import Dict, List, Optional, Sequence

import torch

from .checkpoint import SHIPPED, load_model, shipped_checkpoint
from .data import load_mnist
from .metrics import features, load_classifier, sample_metrics
from .sample import generate, sampler_for

__all__ = ["evaluate", "shipped_checkpoint", "SHIPPED"]


def evaluate(checkpoint, steps: Sequence[int] = (1, 2, 4), num_samples: int = 10000,
             sampler: str = "auto", seed: int = 0, device="cpu", data_dir=None,
             classifier_path: Optional[os.PathLike] = None, progress: bool = True) -> List[Dict]:
    """One row per step count: {steps, nfe, fid, accuracy, coverage, num_samples, seconds}.
    Samples are class-conditional, classes balanced; the reference is the 10k test set."""
    if num_samples < 10:
        raise ValueError(f"num_samples must be >= 10 (one per class), got {num_samples}")
    model, config = load_model(shipped_checkpoint(checkpoint), device=device)
    clf = load_classifier(classifier_path)
    test_images, _ = load_mnist("test", data_dir)
    ref, _ = features(clf, test_images)
    labels = torch.arange(10).repeat(-(-num_samples // 10))[:num_samples]
    rows = []
    for n in steps:
        s = sampler_for(config["method"], int(n), sampler)
        g = torch.Generator(device=device).manual_seed(seed)
        t0 = time.perf_counter()
        images = generate(model, labels, s, generator=g, progress=progress)
        seconds = time.perf_counter() - t0
        rows.append({"steps": int(n), "nfe": s.nfe, **sample_metrics(clf, images, labels, ref),
                     "seconds": round(seconds, 2)})
    return rows
