"""Independent plain-PyTorch transcription of docs/algorithm.md §3 (the TwinFlow training step)
with the conventions of docs/training.md (call order and rows, random-draw order, dtypes, EMA).

This module deliberately does NOT import twinflow: it is the oracle that
tests/training/test_losses.py and bench/train_step.py compare ``twinflow.TwinFlowLoss`` against.

Conventions transcribed (docs/algorithm.md §3 + docs/training.md):

* Sub-batches (docs/algorithm.md §3.1): contiguous runs e2e, mul, any, adv; every active run
  (weight > 0) gets one row, the remaining ``B - A`` rows are shared by the largest
  remainder method on the quotas ``(B - A)·w_k/Σw`` (floor, then the leftover rows to
  the largest fractional parts, ties to the earlier run).  An inactive run is the empty
  range at the cursor (``start == stop``).  ``B < A`` is a ValueError.
* Random draws, all from ``generator`` (global RNG when None) on x's device, in order:
  ``t = rand(B)`` (then clamp to [0, 1], times ``time_dist_ctrl[2]``), ``U = rand(B)``,
  ``U' = rand(B)``, ``z' = randn(rows of call 1, ...)`` (only when call 1 happens),
  ``z = randn(x.shape)``, ``τ = rand(B_e2e)`` and ``randn(B_e2e, ...)`` (only when the
  distribution-matching term runs).  Times in float32 (float64 for float64 x), noises in
  x's dtype.  Only ``time_dist_ctrl[:2] == (1, 1)`` is transcribed (uniform t); the Beta
  branch raises NotImplementedError.
* Calls, in order (docs/training.md table):
  1. one-step fakes ``x̂ = z' − model(z', 1, 0)`` on the adv rows (all rows with
     ``use_image_free``), online, no grad — ONE call (docs/training.md; the published code
     makes a second call for the adv rows when use_image_free is on);
  2. ``F = model(x_t, t, tt, cond)``, online, all rows, with grad;
  3, 4. ``v_c = T(x_t, t, t, cond)``, ``v_u = T(x_t, t, t, uncond)`` on mul ∪ any rows (and e2e when lo < 1 < hi),
     when ``enhanced_ratio != 0``, ``uncond`` is given and those rows are non-empty;
  5 … 4+N. RCGM steps on the prefix rows (everything before the adv run), teacher
     (online model when emd = 1), when N ≥ 1, cor ≠ 0 and e2e ∪ any is non-empty;
  +2. ``model(x_τ, −τ, −τ)``, ``model(x_τ, τ, τ)`` on the e2e rows, online, no grad, when
     cor = 1, dmc ≠ 0 and e2e is non-empty.
* Targets, weights and per-row losses in float32 (float64 for float64 x); model outputs are
  cast up first.
* EMA (docs/training.md): ``ema ← d·ema + (1 − d)·θ`` for every parameter, buffers copied,
  then ``d ← d + (1 − d)(emd − d)/2`` starting from d = 0.  ``ReferenceEMA`` implements it;
  ``reference_loss`` itself takes the teacher module as an argument (the caller updates it
  before the step, which is numerically the same as updating it inside the step since θ
  does not change during a step).

Readings where docs/algorithm.md and the docs are silent (also stated in the test report):

* ``stats["dist_match"]`` is the added term, i.e. ``dmc·mean(L(F_e2e, sg(F_e2e − Δv)))``,
  and ``stats["loss"] = stats["base"] + stats["dist_match"]``; ``stats["dist_match_raw"]``
  holds the mean without the factor.
* The enhanced-target row mask is ``lo < t < hi`` over the non-adv rows; calls 3/4 cover
  mul ∪ any, and the e2e rows too when lo < 1 < hi (docs/algorithm.md §3.3 row rule).
* ``x' = x_t − 0.01·target`` and ``R = F·cl − P·cr − target`` use the target *after* the
  enhancement of §3.3 (the documented order, as published).
* When N = 0 and there are no mul ∪ adv rows the base loss is 0 (as published).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

RUNS = ("e2e", "mul", "any", "adv")

DEFAULTS: Dict[str, Any] = dict(
    consistc_ratio=1.0,
    ema_decay_rate=0.99,
    enhanced_ratio=0.5,
    enhanced_range=(0.0, 1.0),
    time_dist_ctrl=(1.0, 1.0, 1.0),
    estimate_order=2,
    loss="barron",
    barron_alpha=1.0,
    barron_c=1e-3,
    dist_match_cof=0.5,
    use_image_free=False,
    sub_batches={"e2e": 1.0, "mul": 1.0, "any": 1.0, "adv": 1.0},
)

# docs/algorithm.md §3.7.  "RCGM only ... no §3.6" is transcribed as dist_match_cof = 0 (docs: the
# distribution-matching calls run only when dmc != 0).
RECIPES: Dict[str, Dict[str, Any]] = {
    "twinflow": dict(sub_batches={"e2e": 1.0, "mul": 1.0, "any": 1.0, "adv": 1.0}),
    "rcgm": dict(sub_batches={"e2e": 1.0, "mul": 1.0, "any": 1.0, "adv": 0.0}, dist_match_cof=0.0),
    "flow_matching": dict(
        sub_batches={"e2e": 0.0, "mul": 1.0, "any": 0.0, "adv": 0.0},
        consistc_ratio=0.0,
        enhanced_ratio=0.0,
        estimate_order=0,
    ),
}


def resolve_hyper(recipe: Optional[str] = "twinflow", **overrides) -> Dict[str, Any]:
    """Defaults, then the recipe's settings, then keyword overrides (all keys of DEFAULTS)."""
    h = copy.deepcopy(DEFAULTS)
    if recipe is not None:
        if recipe not in RECIPES:
            raise ValueError(f"recipe: unknown recipe {recipe!r}")
        h.update(copy.deepcopy(RECIPES[recipe]))
    for k, v in overrides.items():
        if k not in DEFAULTS:
            raise TypeError(f"unknown hyper-parameter {k!r}")
        if k == "sub_batches":
            sb = dict(h["sub_batches"])
            sb.update(v)
            v = sb
        h[k] = v
    return h


