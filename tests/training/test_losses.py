"""twinflow.TwinFlowLoss and twinflow.losses against the plain-PyTorch transcription of docs/algorithm.md §3.

The oracle is ``tests/twinflow_reference.py`` (it does not import twinflow); it follows
docs/algorithm.md §3 and docs/training.md (call order and rows, random-draw order, dtypes, EMA).

The small model ``TinyNet`` logs every call it receives into the module-level ``CALLS``
list: which module was called (the online model, or any other module such as the
internal teacher copy or a ``teacher=`` argument), the batch rows (read from a row-index
tensor carried as the second ``cond`` element, which every call slices like the others),
t, tt, and whether grad mode was on.  The reference logs the same things itself, so the
two call sequences can be compared one to one.
"""

from __future__ import annotations

import copy
import io
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch


from twinflow_reference import (  # noqa: E402
    RUNS,
    ReferenceEMA,
    ReferenceTwinFlowLoss,
    reference_barron,
    reference_l2,
    reference_split,
    reference_time_weight,
)

from twinflow import TwinFlowLoss  # noqa: E402
from twinflow.losses import barron_loss, l2_loss, split_sub_batches, time_weight  # noqa: E402

NAN, INF = float("nan"), float("inf")

# loss/gradient tolerances (brief: float32 rtol 1e-5, float64 rtol 1e-10)
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
}
# time values handed to the model (a few ulp: the Rust side may associate differently)
T_TOL = {
    torch.float32: dict(rtol=0.0, atol=1e-6),
    torch.float64: dict(rtol=0.0, atol=1e-13),
}

# ----------------------------------------------------------------------------- test model

CALLS: list = []
N_CLASSES = 4
NULL = N_CLASSES  # the "unconditional" label
SHAPE = (2, 3, 3)


def _feat(v: torch.Tensor) -> torch.Tensor:
    return torch.stack([v, torch.sin(3.0 * v), torch.cos(2.0 * v)], dim=1)


class TinyNet(torch.nn.Module):
    """Velocity depends on x, t, tt and the label c[0]; c[1] (row ids) is only logged."""

    def __init__(self, shape=SHAPE, hidden=16, n_classes=N_CLASSES):
        super().__init__()
        d = int(math.prod(shape))
        self.inp = torch.nn.Linear(d, hidden)
        self.t_emb = torch.nn.Linear(3, hidden)
        self.tt_emb = torch.nn.Linear(3, hidden)
        self.label = torch.nn.Embedding(n_classes + 1, hidden)
        self.out = torch.nn.Linear(hidden, d)
        self.register_buffer("calls_seen", torch.zeros(()))  # a buffer, for the EMA copy

    def forward(self, x, t, tt, c=None):
        rows = None
        if c is not None and len(c) > 1:
            rows = tuple(int(r) for r in c[1].tolist())
        CALLS.append(dict(module=self, rows=rows, n=int(x.shape[0]), t=t.detach().clone(),
                          tt=tt.detach().clone(), grad=torch.is_grad_enabled(),
                          x_dtype=x.dtype))
        h = self.inp(x.flatten(1)) + self.t_emb(_feat(t)) + self.tt_emb(_feat(tt))
        if c is not None:
            h = h + self.label(c[0])
        return self.out(torch.tanh(h)).reshape(x.shape)


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return TinyNet().to(dtype)


def make_data(B, dtype=torch.float32, seed=1, cond=True, uncond=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *SHAPE, generator=g, dtype=dtype)
    rows = torch.arange(B)
    c = [torch.randint(0, N_CLASSES, (B,), generator=g), rows] if cond else None
    u = [torch.full((B,), NULL, dtype=torch.long), rows] if (cond and uncond) else None
    return x, c, u


def gen(seed):
    return torch.Generator().manual_seed(seed)


def api_calls(model):
    out = []
    for c in CALLS:
        d = dict(c)
        d["net"] = "online" if c["module"] is model else "teacher"
        out.append(d)
    return out


from checks import _is_panic, expect_error  # noqa: E402


def assert_close_grads(ga, gr, dtype, what=""):
    tol = TOL[dtype]
    assert len(ga) == len(gr)
    for i, (a, r) in enumerate(zip(ga, gr)):
        assert (a is None) == (r is None), f"{what} grad {i}: None-ness differs"
        if a is None:
            continue
        scale = float(r.abs().max()) if r.numel() else 0.0
        torch.testing.assert_close(a, r, rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * scale,
                                   msg=lambda m: f"{what} grad of parameter {i}: {m}")


def batched_like(api, ref):
    """The reference's (unbatched) calls joined as the API batched them: each API call covers
    one or more consecutive reference calls on the same net, without gradient when more than
    one, whose rows add up to its batch — batching joins independent calls, never reorders."""
    out, j = [], 0
    for a in api:
        group, n = [], 0
        while j < len(ref) and n < a["n"]:
            group.append(ref[j])
            n += len(ref[j]["rows"])
            j += 1
        if len(group) > 1:
            assert all(r["net"] == group[0]["net"] and not r["grad"] for r in group), group
        out.append(dict(net=group[0]["net"] if group else None, grad=group[0]["grad"] if group else None,
                        rows=sum((tuple(r["rows"]) for r in group), ()),
                        t=torch.cat([r["t"] for r in group]) if group else None,
                        tt=torch.cat([r["tt"] for r in group]) if group else None))
    return out + ref[j:]


