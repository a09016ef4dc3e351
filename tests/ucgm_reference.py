"""Independent plain-PyTorch transcription of docs/algorithm.md §2 (UnifiedSampler, UCGM-S).

This module deliberately does NOT import twinflow: it is the oracle the tests
compare the real implementation against.  It follows the spec literally:

* the time grid is computed in float64 (``torch.linspace``) and each time value
  is cast to the noise dtype/device when handed to the model, as a tensor of
  shape ``[B]`` (``B = noise.shape[0]``);
* ``x_hat = x - t*F`` and ``z_hat = x + (1 - t)*F``;
* extrapolation (r > 0) from step index i >= 2 on, against the previous step's
  *un-extrapolated* estimates;
* "SDE": ``s_i = min(1, 2*t_c*|t_c - t_n| / t_n**2)``, ``s_i = 1`` when ``t_n == 0``,
  recomputed every step;
* one ``torch.randn(x.shape, generator=..., dtype=x.dtype, device=x.device)`` draw
  per interval with ``s_i > 0`` (the last interval included), in interval order;
* ``x <- (1 - t_n)*x_hat + t_n*(sqrt(1 - s_i)*z_hat + sqrt(s_i)*eps)``; when
  ``s_i == 0`` and no extrapolation is applied on that step, the exact Euler
  form ``x <- x - (t_c - t_n)*F`` is used;
* order 2: ``n = ceil(S/2)``; on every interval but the last the first-order
  update gives ``x_pred``, then ``F_n = model(x_pred, t_n, tt_n)`` and
  ``x <- x_c - (F_c + F_n)*(0.5*(t_c - t_n))``; the last interval is first order;
* trajectory = ``[noise, x_hat_0, ..., x_hat_{n-1}]`` (each x_hat before
  extrapolation); the final sample is its last element.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Sequence, Tuple

import torch

STYLES = ("few", "mul", "any")


def reference_n(sampling_steps: int, sampling_order: int) -> int:
    """Number of intervals n: ceil(S/2) for order 2, S otherwise."""
    s = int(sampling_steps)
    return (s + 1) // 2 if int(sampling_order) == 2 else s


def reference_nfe(sampling_steps: int, sampling_order: int) -> int:
    n = reference_n(sampling_steps, sampling_order)
    return 2 * n - 1 if int(sampling_order) == 2 else n


def reference_timesteps(
    sampling_steps: int,
    sampling_order: int = 1,
    time_dist_ctrl: Sequence[float] = (1.0, 1.0, 1.0),
    rfba_gap_steps: Sequence[float] = (0.0, 0.0),
) -> torch.Tensor:
    """The descending float64 time grid of docs/algorithm.md §2 (n + 1 values, last is 0)."""
    n = reference_n(sampling_steps, sampling_order)
    a, b, c = (float(v) for v in time_dist_ctrl)
    g0, g1 = (float(v) for v in rfba_gap_steps)
    if g1 == 0:
        u = torch.linspace(g0, 1.0, n + 1, dtype=torch.float64)[:-1]
    else:
        u = torch.linspace(g0, 1.0 - g1, n, dtype=torch.float64)
    u = (1 - (1 - u**a) ** b) ** c  # Kumaraswamy warp
    return torch.cat([1 - u, torch.zeros(1, dtype=torch.float64)])


def style_tt(style: str, t_at: float, t_target: float) -> float:
    """Target time by the style rule: few -> 0, mul -> t (current), any -> t_target."""
    if style == "few":
        return 0.0
    if style == "mul":
        return t_at
    if style == "any":
        return t_target
    raise ValueError(f"unknown sampling_style {style!r}")


def sde_ratio(t_c: float, t_n: float) -> float:
    if t_n == 0:
        return 1.0
    return min(1.0, 2.0 * t_c * abs(t_c - t_n) / (t_n * t_n))


def step_ratio(stochast_ratio: Any, t_c: float, t_n: float) -> float:
    if isinstance(stochast_ratio, str):
        assert stochast_ratio == "SDE"
        return sde_ratio(t_c, t_n)
    return float(stochast_ratio)


def reference_sample(
    model: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    *,
    sampling_steps: int = 20,
    stochast_ratio: Any = 0.0,
    extrapol_ratio: float = 0.0,
    sampling_order: int = 1,
    time_dist_ctrl: Sequence[float] = (1.0, 1.0, 1.0),
    rfba_gap_steps: Sequence[float] = (0.0, 0.0),
    sampling_style: str = "few",
    generator: torch.Generator | None = None,
    **model_kwargs: Any,
) -> Tuple[torch.Tensor, List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Run UCGM-S. Returns (trajectory [n+1, *noise.shape], calls) with calls = [(x, t, tt), ...]."""
    ts = reference_timesteps(sampling_steps, sampling_order, time_dist_ctrl, rfba_gap_steps)
    n = ts.numel() - 1
    order = int(sampling_order)
    r = float(extrapol_ratio)
    B = noise.shape[0]
    dtype, device = noise.dtype, noise.device

    def tvec(v: float) -> torch.Tensor:
        # float64 grid value, cast per call to the model dtype/device, shape [B]
        return torch.full((B,), v, dtype=torch.float64).to(dtype=dtype, device=device)

    calls: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def call(x: torch.Tensor, t: float, tt: float) -> torch.Tensor:
        tv, ttv = tvec(t), tvec(tt)
        calls.append((x.detach().clone(), tv.clone(), ttv.clone()))
        out = model(x, t=tv, tt=ttv, **model_kwargs)
        return out.detach()

    x = noise.detach().clone()
    traj = [noise.detach().clone()]
    xh_prev = zh_prev = None
    for i in range(n):
        t_c = float(ts[i])
        t_n = float(ts[i + 1])
        last = i == n - 1

        F_c = call(x, t_c, style_tt(sampling_style, t_c, t_n))
        xh = x - t_c * F_c
        zh = x + (1 - t_c) * F_c
        traj.append(xh.clone())

        extrap = r > 0 and i >= 2
        if extrap:
            xh_e = xh + r * (xh - xh_prev)
            zh_e = zh + r * (zh - zh_prev)
        else:
            xh_e, zh_e = xh, zh
        xh_prev, zh_prev = xh, zh

        s_i = step_ratio(stochast_ratio, t_c, t_n)
        if s_i > 0:
            eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x_new = (1 - t_n) * xh_e + t_n * (math.sqrt(1 - s_i) * zh_e + math.sqrt(s_i) * eps)
        elif extrap:
            x_new = (1 - t_n) * xh_e + t_n * zh_e
        else:
            x_new = x - (t_c - t_n) * F_c

        if order == 2 and not last:
            # corrector: tt_n by the style rule at t_n (few -> 0, mul -> t_n, any -> t_n)
            F_n = call(x_new, t_n, style_tt(sampling_style, t_n, t_n))
            x_new = x - (F_c + F_n) * (0.5 * (t_c - t_n))
        x = x_new

    return torch.stack(traj), calls
