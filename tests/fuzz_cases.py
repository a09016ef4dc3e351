"""Property-based cases behind ``tests/safety/test_fuzz.py`` (hypothesis). Not collected by pytest
on its own: ``test_fuzz.py`` runs each property in a child process with a timeout, so a
crash (segfault, abort) or a hang fails that test instead of killing or stalling the suite.

Every property draws arbitrary values and tensor kinds and asserts: an exception of the
documented kinds (ValueError, TypeError, FloatingPointError) or a finite, correct result.
A Rust panic (``PanicException``, a BaseException) is never acceptable.

    python tests/fuzz_cases.py sampler_settings split_inputs   # these properties, in this process
"""

from __future__ import annotations

import math
import sys

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import twinflow
from twinflow import UnifiedSampler, ucgm_step
from twinflow._core import split_sub_batches

DOCUMENTED = (ValueError, TypeError, FloatingPointError)
# Small and fixed: the suite must stay within its CI budget (see test_fuzz.py).
FUZZ = settings(max_examples=50, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


def outcome(fn):
    """fn's result, or None after a documented exception; anything else propagates (a panic
    is a BaseException and fails the property)."""
    try:
        return fn()
    except DOCUMENTED:
        return None


any_value = st.one_of(
    st.none(), st.booleans(), st.text(max_size=5),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.one_of(st.floats(-1e6, 1e6), st.just(math.nan), st.just(math.inf)), max_size=4),
)
small_float = st.floats(min_value=-2.0, max_value=2.0, allow_nan=False)


def maybe(strategy):
    return st.one_of(strategy, any_value)


SETTINGS = {
    "sampling_steps": maybe(st.integers(1, 12)),
    "stochast_ratio": maybe(st.one_of(st.floats(0, 1), st.just("SDE"))),
    "extrapol_ratio": maybe(st.floats(0, 2)),
    "sampling_order": maybe(st.integers(1, 2)),
    "time_dist_ctrl": maybe(st.tuples(*[st.floats(0.05, 3)] * 3)),
    "rfba_gap_steps": maybe(st.tuples(st.floats(0, 0.5), st.floats(0, 0.49))),
    "sampling_style": maybe(st.sampled_from(["few", "mul", "any", "FEW", "bogus"])),
}


# ----------------------------------------------------------------------------- sampler settings


@FUZZ
@given(st.fixed_dictionaries({}, optional=SETTINGS), st.sampled_from([torch.float32, torch.float64]),
       st.booleans())
def sampler_settings(kw, dtype, fused):
    """Any settings: refused, or a sampler whose every mode lands on the point mass μ (the
    exact velocity of data concentrated at μ is (x − μ)/t)."""
    sampler = outcome(lambda: UnifiedSampler(**kw))
    if sampler is None:
        return
    assert 1 <= sampler.nfe <= 2 * twinflow.MAX_SAMPLING_STEPS
    sampler.use_fused_kernel = fused
    mu = 0.75

    def point_mass(x, t, tt):
        return (x - mu) / t.reshape(-1, *[1] * (x.dim() - 1))

    noise = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0), dtype=dtype)
    out = sampler.sample(point_mass, noise, generator=torch.Generator().manual_seed(1))
    assert out.shape == noise.shape and out.dtype == dtype and torch.isfinite(out).all()
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert (out - mu).abs().max().item() < tol, (kw, out)


# ----------------------------------------------------------------------------- ucgm_step

KINDS = ("plain", "transposed", "neg_view", "zero", "requires_grad", "half", "bfloat16", "double", "int",
         "zero_dim", "empty", "list", "wrong_shape")


