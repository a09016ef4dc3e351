"""Evidence that TwinFlowLoss learns a one-step generator (CPU, well under a minute).

A small MLP (inputs: x ∈ R², and Fourier embeddings of the signed t and of tt) is trained
with ``TwinFlowLoss(recipe="twinflow")`` and Adam on the 2-D 8-Gaussian mixture of
``twinflow.toy`` (radius 4, std 0.3), then sampled with ONE network evaluation
(``UnifiedSampler.preset("1-nfe")``).  Exact mixture samples score a mean nearest-mode
distance of ≈ 0.38; the untrained net (≈ the noise itself) scores ≈ 2.8.

Measured while tuning (1500 steps, batch 256, Adam 3e-3, 2 CPU threads), with the
plain-PyTorch transcription of tests/twinflow_reference.py: mean nearest-mode distance
0.51–0.54 for seeds 0, 1, 2, all 8 modes covered, 80 % of samples within 3σ of a mode,
≈ 8 s per run.  A flow-matching-trained net of the same size and budget sampled with 1 NFE
collapses towards the mixture mean (distance 2.3–2.6): the one-step ability comes from the
TwinFlow objective.

The thresholds leave a wide margin: trained < 0.5 × untrained, < 0.9 absolute, ≥ 7 of 8
modes covered, ≥ 50 % of the samples within 3σ of a mode.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from twinflow import TwinFlowLoss, UnifiedSampler
from twinflow.toy import (
    GaussianMixture2D,
    fraction_near_modes,
    mean_nearest_mode_distance,
    mode_coverage,
)

STEPS = 1500
BATCH = 256
LR = 3e-3
N_SAMPLES = 2000


class ToyNet(torch.nn.Module):
    """MLP velocity field on R²: x, emb(t), emb(tt) → v.  emb keeps the sign of t."""

    def __init__(self, hidden: int = 128, n_freq: int = 6):
        super().__init__()
        self.register_buffer("freqs", (2.0 ** torch.arange(n_freq)) * (math.pi / 2))
        d_in = 2 + 2 * (1 + 2 * n_freq)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d_in, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, 2),
        )

    def emb(self, t: torch.Tensor) -> torch.Tensor:
        a = t[:, None] * self.freqs
        return torch.cat([t[:, None], torch.sin(a), torch.cos(a)], dim=1)

    def forward(self, x, t, tt, c=None):
        return self.net(torch.cat([x, self.emb(t), self.emb(tt)], dim=1))


def one_step_samples(model, seed: int) -> torch.Tensor:
    noise = torch.randn(N_SAMPLES, 2, generator=torch.Generator().manual_seed(1000 + seed))
    sampler = UnifiedSampler.preset("1-nfe")
    with torch.no_grad():
        return sampler.sample(model, noise, generator=torch.Generator().manual_seed(seed))


def train(loss_fn, seed: int, steps: int = STEPS):
    """Train a fresh ToyNet; returns (model, untrained 1-NFE samples, trained 1-NFE samples)."""
    torch.manual_seed(seed)
    mix = GaussianMixture2D()
    model = ToyNet()
    before = one_step_samples(model, seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for _ in range(steps):
        x = mix.sample(BATCH, generator=g)
        loss = loss_fn(model, x, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    return model, before, one_step_samples(model, seed)


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(old, 2))
    yield
    torch.set_num_threads(old)


def test_twinflow_learns_one_step_generation():
    mix = GaussianMixture2D()
    t0 = time.perf_counter()
    _, before, after = train(TwinFlowLoss(recipe="twinflow"), seed=0)
    elapsed = time.perf_counter() - t0
    d0 = mean_nearest_mode_distance(before, mix)
    d1 = mean_nearest_mode_distance(after, mix)
    cov = mode_coverage(after, mix)
    near = fraction_near_modes(after, mix)
    msg = f"untrained {d0:.3f} → trained {d1:.3f}, coverage {cov}/8, near {near:.3f}, {elapsed:.1f}s"
    print(msg)
    assert torch.isfinite(after).all(), msg
    assert d0 > 2.0, msg                      # sanity: the untrained 1-NFE output is noise-like
    assert d1 < 0.5 * d0, msg
    assert d1 < 0.9, msg
    assert cov >= 7, msg
    assert near >= 0.5, msg


def test_flow_matching_alone_does_not_give_one_step_generation():
    """Contrast: the flow-matching recipe, same budget, sampled with 1 NFE, collapses towards the
    mixture mean (measured: distance 2.3–2.6, 8–12 % of samples near a mode, seeds 0–2)."""
    mix = GaussianMixture2D()
    _, _, fm = train(TwinFlowLoss(recipe="flow_matching"), seed=0)
    d_fm = mean_nearest_mode_distance(fm, mix)
    near = fraction_near_modes(fm, mix)
    assert d_fm > 1.5 and near < 0.3, f"flow matching 1-NFE: distance {d_fm:.3f}, near {near:.3f}"
