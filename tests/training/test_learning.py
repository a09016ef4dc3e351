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

import time

import pytest
import torch

from twinflow import UnifiedSampler
from twinflow.toy import (
    GaussianMixture2D,
    ToyNet,
    fraction_near_modes,
    mean_nearest_mode_distance,
    mode_coverage,
    train_toy,
)

STEPS = 1500
BATCH = 256
LR = 3e-3
N_SAMPLES = 2000


def one_step_samples(model, seed: int, sampler=None) -> torch.Tensor:
    noise = torch.randn(N_SAMPLES, 2, generator=torch.Generator().manual_seed(1000 + seed))
    sampler = sampler or UnifiedSampler.preset("1-nfe")
    with torch.no_grad():
        return sampler.sample(model, noise, generator=torch.Generator().manual_seed(seed))


def train(recipe: str, seed: int, steps: int = STEPS):
    """Train a fresh ToyNet; returns (model, untrained 1-NFE samples, trained 1-NFE samples)."""
    torch.manual_seed(seed)
    before = one_step_samples(ToyNet(), seed)
    model = train_toy(recipe, steps=steps, batch=BATCH, lr=LR, seed=seed)
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
    _, before, after = train("twinflow", seed=0)
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
    """Contrast: the flow-matching recipe, same budget, sampled with one Euler step, collapses
    towards the mixture mean, though 30 steps of the same net land on the modes."""
    mix = GaussianMixture2D()
    model, _, _ = train("flow_matching", seed=0)
    # A flow-matching net was trained with tt = t only: one Euler step of its own ("mul") field.
    fm = one_step_samples(model, 0, UnifiedSampler(sampling_steps=1, sampling_style="mul"))
    d_fm = mean_nearest_mode_distance(fm, mix)
    near = fraction_near_modes(fm, mix)
    assert d_fm > 1.5 and near < 0.3, f"flow matching 1-NFE: distance {d_fm:.3f}, near {near:.3f}"
    # ...while the same net is a fine many-step model: the objective is not broken.
    many = one_step_samples(model, 0, UnifiedSampler.preset("multi-step"))
    assert mean_nearest_mode_distance(many, mix) < 0.6
