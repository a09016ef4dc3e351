"""Hostile arguments to the Rust bindings (issue 14): bounds, exotic tensors, non-finite values.

Each case runs in a fresh interpreter (``isolated``) with a timeout, because before these
fixes some of them killed the interpreter (allocation failure, segfault) or looped forever
holding the GIL. A case passes when the child raises the documented exception (or returns
the correct result) and exits normally.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import twinflow
from twinflow import UnifiedSampler, ucgm_step

from checks import expect_error  # noqa: E402

_PRELUDE = """
import sys, torch, twinflow
from twinflow import UnifiedSampler, ucgm_step, TwinFlowLoss
from twinflow._core import split_sub_batches
def expect(exc, fn, *words):
    try:
        fn()
    except BaseException as e:
        name = type(e).__name__
        if name == "PanicException" or not isinstance(e, exc):
            print("WRONG", name, e); sys.exit(3)
        missing = [w for w in words if w not in str(e)]
        if missing:
            print("MESSAGE", e, "lacks", missing); sys.exit(4)
        print("OK", name, e); return
    print("NO ERROR"); sys.exit(5)
"""


def isolated(code: str, timeout: float = 180.0) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        r = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(code)], capture_output=True, text=True,
                           timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for {timeout} s:\n{code}")
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    return r.stdout


# ----------------------------------------------------------------------------- bounds


@pytest.mark.parametrize("steps", [2**62, 10**12, 10**9, twinflow.MAX_SAMPLING_STEPS + 1])
def test_sampling_steps_are_bounded(steps):
    isolated(f"""
    expect(ValueError, lambda: UnifiedSampler(sampling_steps={steps}), "sampling_steps")
    expect(ValueError, lambda: UnifiedSampler.preset("4-nfe", sampling_steps={steps}), "sampling_steps")
    """)


def test_set_timesteps_is_bounded():
    pytest.importorskip("diffusers")
    isolated("""
    from twinflow.scheduler import TwinFlowScheduler
    s = TwinFlowScheduler()
    expect(ValueError, lambda: s.set_timesteps(10**12), "num_inference_steps")
    expect(ValueError, lambda: s.set_timesteps(2**62), "num_inference_steps")
    """)


def test_estimate_order_and_batch_size_are_bounded():
    isolated("""
    expect(ValueError, lambda: TwinFlowLoss(estimate_order=2**62), "estimate_order")
    expect(ValueError, lambda: split_sub_batches(2**62, {"e2e": 1, "mul": 1, "any": 1, "adv": 1}), "batch size")
    """)


def test_extreme_extrapol_ratio_is_refused():
    expect_error(ValueError, lambda: UnifiedSampler(extrapol_ratio=1e300), contains="extrapol_ratio")


# ----------------------------------------------------------------------------- exotic tensors


def test_zero_tensor_velocity_is_read_as_zeros():
    out = isolated("""
    x = torch.randn(2, 40000)
    y = ucgm_step(x, torch._efficientzerotensor(2, 40000), 0.5, 0.25)
    print("EQUAL", torch.equal(y, x))
    """)
    assert "EQUAL True" in out


def test_negative_bit_view_keeps_its_sign():
    x = torch.randn(2, 40000)
    f = torch.randn(2, 40000)
    neg = torch._neg_view(f)
    assert neg.is_neg() and neg.is_contiguous()
    torch.testing.assert_close(ucgm_step(x, neg, 0.5, 0.25), x + 0.25 * f)
    c = torch.complex(torch.randn(2, 300), f[:, :300])
    torch.testing.assert_close(ucgm_step(x[:, :300], c.conj().imag, 0.5, 0.25), x[:, :300] + 0.25 * f[:, :300])


@pytest.mark.parametrize("kind,exc,word", [
    ("torch.randn(2, 8, device='meta')", "ValueError", "meta"),
    ("torch.randn(2, 8).to_mkldnn()", "TypeError", "_mkldnn"),
    ("torch.randn(2, 8).to_sparse()", "TypeError", "sparse"),
    ("torch.nested.nested_tensor([torch.randn(8), torch.randn(8)])", "TypeError", "nested"),
])
def test_tensors_without_plain_memory_are_refused(kind, exc, word):
    isolated(f"""
    import warnings; warnings.simplefilter("ignore")
    x = torch.randn(2, 8)
    bad = {kind}
    expect({exc}, lambda: ucgm_step(x, bad, 0.5, 0.25), "velocity", "{word}")
    expect({exc}, lambda: ucgm_step(bad, x, 0.5, 0.25), "x", "{word}")
    expect({exc}, lambda: UnifiedSampler(sampling_steps=2).sample(lambda x, t, tt: bad, x), "model output", "{word}")
    expect({exc}, lambda: UnifiedSampler(sampling_steps=2).sample(lambda x, t, tt: x, bad), "noise", "{word}")
    """)


def test_meta_is_not_called_mps():
    isolated("""
    x = torch.randn(2, 8)
    expect(ValueError, lambda: ucgm_step(x, torch.empty(2, 8, device="meta"), 0.5, 0.25), "meta")
    try:
        ucgm_step(x, torch.empty(2, 8, device="meta"), 0.5, 0.25)
    except ValueError as e:
        assert "Mps" not in str(e), e
    """)


def test_vmapped_tensors_are_refused():
    isolated("""
    x = torch.randn(3, 2, 8)
    def f(xi):
        return ucgm_step(xi, xi, 0.5, 0.25)
    expect(TypeError, lambda: torch.func.vmap(f)(x), "torch.func")
    """)


# ----------------------------------------------------------------------------- non-finite values


def _velocity(x, t, tt):
    return 0.1 * x


def test_nan_or_inf_noise_is_refused_up_front():
    for bad in (float("nan"), float("inf")):
        z = torch.randn(2, 3, 8, 8)
        z[1, 2, 3, 4] = bad
        expect_error(ValueError, lambda: UnifiedSampler(sampling_steps=2).sample(_velocity, z), contains="noise")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("order", [1, 2])
def test_a_nan_model_output_names_the_step(fused, order):
    calls = []

    def model(x, t, tt):
        calls.append(float(t[0]))
        return torch.full_like(x, float("nan")) if len(calls) == 2 else 0.1 * x

    s = UnifiedSampler(sampling_steps=4, sampling_order=order)
    s.use_fused_kernel = fused
    e = expect_error(FloatingPointError, lambda: s.sample(model, torch.randn(2, 3, 8, 8)),
                     contains=("evaluation 2 of", "model output"))
    assert len(calls) == 2, "stopped at the first non-finite step"
    assert f"t = {calls[1]}" in str(e)
    s.check_finite = False
    calls.clear()
    assert torch.isnan(s.sample(model, torch.randn(2, 3, 8, 8))).all()


def test_ucgm_step_names_the_non_finite_input():
    x, v, n = torch.randn(2, 40000), torch.randn(2, 40000), torch.randn(2, 40000)
    for name, t in (("velocity", v), ("x", x), ("noise", n)):
        bad = t.clone()
        bad[1, 777] = float("inf")
        args = {"x": x, "velocity": v, "noise": n, name: bad}
        expect_error(FloatingPointError, lambda: ucgm_step(args["x"], args["velocity"], 0.5, 0.25, 0.5, args["noise"]),
                     contains=name)
    bad = v.clone()
    bad[0, 0] = float("nan")
    assert torch.isnan(ucgm_step(x, bad, 0.5, 0.25, check_finite=False)[0, 0])


def test_scheduler_step_with_nan_input_is_reported():
    pytest.importorskip("diffusers")
    from twinflow.scheduler import TwinFlowScheduler

    s = TwinFlowScheduler()
    s.set_timesteps(2)
    x = torch.randn(1, 4, 8, 8)
    v = torch.randn_like(x)
    v[0, 0, 0, 0] = float("nan")
    expect_error(FloatingPointError, lambda: s.step(v, s.timesteps[0], x), contains="evaluation 1")


def test_loss_refuses_nan_input_and_reports_a_nan_model():
    loss = twinflow.TwinFlowLoss(ema_decay_rate=0.0)
    x = torch.randn(4, 2)
    bad = x.clone()
    bad[0, 0] = float("nan")

    def model(x_t, t, tt, c=None):
        return 0.1 * x_t

    expect_error(ValueError, lambda: loss(model, bad), contains="x contains NaN")
    expect_error(FloatingPointError, lambda: loss(lambda x_t, t, tt, c=None: x_t * float("nan"), x),
                 contains="loss is NaN")
    assert torch.isfinite(loss(model, x))
