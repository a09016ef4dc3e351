"""A 2-D toy flow: a Gaussian mixture and its *exact* flow-matching velocity.

Transport (docs/algorithm.md §1): ``x_t = t·z + (1 − t)·x`` with ``z ~ N(0, I)`` (t = 1 is
pure noise) and ``x`` drawn from the mixture. The velocity a flow-matching
network learns is the conditional mean ``v(x_t, t) = E[z − x | x_t]``; for a
Gaussian mixture it has a closed form, so the toy needs no training and every
sampler error is the sampler's own (discretisation), not the network's.

Derivation, per component k with mean μ_k, isotropic std σ_k and weight w_k::

    x_t | k        ~ N((1 − t)·μ_k, V_k·I),   V_k = t² + (1 − t)²·σ_k²
    r_k            = x_t − (1 − t)·μ_k
    E[x | x_t, k]  = μ_k + (1 − t)·σ_k²/V_k · r_k        (Cov(x, x_t) = (1 − t)σ_k²)
    E[z | x_t, k]  = t/V_k · r_k                         (Cov(z, x_t) = t)
    v_k            = (t − (1 − t)·σ_k²)/V_k · r_k − μ_k
    γ_k(x_t)       = softmax_k(log w_k − |r_k|²/(2V_k) − (d/2)·log V_k)
    v              = Σ_k γ_k·v_k

``V_k ≥ σ_k²/(1 + σ_k²) > 0`` for every t ∈ [0, 1], so t = 0 and t = 1 are
regular (t = 1: v = x_t − Σ_k w_k μ_k; t = 0: v = −x_t). The sum is computed
with two small matrix products (no [B, K, D] intermediate), so it is cheap for
large batches.

Example — many-step Euler on the exact field carries N(0, I) onto the
mixture (plain torch, no sampler needed)::

    >>> import torch
    >>> from twinflow.toy import (GaussianMixture2D, GaussianMixtureVelocity,
    ...                           mean_nearest_mode_distance, mode_coverage)
    >>> mix = GaussianMixture2D()                    # 8 modes, radius 4, std 0.3
    >>> model = GaussianMixtureVelocity(mix)
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(4000, 2, generator=g)
    >>> ts = torch.linspace(1.0, 0.0, 501)
    >>> for t_c, t_n in zip(ts[:-1], ts[1:]):
    ...     t = t_c.expand(x.shape[0])
    ...     x = x - (t_c - t_n) * model(x, t=t, tt=t)
    >>> mean_nearest_mode_distance(x, mix) < 0.5     # data itself: ≈ 0.3·√(π/2) ≈ 0.38
    True
    >>> mode_coverage(x, mix)
    8

The same field plugs straight into the sampler: ``UnifiedSampler(...).sample(
GaussianMixtureVelocity(mix), noise)``; it ignores ``tt`` (an ordinary
flow-matching model, docs/algorithm.md §1) and uses ``|t|`` (the sign convention of the
twin trajectory does not apply to an exact field).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

__all__ = [
    "GaussianMixture2D",
    "GaussianMixtureVelocity",
    "mean_nearest_mode_distance",
    "mode_counts",
    "mode_coverage",
    "fraction_near_modes",
    "ToyNet",
    "train_toy",
]

_Number = Union[int, float]


class GaussianMixture2D:
    """Isotropic Gaussian mixture, by default 8 modes evenly on a circle.

    Args:
        num_modes: number of components placed on the circle (ignored when
            ``means`` is given).
        radius: circle radius.
        std: component standard deviation — a scalar or one value per mode.
            Must be > 0.
        weights: mixture weights (normalised here); uniform by default.
        means: explicit ``[K, D]`` component means; overrides the circle.
        dtype, device: of the parameters and of the samples drawn.

    Attributes ``means`` [K, D], ``stds`` [K], ``weights`` [K] are tensors of
    ``dtype`` on ``device``.
    """

    def __init__(
        self,
        num_modes: int = 8,
        radius: float = 4.0,
        std: Union[_Number, Sequence[_Number], torch.Tensor] = 0.3,
        weights: Optional[Union[Sequence[_Number], torch.Tensor]] = None,
        means: Optional[Union[Sequence[Sequence[_Number]], torch.Tensor]] = None,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
    ) -> None:
        if not dtype.is_floating_point:
            raise ValueError(f"dtype: must be a floating point dtype, got {dtype}")
        self.dtype = dtype
        self.device = torch.device(device)
        if means is None:
            if int(num_modes) < 1:
                raise ValueError(f"num_modes: must be >= 1, got {num_modes}")
            if not math.isfinite(radius):
                raise ValueError(f"radius: must be finite, got {radius}")
            angles = torch.arange(int(num_modes), dtype=torch.float64) * (2.0 * math.pi / int(num_modes))
            m = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1) * float(radius)
        else:
            m = torch.as_tensor(means, dtype=torch.float64)
            if m.dim() != 2 or m.shape[0] < 1 or m.shape[1] < 1:
                raise ValueError(f"means: expected a [K, D] array, got shape {tuple(m.shape)}")
        k = m.shape[0]
        s = torch.as_tensor(std, dtype=torch.float64).flatten()
        if s.numel() == 1:
            s = s.expand(k).clone()
        if s.numel() != k:
            raise ValueError(f"std: expected a scalar or {k} values, got {s.numel()}")
        if not bool(torch.all(torch.isfinite(s) & (s > 0))):
            raise ValueError("std: every component std must be finite and > 0")
        if weights is None:
            w = torch.full((k,), 1.0 / k, dtype=torch.float64)
        else:
            w = torch.as_tensor(weights, dtype=torch.float64).flatten()
            if w.numel() != k:
                raise ValueError(f"weights: expected {k} values, got {w.numel()}")
            if not bool(torch.all(torch.isfinite(w) & (w >= 0))) or float(w.sum()) <= 0:
                raise ValueError("weights: must be finite, >= 0 and not all zero")
            w = w / w.sum()
        if not bool(torch.all(torch.isfinite(m))):
            raise ValueError("means: must be finite")
        self.means = m.to(dtype=dtype, device=self.device)
        self.stds = s.to(dtype=dtype, device=self.device)
        self.weights = w.to(dtype=dtype, device=self.device)

    @property
    def num_modes(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def to(self, dtype: Optional[torch.dtype] = None,
           device: Optional[Union[str, torch.device]] = None) -> "GaussianMixture2D":
        """A copy with parameters in another dtype and/or on another device."""
        dtype = self.dtype if dtype is None else dtype
        device = self.device if device is None else device
        return GaussianMixture2D(
            std=self.stds.double().cpu(), weights=self.weights.double().cpu(),
            means=self.means.double().cpu(), dtype=dtype, device=device,
        )

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` samples, shape [n, D], in the mixture's dtype and device.

        Draws component labels first, then the Gaussian offsets, both from
        ``generator`` (the global RNG when None), which must live on the
        mixture's device.
        """
        n = int(n)
        if n < 0:
            raise ValueError(f"n: must be >= 0, got {n}")
        labels = self.sample_labels(n, generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=self.dtype, device=self.device)
        return self.means[labels] + self.stds[labels].unsqueeze(1) * eps

    def sample_labels(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Component indices [n] (int64) drawn from the mixture weights."""
        if n == 0:
            return torch.empty(0, dtype=torch.long, device=self.device)
        return torch.multinomial(self.weights.float(), int(n), replacement=True, generator=generator)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log density of the mixture at ``x`` [B, D] → [B]."""
        x = x.to(self.dtype)
        d2 = _sq_dist(x, self.means)  # [B, K]
        var = self.stds.pow(2)
        logp = (torch.log(self.weights) - 0.5 * d2 / var
                - 0.5 * self.dim * torch.log(2.0 * math.pi * var))
        return torch.logsumexp(logp, dim=1)

    def __repr__(self) -> str:
        return (f"GaussianMixture2D(num_modes={self.num_modes}, dim={self.dim}, "
                f"stds={self.stds.tolist()}, dtype={self.dtype}, device={self.device})")


class GaussianMixtureVelocity:
    """Exact flow-matching velocity ``E[z − x | x_t]`` of a Gaussian mixture.

    Callable as ``model(x_t, t=t, tt=tt, **ignored)`` with ``x_t`` [B, D] and
    ``t`` a tensor [B] (or a scalar / Python float); returns a tensor of the
    shape, dtype and device of ``x_t``. ``tt`` and any other keyword are
    ignored (an ordinary flow-matching model). ``|t|`` is used and clamped to
    [0, 1]. Computation is in ``x_t``'s dtype.

    ``calls`` counts the evaluations (handy for checking a sampler's NFE).
    """

    def __init__(self, mixture: GaussianMixture2D) -> None:
        self.mixture = mixture
        self.calls = 0
        self._cache: dict = {}

    def _params(self, dtype: torch.dtype, device: torch.device):
        key = (dtype, device)
        p = self._cache.get(key)
        if p is None:
            m = self.mixture
            mu = m.means.to(dtype=dtype, device=device)
            var = m.stds.to(dtype=dtype, device=device).pow(2)
            logw = torch.log(m.weights.to(dtype=dtype, device=device))
            p = (mu, var, logw, mu.pow(2).sum(1))
            self._cache[key] = p
        return p

    def __call__(self, x_t: torch.Tensor, t=None, tt=None, **kwargs) -> torch.Tensor:
        if t is None:
            raise TypeError("GaussianMixtureVelocity: the time `t` is required")
        if x_t.dim() != 2 or x_t.shape[1] != self.mixture.dim:
            raise ValueError(f"x_t: expected shape [B, {self.mixture.dim}], got {tuple(x_t.shape)}")
        self.calls += 1
        dtype, device = x_t.dtype, x_t.device
        b, d = x_t.shape
        mu, var, logw, mu_sq = self._params(dtype, device)

        t = torch.as_tensor(t, dtype=dtype, device=device).abs().clamp(0.0, 1.0)
        if t.dim() == 0:
            t = t.expand(b)
        t = t.reshape(b, 1)                                   # [B, 1]
        a = 1.0 - t                                           # weight of x in x_t
        v_k = t * t + a * a * var                             # [B, K] conditional variance
        # |r_k|² = |x_t|² − 2a·x_t·μ_k + a²|μ_k|², r_k = x_t − a·μ_k
        xm = x_t @ mu.T                                       # [B, K]
        r_sq = (x_t.pow(2).sum(1, keepdim=True) - 2.0 * a * xm + a * a * mu_sq).clamp_min(0.0)
        logits = logw - 0.5 * r_sq / v_k - 0.5 * d * torch.log(v_k)
        gamma = torch.softmax(logits, dim=1)                  # posterior responsibilities (logsumexp-normalised)
        c = (t - a * var) / v_k                               # [B, K]; v_k = c·r_k − μ_k
        gc = gamma * c
        # Σ γ_k (c_k (x_t − a μ_k) − μ_k) = (Σ γ_k c_k) x_t − (γ ⊙ (a c + 1)) @ μ
        return gc.sum(1, keepdim=True) * x_t - (gc * a + gamma) @ mu

    def __repr__(self) -> str:
        return f"GaussianMixtureVelocity({self.mixture!r})"


def _sq_dist(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Squared distances [B, K] between rows of x [B, D] and means [K, D]."""
    diff = x.unsqueeze(1) - means.unsqueeze(0)
    return diff.pow(2).sum(-1)


def _as_samples(samples: torch.Tensor, mixture: GaussianMixture2D) -> torch.Tensor:
    s = torch.as_tensor(samples)
    if s.dim() != 2 or s.shape[1] != mixture.dim:
        raise ValueError(f"samples: expected shape [N, {mixture.dim}], got {tuple(s.shape)}")
    return s.to(dtype=torch.float64, device=mixture.device)


def mean_nearest_mode_distance(samples: torch.Tensor, mixture: GaussianMixture2D) -> float:
    """Mean over samples of the Euclidean distance to the nearest mode centre.

    For exact mixture samples this is σ·E|N(0, I_2)| = σ·√(π/2) ≈ 0.376 for
    σ = 0.3; a sampler that collapses to the mixture mean scores the radius.
    Non-finite samples count as infinitely far (the result is then inf).
    """
    s = _as_samples(samples, mixture)
    if s.shape[0] == 0:
        return float("nan")
    d = _sq_dist(s, mixture.means.double()).min(dim=1).values.sqrt()
    d = torch.where(torch.isfinite(d), d, torch.full_like(d, float("inf")))
    return float(d.mean())


def _radii(mixture: GaussianMixture2D, radius: Optional[float]) -> torch.Tensor:
    if radius is None:
        return 3.0 * mixture.stds.double()
    if not (radius > 0):
        raise ValueError(f"radius: must be > 0, got {radius}")
    return torch.full((mixture.num_modes,), float(radius), dtype=torch.float64, device=mixture.device)


def _near(samples, mixture, radius) -> torch.Tensor:
    s = _as_samples(samples, mixture)
    r = _radii(mixture, radius)
    return _sq_dist(s, mixture.means.double()) <= r.pow(2).unsqueeze(0)    # [N, K]


def mode_counts(samples: torch.Tensor, mixture: GaussianMixture2D,
                radius: Optional[float] = None) -> torch.Tensor:
    """Number of samples within ``radius`` of each mode centre → int64 [K].

    ``radius`` defaults to 3·σ_k per mode.
    """
    return _near(samples, mixture, radius).sum(0)


def mode_coverage(samples: torch.Tensor, mixture: GaussianMixture2D,
                  radius: Optional[float] = None, min_count: int = 1) -> int:
    """How many modes have at least ``min_count`` samples within ``radius``.

    ``radius`` defaults to 3·σ_k per mode (for σ = 0.3: 0.9).
    """
    return int((mode_counts(samples, mixture, radius) >= int(min_count)).sum())


def fraction_near_modes(samples: torch.Tensor, mixture: GaussianMixture2D,
                        radius: Optional[float] = None) -> float:
    """Fraction of samples within ``radius`` (default 3·σ_k) of some mode centre.

    ≈ 0.989 for exact samples of a 2-D mixture with well-separated modes
    (P(χ²₂ ≤ 9) = 1 − e^(−4.5)); it exposes blur that ``mode_coverage`` (a
    count of modes hit at all) does not.
    """
    near = _near(samples, mixture, radius)
    if near.shape[0] == 0:
        return float("nan")
    return float(near.any(dim=1).double().mean())


class ToyNet(torch.nn.Module):
    """A small MLP velocity field on R² for TwinFlow training: x, emb(t), emb(tt) → v.
    The embedding keeps the sign of t (negative t marks the twin trajectory, docs/algorithm.md §1)."""

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


def train_toy(recipe: str = "twinflow", steps: int = 1500, batch: int = 256, lr: float = 3e-3,
              seed: int = 0, mixture: Optional[GaussianMixture2D] = None, progress: bool = False) -> ToyNet:
    """Train a fresh :class:`ToyNet` on the mixture with ``TwinFlowLoss(recipe)`` and Adam."""
    from tqdm.auto import tqdm

    from .losses import TwinFlowLoss

    torch.manual_seed(seed)
    mix = mixture if mixture is not None else GaussianMixture2D()
    model = ToyNet().to(mix.means.device)
    loss_fn = TwinFlowLoss(recipe=recipe)
    g = torch.Generator(device=mix.means.device).manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in tqdm(range(steps), desc=f"train {recipe}", disable=not progress, leave=False):
        loss = loss_fn(model, mix.sample(batch, generator=g).float(), generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if not torch.isfinite(loss):
        raise RuntimeError(f"training diverged: loss {loss.item()}")
    return model.eval()