def compare_calls(api, ref, dtype, has_rows=True, what=""):
    ref = batched_like(api, ref)
    sig_a = [(c["net"], c["n"], c["grad"]) for c in api]
    sig_r = [(c["net"], len(c["rows"]), c["grad"]) for c in ref]
    assert sig_a == sig_r, f"{what}: call sequence (net, rows, grad) differs\n api={sig_a}\n ref={sig_r}"
    for i, (a, r) in enumerate(zip(api, ref)):
        if has_rows:
            assert a["rows"] == r["rows"], f"{what}: call {i} rows {a['rows']} != {r['rows']}"
        assert a["t"].dtype == dtype and a["tt"].dtype == dtype, f"{what}: call {i} t/tt dtype"
        assert a["x_dtype"] == dtype, f"{what}: call {i} x dtype"
        assert tuple(a["t"].shape) == (a["n"],) and tuple(a["tt"].shape) == (a["n"],)
        torch.testing.assert_close(a["t"], r["t"].to(dtype), **T_TOL[dtype],
                                   msg=lambda m: f"{what}: call {i} t: {m}")
        torch.testing.assert_close(a["tt"], r["tt"].to(dtype), **T_TOL[dtype],
                                   msg=lambda m: f"{what}: call {i} tt: {m}")


def stat_close(a, r, dtype, what):
    if math.isnan(r):
        assert math.isnan(a), f"{what}: expected nan, got {a}"
    else:
        tol = TOL[dtype]
        assert abs(a - r) <= tol["atol"] + tol["rtol"] * abs(r), f"{what}: {a} != {r}"


def run_both(hyper, *, dtype=torch.float32, B=8, seed=11, cond=True, uncond=True,
             check_rows=True, what=""):
    """One step with TwinFlowLoss and with the reference on the same model/data/seed; compare all."""
    model = make_model(dtype)
    x, c, u = make_data(B, dtype, cond=cond, uncond=uncond)
    params = list(model.parameters())

    api = TwinFlowLoss(**hyper)
    CALLS.clear()
    loss = api(model, x, cond=c, uncond=u, generator=gen(seed))
    calls_a = api_calls(model)
    ga = torch.autograd.grad(loss, params, allow_unused=True)
    stats = dict(api.last_stats)

    ref = ReferenceTwinFlowLoss(**hyper)
    CALLS.clear()
    rloss = ref(model, x, cond=c, uncond=u, generator=gen(seed))
    calls_r = ref.last_calls
    # the reference's own log matches what the model saw
    logged = api_calls(model)
    assert [(c_["net"], c_["n"]) for c_ in logged] == [(c_["net"], len(c_["rows"])) for c_ in calls_r]
    gr = torch.autograd.grad(rloss, params, allow_unused=True)

    assert loss.dim() == 0 and loss.dtype == dtype and loss.requires_grad
    torch.testing.assert_close(loss.detach(), rloss.detach(), **TOL[dtype],
                               msg=lambda m: f"{what}: loss {m}")
    assert_close_grads(ga, gr, dtype, what)
    compare_calls(calls_a, calls_r, dtype, has_rows=check_rows and cond, what=what)

    rs = ref.last_stats
    assert set(stats) >= {"loss", "base", "dist_match", "e2e", "mul", "any", "adv", "model_calls",
                          "ema_decay"}, sorted(stats)
    assert stats["model_calls"] == len(calls_a) == len(batched_like(calls_a, calls_r)) <= rs["model_calls"]
    stat_close(float(stats["loss"]), float(loss.detach()), dtype, f"{what}: last_stats['loss']")
    stat_close(float(stats["base"]), rs["base"], dtype, f"{what}: last_stats['base']")
    for k in RUNS:
        stat_close(float(stats[k]), rs[k], dtype, f"{what}: last_stats[{k!r}]")
    # reading: dist_match is the added term (dmc·mean L) — accept the raw mean as well
    dm = float(stats["dist_match"])
    tol = TOL[dtype]
    ok = any(abs(dm - v) <= tol["atol"] + tol["rtol"] * abs(v)
             for v in (rs["dist_match"], rs["dist_match_raw"]))
    assert ok, f"{what}: last_stats['dist_match'] = {dm}, reference {rs['dist_match']} (raw {rs['dist_match_raw']})"
    return dict(api=api, ref=ref, loss=loss, rloss=rloss, calls=calls_a, stats=stats, model=model, grads=ga)


# ============================================================================= pure functions

def _rand_pair(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(*shape, generator=g, dtype=dtype)
    t = torch.randn(*shape, generator=g, dtype=dtype)
    return p, t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 7), (4, 2, 3, 3), (3, 1)])
def test_l2_loss(dtype, shape):
    p, t = _rand_pair(shape, dtype, 0)
    p.requires_grad_(True)
    out = l2_loss(p, t)
    ref = reference_l2(p, t)
    assert out.shape == (shape[0],)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    g1, = torch.autograd.grad(out.sum(), p)
    g2, = torch.autograd.grad(ref.sum(), p)
    torch.testing.assert_close(g1, g2, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha,c", [(1.0, 1e-3), (2.0, 1e-3), (0.0, 1e-3), (-2.0, 0.05),
                                     (0.5, 0.1), (3.0, 1e-2), (1.0, 1.0), (2.0, 0.5)])
def test_barron_loss(dtype, alpha, c):
    p, t = _rand_pair((6, 2, 3, 3), dtype, 1)
    t[0] = p[0]  # one row with zero error
    t[1] = p[1] + 1e-4  # one tiny error
    p.requires_grad_(True)
    out = barron_loss(p, t, alpha=alpha, c=c)
    ref = reference_barron(p, t, alpha, c)
    assert out.shape == (6,)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    g1, = torch.autograd.grad(out.sum(), p)
    g2, = torch.autograd.grad(ref.sum(), p)
    torch.testing.assert_close(g1, g2, rtol=TOL[dtype]["rtol"],
                               atol=TOL[dtype]["atol"] + TOL[dtype]["rtol"] * float(g2.abs().max()))


