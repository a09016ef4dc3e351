"""Classifier-FID for MNIST: Fréchet distance between penultimate-layer features of a small
CNN (trained by ``twinflow mnist train-classifier``, weights shipped in ``weights/``), plus the
classifier's accuracy on class-conditional samples and class coverage."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["Classifier", "CLASSIFIER_PATH", "load_classifier", "train_classifier", "features",
           "frechet_distance", "sample_metrics"]

CLASSIFIER_PATH = Path(__file__).parent / "weights" / "classifier.safetensors"


class Classifier(nn.Module):
    """Two conv stages and a 128-wide penultimate layer (the FID features)."""

    def __init__(self, feature_dim: int = 128):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.penultimate = nn.Linear(64 * 7 * 7, feature_dim)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.penultimate(self.convs(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _prep(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] → float [N, 1, 28, 28] in [0, 1]."""
    if images.dtype != torch.uint8 or images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise ValueError(f"expected uint8 images [N, 28, 28], got {images.dtype} {tuple(images.shape)}")
    return images.float().div(255.0).unsqueeze(1)


def load_classifier(path: Optional[Path] = None) -> Classifier:
    from safetensors.torch import load_file

    path = Path(path) if path is not None else CLASSIFIER_PATH
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights {path} not found (train them with "
                                "`twinflow mnist train-classifier --output PATH`)")
    model = Classifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 3, batch_size: int = 128,
                     lr: float = 1e-3, seed: int = 0, progress: bool = True) -> Classifier:
    """Adam on the training set with small random shifts (so generated digits that are a
    pixel off are still recognised)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x_all = _prep(images)
    n = x_all.shape[0]
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        bar = tqdm(range(0, n - batch_size + 1, batch_size), desc=f"classifier epoch {epoch + 1}",
                   disable=not progress)
        for start in bar:
            idx = perm[start:start + batch_size]
            x = x_all[idx]
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def features(model: Classifier, images: torch.Tensor, batch_size: int = 128):
    """(features float64 [N, D], predicted classes [N]).

    ``batch_size`` changes the speed only: an image's features do not depend on its batch (equal
    here, tested to float32 rounding). 128 keeps a batch's activations in cache; 1000 ran about
    2× slower here."""
    feats, preds = [], []
    for start in range(0, images.shape[0], batch_size):
        f = model.features(_prep(images[start:start + batch_size]))
        feats.append(f.double())
        preds.append(model.head(f).argmax(1))
    return torch.cat(feats), torch.cat(preds)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2(Σa^½ Σb Σa^½)^½), in float64 via symmetric eigendecompositions."""
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples on each side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    ev, vec = torch.linalg.eigh(cov_a)
    sqrt_a = (vec * ev.clamp(min=0).sqrt()) @ vec.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def sample_metrics(model: Classifier, generated: torch.Tensor, labels: torch.Tensor,
                   reference_features: torch.Tensor) -> Dict[str, float]:
    """FID against the reference features; accuracy = share of samples classified as the class
    they were generated for; coverage = share of the 10 classes that receive at least half of
    their fair share (5%) of the predictions."""
    feats, preds = features(model, generated)
    counts = torch.bincount(preds, minlength=10).double()
    return {
        "fid": frechet_distance(feats, reference_features),
        "accuracy": float((preds == labels.to(preds.device)).double().mean()),
        "coverage": float((counts >= 0.05 * preds.shape[0]).double().mean()),
        "num_samples": int(generated.shape[0]),
    }