# ----------------------------------------------------------------------------- pure functions

def reference_split(B: int, weights: Dict[str, float]) -> Dict[str, Tuple[int, int]]:
    """docs/algorithm.md §3.1 largest-remainder split of B rows into the runs e2e, mul, any, adv."""
    w = [float(weights.get(k, 0.0)) for k in RUNS]
    active = [i for i, v in enumerate(w) if v > 0]
    a = len(active)
    if B < a:
        raise ValueError(f"batch size {B} is smaller than the minimum batch size {a}")
    rows = [1 if i in active else 0 for i in range(4)]
    rem = B - a
    total = sum(w[i] for i in active)
    if a > 0 and rem > 0:
        quotas = {i: rem * w[i] / total for i in active}
        floors = {i: int(math.floor(q)) for i, q in quotas.items()}
        left = rem - sum(floors.values())
        for i in active:
            rows[i] += floors[i]
        order = sorted(active, key=lambda i: (-(quotas[i] - floors[i]), i))
        for i in order[:left]:
            rows[i] += 1
    out, cur = {}, 0
    for k, n in zip(RUNS, rows):
        out[k] = (cur, cur + n)
        cur += n
    return out


def reference_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row mean((pred − target)²) → [B]."""
    d = pred - target
    return (d * d).reshape(d.shape[0], -1).mean(dim=1)


def reference_barron(pred: torch.Tensor, target: torch.Tensor, alpha: float = 1.0,
                     c: float = 1e-3) -> torch.Tensor:
    """docs/algorithm.md §3.5 Barron reweighting, per row → [B]; the weight is stop-gradient."""
    m = reference_l2(pred, target)
    if float(alpha) == 2.0:
        return m / c
    weight = ((m.detach() / (c * c + 1e-8)) / abs(alpha - 2.0) + 1.0).pow((alpha - 2.0) / 2.0)
    return m * weight / c


def reference_time_weight(t: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
    """w = tan((1 − (|t| − |tt|))·π/2.5) + 1 (adv rows are the caller's business)."""
    return torch.tan((1.0 - (t.abs() - tt.abs())) * (math.pi / 2.5)) + 1.0


def _per_row_loss(h: Dict[str, Any], pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if h["loss"] == "l2":
        return reference_l2(pred, target)
    if h["loss"] == "barron":
        return reference_barron(pred, target, h["barron_alpha"], h["barron_c"])
    raise ValueError(f"loss: unknown loss {h['loss']!r}")


# ----------------------------------------------------------------------------- EMA

class ReferenceEMA:
    """The teacher of docs/training.md: EMA copy (0 < emd < 1), model (emd = 0), frozen copy (emd = 1)."""

    def __init__(self, ema_decay_rate: float):
        self.emd = float(ema_decay_rate)
        self.d = 0.0
        self.module: Optional[torch.nn.Module] = None

    def teacher(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.emd == 0.0:
            return model
        if self.module is None:
            self.module = copy.deepcopy(model)
            for p in self.module.parameters():
                p.requires_grad_(False)
        return self.module

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> Optional[float]:
        """One step's update; returns the d used (None when there is no internal EMA)."""
        teacher = self.teacher(model)
        if not (0.0 < self.emd < 1.0):
            return None
        d = self.d
        for pe, p in zip(teacher.parameters(), model.parameters()):
            pe.copy_(d * pe + (1.0 - d) * p)
        for be, b in zip(teacher.buffers(), model.buffers()):
            be.copy_(b)
        self.d = d + (1.0 - d) * (self.emd - d) / 2.0
        return d


# ----------------------------------------------------------------------------- the step

def _rows(lst: Optional[Sequence[torch.Tensor]], sl: slice):
    if lst is None:
        return None
    return [c[sl] for c in lst]


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[n] → [n, 1, 1, ...] in like's dtype."""
    return v.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def reference_loss(model, teacher, x: torch.Tensor, cond=None, uncond=None, generator=None,
                   **hyper):
    """One TwinFlow training step (docs/algorithm.md §3) → (loss, calls, stats).

    ``teacher`` is the module T of docs/training.md (for the internal EMA the caller passes
    the already-updated EMA copy; ``None`` means the online model).  ``hyper``: ``recipe=``
    and/or any key of DEFAULTS.  ``calls``: one dict per model call, in order, with
    ``net`` ("online" when the module called is ``model``, else "teacher"), ``rows`` (tuple
    of batch indices), ``t``, ``tt`` (the tensors handed over), ``grad`` (grad mode).
    """
    recipe = hyper.pop("recipe", "twinflow")
    h = resolve_hyper(recipe, **hyper)
    if teacher is None:
        teacher = model
    emd = float(h["ema_decay_rate"])
    cor = float(h["consistc_ratio"])
    enr = float(h["enhanced_ratio"])
    lo, hi = (float(v) for v in h["enhanced_range"])
    b1, b2, scale = (float(v) for v in h["time_dist_ctrl"])
    N = int(h["estimate_order"])
    dmc = float(h["dist_match_cof"])
    uif = bool(h["use_image_free"])
    if N < 0:
        raise ValueError("estimate_order: must be >= 0")

    B = x.shape[0]
    dev, xdt = x.device, x.dtype
    cdt = torch.float64 if xdt == torch.float64 else torch.float32
    split = reference_split(B, h["sub_batches"])
    S = {k: slice(*split[k]) for k in RUNS}
    n_run = {k: split[k][1] - split[k][0] for k in RUNS}
    calls: List[Dict[str, Any]] = []

    def call(net, xin, t, tt, c, rows: range):
        calls.append(dict(net="online" if net is model else "teacher", rows=tuple(rows),
                          t=t.detach().clone(), tt=tt.detach().clone(),
                          grad=torch.is_grad_enabled()))
        out = net(xin, t=t, tt=tt, c=c)
        return out

    # ---- §3.1 inputs (no grad)
    with torch.no_grad():
        if (b1, b2) != (1.0, 1.0):
            raise NotImplementedError("only time_dist_ctrl[:2] == (1, 1) is transcribed")
        t = torch.rand(B, generator=generator, dtype=cdt, device=dev).clamp(0.0, 1.0) * scale
        U = torch.rand(B, generator=generator, dtype=cdt, device=dev)
        U2 = torch.rand(B, generator=generator, dtype=cdt, device=dev)
        tt = t - U * cor * t
        t_min = t - U2 * t * min(0.05, cor)
        t[S["e2e"]] = 1.0
        tt[S["e2e"]] = 0.0
        tt[S["mul"]] = t_min[S["mul"]]

        x = x.detach().clone()
        fake_rows = range(B) if uif else range(*split["adv"])
        if uif or n_run["adv"] > 0:
            fs = slice(fake_rows.start, fake_rows.stop)
            zp = torch.randn(len(fake_rows), *x.shape[1:], generator=generator, dtype=xdt, device=dev)
            ones = torch.ones(len(fake_rows), dtype=xdt, device=dev)
            zeros = torch.zeros(len(fake_rows), dtype=xdt, device=dev)
            F1 = call(model, zp, ones, zeros, _rows(cond, fs), fake_rows)
            x[fs] = (zp.to(cdt) - F1.to(cdt)).to(xdt)
        # adv rows: tt = −t now, t = −t after x_t is built
        tt[S["adv"]] = -t[S["adv"]]

        z = torch.randn(x.shape, generator=generator, dtype=xdt, device=dev)
        ta = t.abs()
        x_t = _bc(ta, x) * z + (1.0 - _bc(ta, x)) * x
        target = (z.to(cdt) - x.to(cdt))
        t[S["adv"]] = -t[S["adv"]]

    # ---- §3.2 prediction (the pass with gradient)
    F = call(model, x_t, t.to(xdt), tt.to(xdt), cond, range(B))
    if F.shape != x_t.shape:
        raise ValueError(f"model output shape {tuple(F.shape)} != {tuple(x_t.shape)}")
    Fc = F.to(cdt)

    with torch.no_grad():
        # ---- §3.3 enhanced target
        # e2e rows sit at t = 1: inside (lo, hi) only when lo < 1 < hi
        ma = slice(split["e2e"][0] if lo < 1.0 < hi else split["mul"][0], split["any"][1])
        if enr != 0.0 and N >= 0 and uncond is not None and ma.stop > ma.start:
            xr, tr = x_t[ma], t[ma].to(xdt)
            r = range(ma.start, ma.stop)
            v_c = call(teacher, xr, tr, tr, _rows(cond, ma), r).to(cdt)
            v_u = call(teacher, xr, tr, tr, _rows(uncond, ma), r).to(cdt)
            tm = t[ma]
            mask = ((tm > lo) & (tm < hi)).reshape(-1, *([1] * (x.dim() - 1)))
            tgt = target[ma]
            if emd == 1.0 and uif:
                new = v_u + enr * (v_c - v_u)
            else:
                new = tgt + enr * (v_c - v_u)
            target[ma] = torch.where(mask, new, tgt)

        # ---- §3.4 RCGM target
        if N >= 1 and cor != 0.0 and (n_run["e2e"] + n_run["any"]) > 0:
            net = model if emd == 1.0 else teacher
            p = slice(0, split["adv"][0])
            pr = range(0, split["adv"][0])
            tp, ttp = t[p], tt[p]
            t_m = torch.maximum(tp - 0.01, ttp)
            xp = x_t[p].to(cdt) - 0.01 * target[p]
            grid = [t_m * (1.0 - k / N) + ttp * (k / N) for k in range(N + 1)]
            P = torch.zeros_like(xp)
            cp = _rows(cond, p)
            for k in range(N):
                s_c, s_n = grid[k], grid[k + 1]
                Fk = call(net, xp.to(xdt), s_c.to(xdt), s_n.to(xdt), cp, pr).to(cdt)
                sa = _bc(s_c.abs(), xp)
                xh = xp - sa * Fk
                zh = xp + (1.0 - sa) * Fk
                sn = _bc(s_n, xp)
                xp = sn * zh + (1.0 - sn) * xh
                P = P + Fk * _bc(s_c - s_n, xp)
            near = tp < ttp + 0.01
            dt = tp - ttp
            inv = torch.where(dt == 0, torch.zeros_like(dt), 1.0 / torch.where(dt == 0, torch.ones_like(dt), dt))
            cl = torch.where(near, torch.ones_like(dt), 100.0 * dt)
            cr = torch.where(near, inv, torch.full_like(dt, 100.0))
            Fd = Fc[p].detach()
            R = Fd * _bc(cl, xp) - P * _bc(cr, xp) - target[p]
            target[p] = Fd - R.clamp(-1.0, 1.0)

        # ---- §3.5 weights
        w = reference_time_weight(t, tt)
        w[S["adv"]] = 1.0

    L = _per_row_loss(h, Fc, target)
    Lw = L * w
    if N >= 1:
        base = Lw.mean()
    else:
        sel = torch.cat([Lw[S["mul"]], Lw[S["adv"]]])
        base = sel.mean() if sel.numel() > 0 else Lw.sum() * 0.0
    loss = base

    # ---- §3.6 distribution matching
    dm_raw = None
    if cor == 1.0 and dmc != 0.0 and n_run["e2e"] > 0:
        e = S["e2e"]
        er = range(*split["e2e"])
        with torch.no_grad():
            te = t[e]
            x_e = (x_t[e].to(cdt) - _bc(te.abs(), Fc) * Fc[e].detach())
            tau = torch.rand(n_run["e2e"], generator=generator, dtype=cdt, device=dev)
            zz = torch.randn(n_run["e2e"], *x.shape[1:], generator=generator, dtype=xdt, device=dev)
            x_tau = (_bc(tau, zz) * zz + (1.0 - _bc(tau, zz)) * x_e.to(xdt))
            ce = _rows(cond, e)
            fake_v = call(model, x_tau, (-tau).to(xdt), (-tau).to(xdt), ce, er)
            real_v = call(model, x_tau, tau.to(xdt), tau.to(xdt), ce, er)
            # docs/algorithm.md: "fp32"; docs/training.md: float64 for float64 input -> computed in cdt
            dv = (fake_v.to(cdt) - real_v.to(cdt)).clamp(-1.0, 1.0)
        F_e = Fc[e]
        dm_raw = _per_row_loss(h, F_e, (F_e - dv).detach()).mean()
        loss = loss + dmc * dm_raw

    def run_mean(k):
        v = Lw[S[k]].detach()
        return float(v.mean()) if v.numel() > 0 else float("nan")

    stats = {
        "loss": float(loss.detach()),
        "base": float(base.detach()),
        "dist_match": float(dmc * dm_raw.detach()) if dm_raw is not None else 0.0,
        "dist_match_raw": float(dm_raw.detach()) if dm_raw is not None else 0.0,
        "e2e": run_mean("e2e"),
        "mul": run_mean("mul"),
        "any": run_mean("any"),
        "adv": run_mean("adv"),
        "model_calls": len(calls),
        "split": split,
        "t": t.clone(),
        "tt": tt.clone(),
    }
    return loss, calls, stats


# ----------------------------------------------------------------------------- stateful wrapper

class ReferenceTwinFlowLoss:
    """Mirror of ``twinflow.TwinFlowLoss`` on top of ``reference_loss`` and ``ReferenceEMA``."""

    def __init__(self, recipe: Optional[str] = "twinflow", **overrides):
        self.recipe = recipe
        self.hyper = resolve_hyper(recipe, **overrides)
        self.ema = ReferenceEMA(self.hyper["ema_decay_rate"])
        self.last_stats: Dict[str, Any] = {}
        self.last_calls: List[Dict[str, Any]] = []

    @property
    def teacher(self):
        return self.ema.module

    def __call__(self, model, x, cond=None, uncond=None, teacher=None, generator=None):
        d = None
        if teacher is None:
            d = self.ema.update(model)
            teacher = self.ema.teacher(model)
        loss, calls, stats = reference_loss(model, teacher, x, cond, uncond, generator,
                                            recipe=None, **self.hyper)
        stats["ema_decay"] = d
        self.last_stats, self.last_calls = stats, calls
        return loss

    def state_dict(self):
        return {"d": self.ema.d,
                "teacher": None if self.ema.module is None else copy.deepcopy(self.ema.module.state_dict())}

    def load_state_dict(self, sd, model=None):
        self.ema.d = sd["d"]
        if sd["teacher"] is not None:
            if self.ema.module is None:
                assert model is not None, "need the model to build the teacher"
                self.ema.teacher(model)
            self.ema.module.load_state_dict(sd["teacher"])