def test_barron_alpha2_is_mse_over_c():
    p, t = _rand_pair((4, 5), torch.float64, 2)
    out = barron_loss(p, t, alpha=2.0, c=1e-3)
    torch.testing.assert_close(out, ((p - t) ** 2).mean(1) / 1e-3, rtol=1e-12, atol=0)


def test_barron_defaults_and_weight_is_stopgrad():
    """Defaults α = 1, c = 1e-3; the gradient is that of m·w/c with w held constant."""
    p, t = _rand_pair((3, 4), torch.float64, 3)
    p.requires_grad_(True)
    out = barron_loss(p, t)
    m = ((p - t) ** 2).mean(1)
    w = ((m.detach() / (1e-6 + 1e-8)) / 1.0 + 1.0) ** -0.5
    torch.testing.assert_close(out, m * w / 1e-3, rtol=1e-12, atol=0)
    g, = torch.autograd.grad(out.sum(), p)
    expect = 2 * (p - t).detach() / 4 * (w / 1e-3).unsqueeze(1)
    torch.testing.assert_close(g, expect, rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_time_weight(dtype):
    g = torch.Generator().manual_seed(4)
    t = torch.rand(64, generator=g, dtype=dtype)
    tt = t * torch.rand(64, generator=g, dtype=dtype)
    t = torch.cat([t, -t[:8], torch.tensor([1.0, 0.3, 0.0], dtype=dtype)])
    tt = torch.cat([tt, -t[:8], torch.tensor([0.0, 0.3, 0.0], dtype=dtype)])
    out = time_weight(t, tt)
    ref = reference_time_weight(t, tt)
    assert out.shape == t.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])
    # e2e (t = 1, tt = 0): w = 1; t = tt: w = tan(π/2.5) + 1
    assert abs(float(out[-3]) - 1.0) < 1e-6
    assert abs(float(out[-2]) - (math.tan(math.pi / 2.5) + 1)) < 1e-5


EQUAL = {"e2e": 1, "mul": 1, "any": 1, "adv": 1}


@pytest.mark.parametrize("B,expected", [(4, (1, 1, 1, 1)), (6, (2, 2, 1, 1)), (8, (2, 2, 2, 2)),
                                        (10, (3, 3, 2, 2)), (5, (2, 1, 1, 1)), (7, (2, 2, 2, 1)),
                                        (128, (32, 32, 32, 32))])
def test_split_equal_weights(B, expected):
    s = split_sub_batches(B, dict(EQUAL))
    assert list(s.keys()) == list(RUNS)
    assert tuple(b - a for a, b in (tuple(s[k]) for k in RUNS)) == expected
    assert {k: tuple(v) for k, v in s.items()} == reference_split(B, EQUAL)


WEIGHT_SETS = [
    EQUAL,
    {"e2e": 5, "mul": 1, "any": 1, "adv": 1},
    {"e2e": 3, "mul": 1, "any": 2, "adv": 0},
    {"e2e": 0, "mul": 1, "any": 0, "adv": 0},
    {"e2e": 1, "mul": 1, "any": 1, "adv": 0},
    {"e2e": 0, "mul": 1, "any": 1, "adv": 1},
    {"e2e": 1, "mul": 0, "any": 0, "adv": 0},
    {"e2e": 0, "mul": 0, "any": 0, "adv": 2.5},
    {"e2e": 0.5, "mul": 0.25, "any": 0.125, "adv": 0.125},
    {"e2e": 1, "mul": 100, "any": 1, "adv": 1},
    {"e2e": 2, "mul": 0, "any": 1, "adv": 1},
]


@pytest.mark.parametrize("weights", WEIGHT_SETS, ids=lambda w: "-".join(str(w[k]) for k in RUNS))
def test_split_matches_reference(weights):
    active = sum(1 for k in RUNS if weights[k] > 0)
    for B in range(active, 41):
        s = {k: tuple(v) for k, v in split_sub_batches(B, dict(weights)).items()}
        r = reference_split(B, weights)
        assert s == r, f"B={B}: {s} != {r}"
        # contiguous, in order, covering [0, B); inactive runs empty, active ones >= 1 row
        cur = 0
        for k in RUNS:
            a, b = s[k]
            assert a == cur and b >= a
            assert (b - a >= 1) if weights[k] > 0 else (a == b)
            cur = b
        assert cur == B


def test_split_skewed_examples():
    s = split_sub_batches(12, {"e2e": 5, "mul": 1, "any": 1, "adv": 1})
    assert [b - a for a, b in (s[k] for k in RUNS)] == [6, 2, 2, 2]
    s = split_sub_batches(10, {"e2e": 5, "mul": 1, "any": 1, "adv": 1})
    assert [b - a for a, b in (s[k] for k in RUNS)] == [5, 2, 2, 1]  # 3.75,.75,.75,.75: ties → earlier
    s = split_sub_batches(5, {"e2e": 0, "mul": 1, "any": 0, "adv": 0})
    assert {k: tuple(v) for k, v in s.items()} == {"e2e": (0, 0), "mul": (0, 5), "any": (5, 5), "adv": (5, 5)}


@pytest.mark.parametrize("B,weights,minimum", [(3, EQUAL, 4), (0, EQUAL, 4), (2, {"e2e": 1, "mul": 1, "any": 1, "adv": 0}, 3),
                                               (0, {"e2e": 0, "mul": 1, "any": 0, "adv": 0}, 1)])
def test_split_batch_too_small(B, weights, minimum):
    expect_error(ValueError, lambda: split_sub_batches(B, dict(weights)), contains=str(minimum))