def make(kind: str, shape, g):
    base = torch.randn(shape, generator=g)
    if kind == "transposed":
        return base.transpose(0, 1).contiguous().transpose(0, 1)
    if kind == "neg_view":
        return torch._neg_view(base)
    if kind == "zero":
        return torch._efficientzerotensor(shape)
    if kind == "requires_grad":
        return base.clone().requires_grad_(True)
    if kind in ("half", "bfloat16", "double"):
        return base.to({"half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}[kind])
    if kind == "int":
        return (base * 10).to(torch.int32)
    if kind == "zero_dim":
        return torch.tensor(0.5)
    if kind == "empty":
        return torch.empty(0, shape[1])
    if kind == "list":
        return base.tolist()
    if kind == "wrong_shape":
        return torch.randn(shape[0] + 1, shape[1], generator=g)
    return base


@FUZZ
@given(st.sampled_from(KINDS), st.sampled_from(KINDS), st.one_of(st.none(), st.sampled_from(KINDS)),
       maybe(small_float), maybe(small_float), st.one_of(st.none(), maybe(st.floats(0, 1))),
       st.booleans(), st.integers(1, 3), st.sampled_from([3, 7, 40000]), st.booleans())
def ucgm_step_inputs(kx, kv, kn, t_cur, t_next, s, use_out, rows, cols, poison):
    """Any inputs: refused, or the docs/algorithm.md §2 formula (computed here in float64 torch ops)."""
    g = torch.Generator().manual_seed(rows * 7 + cols)
    x, v = make(kx, (rows, cols), g), make(kv, (rows, cols), g)
    noise = None if kn is None else make(kn, (rows, cols), g)
    if poison and isinstance(v, torch.Tensor) and v.numel() and v.dtype.is_floating_point and not v._is_zerotensor():
        v = v.detach().clone()
        v[(0,) * v.dim()] = math.nan
    out = torch.empty_like(x) if use_out and isinstance(x, torch.Tensor) and not x._is_zerotensor() else None
    y = outcome(lambda: ucgm_step(x, v, t_cur, t_next, s, noise, out=out))
    if y is None:
        return
    assert not poison or not (isinstance(v, torch.Tensor) and v.numel()), "a NaN velocity must be reported"
    ratio = 0.0 if s is None else float(s)
    xd, vd = x.detach().double(), v.detach().double()
    if ratio == 0.0:
        want = xd - (t_cur - t_next) * vd
    else:
        xh, zh = xd - t_cur * vd, xd + (1 - t_cur) * vd
        want = (1 - t_next) * xh + t_next * (math.sqrt(1 - ratio) * zh + math.sqrt(ratio) * noise.detach().double())
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    if not y.numel():
        return
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(x.dtype, 5e-2)
    assert (y.detach().double() - want).abs().max().item() <= tol * (1 + want.abs().max().item()), (kx, kv, kn)
    if out is not None:
        assert y.data_ptr() == out.data_ptr()


# ----------------------------------------------------------------------------- scheduler


@settings(FUZZ, max_examples=20)  # each example runs up to 15 scheduler steps in Python
@given(maybe(st.integers(1, 8)), st.one_of(st.none(), st.lists(st.floats(allow_nan=True, allow_infinity=True),
                                                             max_size=6)),
       st.sampled_from([0.0, 1.0, "SDE"]), st.integers(1, 2), st.booleans())
def scheduler_inputs(steps, sigmas, ratio, order, pipeline_grid):
    """set_timesteps with any step count or sigmas: refused, or a schedule that steps to a
    finite sample, one model evaluation per timestep."""
    from twinflow.scheduler import TwinFlowScheduler

    sched = TwinFlowScheduler(stochast_ratio=ratio, sampling_order=order,
                              time_grid="pipeline" if pipeline_grid else "ucgm")
    if outcome(lambda: sched.set_timesteps(steps, sigmas=sigmas) or True) is None:
        return
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    n = len(sched.timesteps)
    assert 1 <= n <= 2 * twinflow.MAX_SAMPLING_STEPS
    g = torch.Generator().manual_seed(1)
    for t in sched.timesteps:
        x = sched.step(0.1 * x, t, x, generator=g, return_dict=False)[0]
    assert torch.isfinite(x).all()


# ----------------------------------------------------------------------------- split_sub_batches

RUN_NAMES = ("e2e", "mul", "any", "adv")


@FUZZ
@given(maybe(st.integers(0, 10**6)),
       st.one_of(st.dictionaries(st.sampled_from(RUN_NAMES + ("bogus",)), maybe(st.floats(0, 10)), max_size=5),
                 any_value))
def split_inputs(batch, weights):
    """Refused, or contiguous runs covering [0, batch), one row at least per active run."""
    runs = outcome(lambda: split_sub_batches(batch, weights))
    if runs is None:
        return
    assert list(runs) == list(RUN_NAMES)
    start = 0
    for name in RUN_NAMES:
        lo, hi = runs[name]
        assert lo == start and hi >= lo
        assert (hi > lo) == (float(weights.get(name, 0.0)) > 0)
        start = hi
    assert start == batch


PROPERTIES = {f.__name__: f for f in (sampler_settings, ucgm_step_inputs, scheduler_inputs, split_inputs)}

if __name__ == "__main__":
    import traceback

    torch.set_num_threads(1)
    for name in sys.argv[1:]:
        try:
            PROPERTIES[name]()
        except BaseException:  # noqa: BLE001 - a panic (BaseException) is reported like a failure
            print("FAILED", name, flush=True)
            traceback.print_exc()
        else:
            print("PASSED", name, flush=True)