def test_split_negative_or_nan_weight():
    expect_error(ValueError, lambda: split_sub_batches(8, {"e2e": 1, "mul": -1, "any": 1, "adv": 1}),
                 contains=(("mul", "weight", "sub_batches"),))
    expect_error(ValueError, lambda: split_sub_batches(8, {"e2e": 1, "mul": NAN, "any": 1, "adv": 1}),
                 contains=(("mul", "weight", "sub_batches"),))


# ============================================================================= the step vs reference

DT = [torch.float32, torch.float64]

CASES = {
    # name: (hyper, options)
    "twinflow": (dict(recipe="twinflow"), {}),
    "twinflow-no-uncond": (dict(recipe="twinflow"), dict(uncond=False)),
    "twinflow-no-cond": (dict(recipe="twinflow"), dict(cond=False)),
    "twinflow-B10": (dict(recipe="twinflow"), dict(B=10)),
    "twinflow-B6": (dict(recipe="twinflow"), dict(B=6)),
    "twinflow-B4": (dict(recipe="twinflow"), dict(B=4)),
    "rcgm": (dict(recipe="rcgm"), {}),
    "rcgm-B7": (dict(recipe="rcgm"), dict(B=7)),
    "flow_matching": (dict(recipe="flow_matching"), {}),
    "flow_matching-no-cond": (dict(recipe="flow_matching"), dict(cond=False)),
    "N0": (dict(estimate_order=0), {}),
    "N1": (dict(estimate_order=1), {}),
    "N2": (dict(estimate_order=2), {}),
    "N3": (dict(estimate_order=3), {}),
    "rcgm-N1": (dict(recipe="rcgm", estimate_order=1), {}),
    "l2": (dict(loss="l2"), {}),
    "barron-a2": (dict(loss="barron", barron_alpha=2.0), {}),
    "barron-a0.5-c0.1": (dict(barron_alpha=0.5, barron_c=0.1), {}),
    "enr0": (dict(enhanced_ratio=0.0), {}),
    "enr0.8": (dict(enhanced_ratio=0.8), {}),
    "enr0.8-range": (dict(enhanced_ratio=0.8, enhanced_range=(0.2, 0.7)), dict(B=12)),
    "cor0.5": (dict(consistc_ratio=0.5), {}),
    "cor1": (dict(consistc_ratio=1.0), {}),
    "cor0": (dict(consistc_ratio=0.0), {}),
    "uif": (dict(use_image_free=True), {}),
    "uif-emd1-enr4": (dict(use_image_free=True, ema_decay_rate=1.0, enhanced_ratio=4.0), {}),
    "uif-no-adv": (dict(use_image_free=True, sub_batches={"e2e": 1, "mul": 1, "any": 1, "adv": 0}), {}),
    "emd0": (dict(ema_decay_rate=0.0), {}),
    "emd0.99": (dict(ema_decay_rate=0.99), {}),
    "emd1": (dict(ema_decay_rate=1.0), {}),
    "emd1-enr4": (dict(ema_decay_rate=1.0, enhanced_ratio=4.0), {}),
    "dmc0.75": (dict(dist_match_cof=0.75), {}),
    "dmc0": (dict(dist_match_cof=0.0), {}),
    "skew-3120": (dict(sub_batches={"e2e": 3, "mul": 1, "any": 2, "adv": 0}), dict(B=9)),
    "skew-0111": (dict(sub_batches={"e2e": 0, "mul": 1, "any": 1, "adv": 1}), {}),
    "skew-5111": (dict(sub_batches={"e2e": 5, "mul": 1, "any": 1, "adv": 1}), dict(B=10)),
    "e2e-only": (dict(sub_batches={"e2e": 1, "mul": 0, "any": 0, "adv": 0}), dict(B=5)),
    "adv-only": (dict(sub_batches={"e2e": 0, "mul": 0, "any": 0, "adv": 1}), dict(B=5)),
    "any-only": (dict(sub_batches={"e2e": 0, "mul": 0, "any": 1, "adv": 0}), dict(B=5)),
    "mul-only-N0": (dict(sub_batches={"e2e": 0, "mul": 1, "any": 0, "adv": 0}, estimate_order=0), dict(B=5)),
    "scale0.8": (dict(time_dist_ctrl=(1.0, 1.0, 0.8)), {}),
    "l2-N0-enr0.8": (dict(loss="l2", estimate_order=0, enhanced_ratio=0.8), {}),
    "fm-keywords": (dict(recipe="flow_matching", loss="l2"), {}),
    # reading: hi > 1 still enhances only mul ∪ any rows (docs: calls 3/4 run on mul ∪ any;
    # docs/algorithm.md §3.3's row rule alone would also take the e2e rows, t = 1 < hi)
    "enr-range-beyond-1": (dict(enhanced_range=(0.0, 1.5)), {}),
    "uif-emd1-wide-range": (dict(use_image_free=True, ema_decay_rate=1.0, enhanced_range=(-0.5, 1.5)), {}),
    "scale2": (dict(time_dist_ctrl=(1.0, 1.0, 2.0)), {}),
}


@pytest.mark.parametrize("dtype", DT, ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CASES))
def test_step_matches_reference(name, dtype):
    hyper, opts = CASES[name]
    run_both(copy.deepcopy(hyper), dtype=dtype, what=name, **opts)


@pytest.mark.parametrize("recipe,calls,unbatched", [("twinflow", 6, 8), ("rcgm", 4, 5), ("flow_matching", 1, 1)])
def test_recipe_call_counts(recipe, calls, unbatched):
    """docs/training.md: TwinFlow N = 2 makes 6 calls (1 with grad; 8 without batching), RCGM
    4 (5), flow matching 1."""
    r = run_both(dict(recipe=recipe), what=recipe)
    assert r["stats"]["model_calls"] == calls
    assert r["ref"].last_stats["model_calls"] == unbatched
    assert sum(1 for c in r["calls"] if c["grad"]) == 1
    assert r["calls"][1 if recipe == "twinflow" else 0]["grad"]


@pytest.mark.parametrize("recipe", ["twinflow", "rcgm", "flow_matching"])
def test_grads_reach_every_parameter(recipe):
    model = make_model()
    x, c, u = make_data(8)
    loss = TwinFlowLoss(recipe=recipe)(model, x, cond=c, uncond=u, generator=gen(0))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{recipe}: no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), f"{recipe}: non-finite gradient on {name}"
        assert float(p.grad.abs().sum()) > 0, f"{recipe}: zero gradient on {name}"


@pytest.mark.parametrize("dtype", DT, ids=["f32", "f64"])
@pytest.mark.parametrize("hyper", [dict(consistc_ratio=1e-30), dict(consistc_ratio=1e-30, estimate_order=1),
                                   dict(consistc_ratio=1e-30, sub_batches={"e2e": 0, "mul": 1, "any": 1, "adv": 0})],
                         ids=["tiny-cor", "tiny-cor-N1", "tiny-cor-mul-any"])
def test_t_equals_tt_guard(hyper, dtype):
    """Rows with t − tt = 0 exactly: 1/(t − tt) is taken as 0 — no NaN/Inf anywhere."""
    r = run_both(hyper, dtype=dtype, what=f"guard {hyper}")
    st = r["ref"].last_stats
    any_rows = slice(*st["split"]["any"])
    assert bool((st["t"][any_rows] == st["tt"][any_rows]).all()), "setup: any rows should have t == tt"
    loss = r["loss"]
    assert torch.isfinite(loss)
    assert all(g is not None and torch.isfinite(g).all() for g in r["grads"])
    for k in ("loss", "base", "mul", "any"):
        v = float(r["stats"][k])
        assert math.isnan(v) or math.isfinite(v)


def test_same_seed_same_loss_different_seed_different():
    model = make_model()
    x, c, u = make_data(8)
    vals = []
    for seed in (5, 5, 6):
        CALLS.clear()
        vals.append(float(TwinFlowLoss()(model, x, cond=c, uncond=u, generator=gen(seed)).detach()))
    assert vals[0] == vals[1]
    assert vals[0] != vals[2]


def test_global_rng_when_no_generator():
    model = make_model()
    x, c, u = make_data(8)
    torch.manual_seed(123)
    a = TwinFlowLoss()(model, x, cond=c, uncond=u)
    torch.manual_seed(123)
    ref = ReferenceTwinFlowLoss()
    r = ref(model, x, cond=c, uncond=u, generator=None)
    torch.testing.assert_close(a.detach(), r.detach(), **TOL[torch.float32])


def test_runs_on_cpu_without_cuda():
    """docs/algorithm.md §5.3: training must run on CPU (no torch.cuda RNG save/restore)."""
    code = textwrap.dedent("""
        import torch
        assert not torch.cuda.is_available()
        from twinflow import TwinFlowLoss
        net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        def model(x, t, tt, c=None):
            return net(torch.cat([x, t[:, None], tt[:, None], c[0].float()[:, None]], 1))
        x = torch.randn(8, 3)
        for recipe in ("twinflow", "rcgm", "flow_matching"):
            lf = TwinFlowLoss(recipe=recipe, ema_decay_rate=0.0)
            loss = lf(model, x, cond=[torch.arange(8) % 2], uncond=[torch.full((8,), 2)])
            loss.backward()
            assert torch.isfinite(loss), recipe
            torch.manual_seed(0)
            loss = lf(model, x, cond=[torch.arange(8) % 2], uncond=[torch.full((8,), 2)],
                      generator=torch.Generator().manual_seed(0))
            assert torch.isfinite(loss), recipe
        print("OK")
    """)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK" in res.stdout


def test_beta_time_distribution():
    """time_dist_ctrl (β1, β2, scale) ≠ (1, 1, ·): t ~ Beta(β1, β2), clamped, times scale.

    Flow matching puts every row in the mul run, so the t handed to the single call are the
    draws themselves.  Moments only (the reference does not transcribe Marsaglia–Tsang)."""
    model = make_model()
    B = 4096
    x, _, _ = make_data(B, cond=False)
    for (b1, b2, scale) in ((2.0, 5.0, 0.8), (0.5, 2.0, 1.0)):
        CALLS.clear()
        lf = TwinFlowLoss(recipe="flow_matching", time_dist_ctrl=(b1, b2, scale), ema_decay_rate=0.0)
        with torch.no_grad():
            loss = lf(model, x, generator=gen(0))
        assert torch.isfinite(loss)
        assert len(CALLS) == 1
        t = CALLS[0]["t"].double()
        assert float(t.min()) >= 0 and float(t.max()) <= scale
        mean = scale * b1 / (b1 + b2)
        var = scale ** 2 * b1 * b2 / ((b1 + b2) ** 2 * (b1 + b2 + 1))
        assert abs(float(t.mean()) - mean) < 5 * math.sqrt(var / B), (float(t.mean()), mean)
        assert abs(float(t.var()) / var - 1) < 0.15, (float(t.var()), var)
        torch.testing.assert_close(CALLS[0]["tt"], CALLS[0]["t"])  # flow matching: tt = t


# ============================================================================= EMA / teacher / state

def _train_steps(hyper, steps, *, api=None, ref=None, model=None, seed0=100, dtype=torch.float64,
                 teacher=None, record=None):
    """Run `steps` steps of API and reference on the same model (Adam on the API's grads)."""
    model = model or make_model(dtype)
    x, c, u = make_data(8, dtype)
    api = api or TwinFlowLoss(**hyper)
    ref = ref or ReferenceTwinFlowLoss(**hyper)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    out = []
    for i in range(steps):
        rloss = ref(model, x, cond=c, uncond=u, teacher=teacher, generator=gen(seed0 + i))
        CALLS.clear()
        loss = api(model, x, cond=c, uncond=u, teacher=teacher, generator=gen(seed0 + i))
        calls = api_calls(model)
        out.append(dict(loss=float(loss.detach()), rloss=float(rloss.detach()),
                        d=api.last_stats["ema_decay"], rd=ref.last_stats["ema_decay"],
                        calls=calls, rcalls=ref.last_calls))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if record is not None:
            record(i, api, ref, model)
    return model, api, ref, out


def test_ema_decay_sequence_and_teacher_weights():
    """emd = 0.99: d = 0, 0.495, 0.620, …; the teacher equals the reference EMA after every step."""
    expected_d, d = [], 0.0
    for _ in range(5):
        expected_d.append(d)
        d = d + (1 - d) * (0.99 - d) / 2
    assert abs(expected_d[1] - 0.495) < 1e-12 and abs(expected_d[2] - 0.62) < 1e-3

    def record(i, api, ref, model):
        assert api.teacher is not None and api.teacher is not model
        for (n, pa), pr in zip(api.teacher.named_parameters(), ref.teacher.parameters()):
            torch.testing.assert_close(pa.detach(), pr.detach(), rtol=1e-12, atol=1e-14,
                                       msg=lambda m: f"step {i}: teacher {n}: {m}")
        for (n, ba), br in zip(api.teacher.named_buffers(), ref.teacher.buffers()):
            torch.testing.assert_close(ba, br, msg=lambda m: f"step {i}: teacher buffer {n}: {m}")

    model, api, ref, out = _train_steps(dict(ema_decay_rate=0.99), 5, record=record)
    got = [o["d"] for o in out]
    assert all(g is not None for g in got), got
    for g, e in zip(got, expected_d):
        assert abs(float(g) - e) < 1e-9, (got, expected_d)
    for i, o in enumerate(out):
        assert abs(o["loss"] - o["rloss"]) <= 1e-9 * abs(o["rloss"]), (i, o["loss"], o["rloss"])
        compare_calls(o["calls"], o["rcalls"], torch.float64, what=f"step {i}")
    # after training the EMA teacher differs from the online model
    diff = sum(float((pa.detach() - pm.detach()).abs().sum()) for pa, pm in zip(api.teacher.parameters(), model.parameters()))
    assert diff > 0


def test_emd0_teacher_is_online_model():
    model, api, ref, out = _train_steps(dict(ema_decay_rate=0.0), 3)
    assert api.teacher is None
    for i, o in enumerate(out):
        assert o["d"] is None
        assert all(c["net"] == "online" for c in o["calls"])
        assert abs(o["loss"] - o["rloss"]) <= 1e-9 * abs(o["rloss"]), (i, o)


def test_emd1_teacher_is_frozen_initial_copy():
    model0 = make_model(torch.float64)
    init = copy.deepcopy(model0.state_dict())
    model, api, ref, out = _train_steps(dict(ema_decay_rate=1.0), 3, model=model0)
    assert api.teacher is not None and api.teacher is not model
    for k, v in api.teacher.state_dict().items():
        torch.testing.assert_close(v, init[k], rtol=0, atol=0, msg=lambda m: f"frozen teacher {k} moved: {m}")
    for i, o in enumerate(out):
        assert o["d"] is None
        # the enhancement call (3 + 4, batched) on the frozen copy; RCGM and the rest on the online model
        nets = [c["net"] for c in o["calls"]]
        assert nets == ["online", "online", "teacher", "online", "online", "online"], nets
        assert abs(o["loss"] - o["rloss"]) <= 1e-9 * abs(o["rloss"]), (i, o["loss"], o["rloss"])


def test_teacher_argument_is_used_and_not_updated():
    teacher = make_model(torch.float64, seed=7)
    before = copy.deepcopy(teacher.state_dict())
    model, api, ref, out = _train_steps(dict(ema_decay_rate=0.99), 3, teacher=teacher)
    assert api.teacher is None
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=lambda m: f"teacher= was updated ({k}): {m}")
    for i, o in enumerate(out):
        assert o["d"] is None
        tcalls = [c for c in o["calls"] if c["net"] == "teacher"]
        assert len(tcalls) == 3 and all(c["module"] is teacher for c in tcalls)
        assert abs(o["loss"] - o["rloss"]) <= 1e-9 * abs(o["rloss"]), (i, o["loss"], o["rloss"])
        compare_calls(o["calls"], o["rcalls"], torch.float64, what=f"step {i}")


def _snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("fresh", [False, True], ids=["into-used", "into-fresh"])
@pytest.mark.parametrize("emd", [0.99, 1.0])
def test_state_dict_round_trip(fresh, emd):
    """Save after 2 steps, continue 2 steps; load into another TwinFlowLoss, replay: identical."""
    dtype = torch.float64
    model = make_model(dtype)
    x, c, u = make_data(8, dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    lf = TwinFlowLoss(ema_decay_rate=emd)

    def step(lf, seed):
        loss = lf(model, x, cond=c, uncond=u, generator=gen(seed))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach()), lf.last_stats["ema_decay"]

    for s in (1, 2):
        step(lf, s)
    buf = io.BytesIO()
    torch.save(lf.state_dict(), buf)
    msd, osd = _snapshot(model, opt)
    first = [step(lf, s) for s in (3, 4)]

    model.load_state_dict(msd)
    opt.load_state_dict(osd)
    lf2 = TwinFlowLoss(ema_decay_rate=emd)
    if not fresh:  # the loss object has already seen a (different) model
        other = make_model(dtype, seed=9)
        lf2(other, x, cond=c, uncond=u, generator=gen(0))
    buf.seek(0)
    lf2.load_state_dict(torch.load(buf, weights_only=False))
    second = [step(lf2, s) for s in (3, 4)]
    assert second == first, (first, second)
    for (n, pa), pb in zip(lf.teacher.named_parameters(), lf2.teacher.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=lambda m: f"teacher {n}: {m}")


def test_bf16_autocast_gives_float32_finite_loss():
    model = make_model()
    x, c, u = make_data(8)
    for recipe in ("twinflow", "rcgm", "flow_matching"):
        lf = TwinFlowLoss(recipe=recipe)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lf(model, x, cond=c, uncond=u, generator=gen(0))
        assert loss.dtype == torch.float32, (recipe, loss.dtype)
        assert torch.isfinite(loss), recipe
        grads = torch.autograd.grad(loss, list(model.parameters()))
        assert all(torch.isfinite(g).all() for g in grads), recipe
        for k in ("loss", "base"):
            assert math.isfinite(float(lf.last_stats[k])), (recipe, k)


def test_last_stats_consistency():
    r = run_both(dict(recipe="twinflow"), what="stats")
    st = r["stats"]
    assert isinstance(st["model_calls"], int)
    # reading (docs/algorithm.md and the docs silent): loss = base + dist_match, dist_match either dmc·mean or the mean
    tot = float(st["loss"])
    assert (abs(tot - (st["base"] + st["dist_match"])) < 1e-5 * abs(tot)
            or abs(tot - (st["base"] + 0.5 * st["dist_match"])) < 1e-5 * abs(tot)), st
    # mean_B(L·w) over all rows (N ≥ 1) is the row-weighted mean of the per-run means
    sp = r["ref"].last_stats["split"]
    n = {k: sp[k][1] - sp[k][0] for k in RUNS}
    mix = sum(n[k] * st[k] for k in RUNS) / sum(n.values())
    assert abs(mix - st["base"]) < 1e-5 * abs(st["base"])
    r = run_both(dict(recipe="rcgm"), what="stats-rcgm")
    assert math.isnan(float(r["stats"]["adv"]))


# ============================================================================= errors

def _call(hyper=None, B=8, model=None, cond=True, uncond=True, **kw):
    def f():
        m = model or make_model()
        x, c, u = make_data(B, cond=cond, uncond=uncond)
        lf = TwinFlowLoss(**(hyper or {}))
        return lf(m, x, cond=c, uncond=u, generator=gen(0), **kw)
    return f


@pytest.mark.parametrize("recipe,B,minimum", [("twinflow", 3, 4), ("twinflow", 1, 4), ("rcgm", 2, 3),
                                              ("flow_matching", 0, 1)])
def test_error_batch_too_small(recipe, B, minimum):
    expect_error(ValueError, _call(dict(recipe=recipe), B=B), contains=(str(minimum),))


def test_error_batch_too_small_skewed_weights():
    hyper = dict(sub_batches={"e2e": 1, "mul": 0, "any": 2, "adv": 0})
    expect_error(ValueError, _call(hyper, B=1), contains=("2",))
    _call(hyper, B=2)()  # exactly the minimum works


@pytest.mark.parametrize("bad", [{"e2e": -1.0}, {"adv": -0.5}, {"mul": NAN}, {"any": INF}])
def test_error_bad_sub_batch_weight(bad):
    sb = {"e2e": 1.0, "mul": 1.0, "any": 1.0, "adv": 1.0}
    sb.update(bad)
    key = next(iter(bad))
    expect_error(ValueError, _call(dict(sub_batches=sb)), contains=((key, "sub_batches"),))


def test_error_unknown_recipe_and_loss():
    expect_error(ValueError, _call(dict(recipe="diffusion")), contains=("recipe",))
    expect_error(ValueError, _call(dict(loss="huber")), contains=("loss",))


@pytest.mark.parametrize("order", [-1, -5])
def test_error_negative_estimate_order(order):
    expect_error(ValueError, _call(dict(estimate_order=order)), contains=("estimate_order",))


NONFINITE = [
    ("consistc_ratio", NAN), ("consistc_ratio", INF),
    ("ema_decay_rate", NAN), ("ema_decay_rate", INF),
    ("enhanced_ratio", NAN), ("enhanced_ratio", -INF),
    ("enhanced_range", (NAN, 1.0)), ("enhanced_range", (0.0, INF)),
    ("time_dist_ctrl", (NAN, 1.0, 1.0)), ("time_dist_ctrl", (1.0, INF, 1.0)), ("time_dist_ctrl", (1.0, 1.0, NAN)),
    ("barron_alpha", NAN), ("barron_c", INF), ("barron_c", NAN),
    ("dist_match_cof", NAN), ("dist_match_cof", INF),
]


@pytest.mark.parametrize("field,value", NONFINITE, ids=[f"{f}={v}" for f, v in NONFINITE])
def test_error_nonfinite_hyper(field, value):
    expect_error(ValueError, _call({field: value}), contains=(field,))


class WrongShape(TinyNet):
    def forward(self, x, t, tt, c=None):
        return super().forward(x, t, tt, c).flatten(1)


class WrongRows(TinyNet):
    def forward(self, x, t, tt, c=None):
        return super().forward(x, t, tt, c)[:-1]


@pytest.mark.parametrize("cls", [WrongShape, WrongRows])
@pytest.mark.parametrize("recipe", ["twinflow", "flow_matching"])
def test_error_model_wrong_shape(cls, recipe):
    torch.manual_seed(0)
    expect_error(ValueError, _call(dict(recipe=recipe), model=cls()), contains=("shape",))


class MyError(Exception):
    pass


class Exploding(TinyNet):
    def __init__(self, fail_at, err):
        super().__init__()
        self.fail_at, self.err, self.n = fail_at, err, 0

    def forward(self, x, t, tt, c=None):
        self.n += 1
        if self.n == self.fail_at:
            raise self.err
        return super().forward(x, t, tt, c)


@pytest.mark.parametrize("fail_at", [1, 2, 3, 5, 6])
@pytest.mark.parametrize("err_type", [MyError, KeyError, RuntimeError])
def test_model_exception_propagates_unchanged(fail_at, err_type):
    """Exceptions from the model (online or a teacher copy of it) reach the caller as raised.

    emd = 0 so that every call (1 … 6 for the TwinFlow recipe, batched) goes to this very object."""
    torch.manual_seed(0)
    err = err_type("boom from the user's model")
    m = Exploding(fail_at, err)
    e = expect_error(err_type, _call(dict(ema_decay_rate=0.0), model=m))
    assert e is err
    assert m.n == fail_at, "the loss kept calling the model after it raised"


def test_odd_inputs_raise_not_panic():
    """Malformed inputs: a Python exception, never a Rust panic."""
    model = make_model()
    x, c, u = make_data(8)
    must_raise = [
        lambda: TwinFlowLoss()(model, x, cond=[c[0][:5], c[1]], uncond=u, generator=gen(0)),
        lambda: TwinFlowLoss()(model, x, cond=c, uncond=[u[0][:3], u[1]], generator=gen(0)),
        lambda: TwinFlowLoss()(model, x.long(), cond=c, uncond=u, generator=gen(0)),
        lambda: TwinFlowLoss(enhanced_range=(0.0,))(model, x, cond=c, generator=gen(0)),
        lambda: TwinFlowLoss(time_dist_ctrl=(1.0, 1.0))(model, x, cond=c, generator=gen(0)),
    ]
    # docs/algorithm.md and the docs do not say whether these are errors: only "no panic" is required
    may_raise = [
        lambda: TwinFlowLoss(sub_batches={"e2e": 0, "mul": 0, "any": 0, "adv": 0})(model, x, cond=c, generator=gen(0)),
        lambda: TwinFlowLoss(sub_batches={"e2e": 1, "mul": 1, "any": 1, "adv": 1, "xyz": 1})(model, x, generator=gen(0)),
        lambda: TwinFlowLoss(ema_decay_rate=1.5)(model, x, cond=c, generator=gen(0)),
        lambda: TwinFlowLoss(barron_c=0.0)(model, x, cond=c, generator=gen(0)),
    ]
    for i, f in enumerate(must_raise + may_raise):
        try:
            f()
        except BaseException as e:  # noqa: BLE001
            assert not _is_panic(e), f"case {i}: Rust panic leaked: {e!r}"
            assert isinstance(e, (ValueError, TypeError, RuntimeError, IndexError)), f"case {i}: {type(e)}: {e}"
        else:
            if i < len(must_raise):
                raise AssertionError(f"case {i}: no exception")


# ============================================================================= batched calls
def _one_step(loss_fn, dtype=torch.float64, u_rows_dtype=None, seed=5):
    model = make_model(dtype)
    x, c, u = make_data(10, dtype)
    if u_rows_dtype is not None:  # conditioning that cannot be joined with cond's
        u = [u[0], u[1].to(u_rows_dtype)]
    CALLS.clear()
    loss = loss_fn(model, x, cond=c, uncond=u, generator=gen(seed))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.detach(), grads, dict(loss_fn.last_stats), api_calls(model)


@pytest.mark.parametrize("recipe", ["twinflow", "rcgm"])
def test_batched_calls_give_the_unbatched_loss_and_gradients(recipe):
    """TinyNet's rows are independent, so joining the teacher's cond + uncond calls and the two
    distribution-matching calls changes at most the last bits (float64, 1e-6 relative)."""
    lb, gb, sb, cb = _one_step(TwinFlowLoss(recipe, ema_decay_rate=0.0))
    lu, gu, su, cu = _one_step(TwinFlowLoss(recipe, ema_decay_rate=0.0, batch_calls=False))
    assert sb["model_calls"] == len(cb) < su["model_calls"] == len(cu)
    torch.testing.assert_close(lb, lu, rtol=1e-6, atol=0)
    for a, b in zip(gb, gu):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))
    # the batched call carries cond's rows then uncond's (enhanced target), −τ then +τ (DM)
    compare_calls(cb, cu, torch.float64, what=recipe)


def test_unjoinable_conditioning_falls_back_to_separate_calls():
    """uncond's tensors differ in dtype from cond's: the enhancement pair runs as two calls,
    with the same result; the distribution-matching pair (both cond) stays batched."""
    lb, gb, sb, cb = _one_step(TwinFlowLoss(ema_decay_rate=0.0), u_rows_dtype=torch.float64)
    lu, gu, su, cu = _one_step(TwinFlowLoss(ema_decay_rate=0.0, batch_calls=False), u_rows_dtype=torch.float64)
    assert (sb["model_calls"], su["model_calls"]) == (7, 8)
    torch.testing.assert_close(lb, lu, rtol=1e-6, atol=0)
    for a, b in zip(gb, gu):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))


def test_error_wrong_shape_in_a_call_split_by_its_conditioning():
    """cond and uncond that cannot be joined (other trailing shape) make the teacher's pair two
    calls; a wrong-shaped output of the second is still a ValueError naming the shape."""
    def model(x, t, tt, c=None):
        out = x * t.view(-1, 1)
        return out[:-1] if c is not None and c[0].dim() == 2 else out  # wrong on the uncond rows

    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    loss = TwinFlowLoss("twinflow", ema_decay_rate=0.0)
    expect_error(ValueError, lambda: loss(model, x, cond=[torch.zeros(8)], uncond=[torch.zeros(8, 3)]),
                 contains=("shape",))
