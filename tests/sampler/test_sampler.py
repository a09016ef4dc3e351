"""twinflow.UnifiedSampler against the independent plain-torch transcription of docs/algorithm.md §2.

Every test here compares the real sampler with ``ucgm_reference`` (which does
not import twinflow) or checks an API property stated in the brief/docs/algorithm.md.
"""

from __future__ import annotations

import itertools

import pytest
import torch


from checks import PATH_SETTINGS  # noqa: E402
from ucgm_reference import (  # noqa: E402
    reference_n,
    reference_nfe,
    reference_sample,
    reference_timesteps,
)

from twinflow import UnifiedSampler  # noqa: E402

# ----------------------------------------------------------------------------- helpers

TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float64: dict(atol=1e-7, rtol=1e-7),
}
# time values handed to the model: the float64 grid cast to the dtype
T_TOL = {
    torch.float32: dict(atol=2e-7, rtol=0.0),
    torch.float64: dict(atol=1e-13, rtol=0.0),
    torch.bfloat16: dict(atol=0.0, rtol=0.0),
}
# fused CPU kernel vs libtorch-ops path
PATH_TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-6),
    torch.float64: dict(atol=1e-12, rtol=1e-12),
}

STYLES = ("few", "mul", "any")
ORDERS = (1, 2)
STOCHS = (0.0, 0.5, 1.0, "SDE")
EXTRAS = (0.0, 0.3)
TDCS = ((1.0, 1.0, 1.0), (1.17, 0.8, 1.1), (0.7, 1.3, 0.9))
GAPS = ((0.0, 0.0), (0.001, 0.0), (0.001, 0.5), (0.05, 0.2))

SETTING_NAMES = PATH_SETTINGS


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], *([1] * (x.dim() - 1)))


def velocity(x, t, tt, cond=None, scale=None):
    """Nontrivial deterministic velocity depending on x, t and tt (t, tt of shape [B])."""
    tb, ttb = _bcast(t, x), _bcast(tt, x)
    v = torch.sin(x) * (1 + tb) + 0.3 * ttb + 0.2 * torch.cos(x) * ttb + 0.1 * x
    if cond is not None:
        v = v + cond * tb
    if scale is not None:
        v = v * scale
    return v


def ref_model(x, *, t, tt, **kw):
    return velocity(x, t, tt, **kw)


class RecModel:
    """Keyword-only t/tt (so positional passing fails); records every call."""

    def __init__(self, fn=velocity):
        self.fn = fn
        self.calls = []
        self.kwargs = []

    def __call__(self, x, *, t, tt, **kw):
        self.calls.append((x.detach().clone(), t.detach().clone(), tt.detach().clone()))
        self.kwargs.append(kw)
        return self.fn(x, t, tt, **kw)


def make_noise(shape, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def gen(seed=1234, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def split_result(res, noise):
    """return_trajectory=True: accept the trajectory tensor or a (sample, trajectory) pair."""
    if isinstance(res, torch.Tensor):
        return res[-1], res
    if isinstance(res, (tuple, list)) and len(res) == 2:
        a, b = res
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        if a.dim() == noise.dim() + 1:
            return b, a
        return a, b
    pytest.fail(f"return_trajectory=True returned {type(res)!r}")


def cfg_of(s):
    return {k: getattr(s, k) for k in SETTING_NAMES}


def assert_calls_match(got, want, dtype, device, B, tol=None):
    assert len(got) == len(want)
    tol = tol or TOL[dtype]
    for k, ((gx, gt, gtt), (wx, wt, wtt)) in enumerate(zip(got, want)):
        for name, g, w in (("t", gt, wt), ("tt", gtt, wtt)):
            assert isinstance(g, torch.Tensor), f"call {k}: {name} is not a tensor"
            assert g.dtype == dtype, f"call {k}: {name}.dtype {g.dtype} != {dtype}"
            assert g.device == torch.device(device), f"call {k}: {name} on {g.device}"
            assert tuple(g.shape) == (B,), f"call {k}: {name}.shape {tuple(g.shape)} != ({B},)"
            torch.testing.assert_close(g, w, **T_TOL[dtype], msg=lambda m: f"call {k} {name}: {m}")
        assert gx.dtype == dtype and gx.shape == wx.shape
        torch.testing.assert_close(gx, wx, **tol, msg=lambda m: f"call {k} x: {m}")


def check_against_reference(cfg, noise, *, fused=True, seed=1234, tol=None, model_kwargs=None):
    """Run sampler + reference with fresh generators of the same seed and compare everything."""
    model_kwargs = model_kwargs or {}
    dtype, device = noise.dtype, noise.device
    tol = tol or TOL[dtype]
    s = UnifiedSampler(**cfg)
    s.use_fused_kernel = fused
    noise_before = noise.clone()
    m = RecModel()
    g_impl = gen(seed, device)
    res = s.sample(m, noise, generator=g_impl, return_trajectory=True, **model_kwargs)
    sample, traj = split_result(res, noise)

    g_ref = gen(seed, device)
    ref_traj, ref_calls = reference_sample(ref_model, noise, generator=g_ref, **cfg, **model_kwargs)

    n = reference_n(cfg.get("sampling_steps", 20), cfg.get("sampling_order", 1))
    assert tuple(traj.shape) == (n + 1, *noise.shape)
    assert traj.dtype == dtype and traj.device == device
    assert sample.dtype == dtype and sample.device == device
    assert tuple(sample.shape) == tuple(noise.shape)
    assert torch.equal(sample, traj[-1])
    assert torch.equal(traj[0], noise_before)
    torch.testing.assert_close(traj, ref_traj, **tol)
    # the noise passed in is not modified
    assert torch.equal(noise, noise_before)
    # model calls
    assert len(m.calls) == s.nfe == reference_nfe(cfg.get("sampling_steps", 20), cfg.get("sampling_order", 1))
    assert_calls_match(m.calls, ref_calls, dtype, device, noise.shape[0], tol)
    # same number of draws from the generator
    assert torch.equal(g_impl.get_state(), g_ref.get_state()), "different number of noise draws"
    # the plain call (no trajectory) returns the same final sample
    x0 = s.sample(RecModel(), noise, generator=gen(seed, device), **model_kwargs)
    assert isinstance(x0, torch.Tensor)
    assert x0.dtype == dtype and x0.device == device and x0.shape == noise.shape
    assert torch.equal(x0, sample)
    assert torch.equal(noise, noise_before)
    return s, traj


# ----------------------------------------------------------------------------- all modes

MODES = list(itertools.product(STYLES, ORDERS, STOCHS, EXTRAS))


def _mode_cfg(idx, style, order, stoch, extra):
    return dict(
        sampling_steps=5 + idx % 4,  # 5..8: n >= 3 even for order 2, so extrapolation kicks in
        stochast_ratio=stoch,
        extrapol_ratio=extra,
        sampling_order=order,
        time_dist_ctrl=TDCS[idx % len(TDCS)],
        rfba_gap_steps=GAPS[(idx // len(TDCS)) % len(GAPS)],
        sampling_style=style,
    )


MODE_PARAMS = [pytest.param(i, *m, id="-".join(map(str, m))) for i, m in enumerate(MODES)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("idx,style,order,stoch,extra", MODE_PARAMS)
def test_matches_reference_all_modes(idx, style, order, stoch, extra, dtype):
    cfg = _mode_cfg(idx, style, order, stoch, extra)
    noise = make_noise((2, 3, 4, 5), dtype, seed=idx)
    check_against_reference(cfg, noise, seed=100 + idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("idx,style,order,stoch,extra", MODE_PARAMS)
def test_fused_and_ops_paths_agree(idx, style, order, stoch, extra, dtype):
    cfg = _mode_cfg(idx, style, order, stoch, extra)
    noise = make_noise((2, 3, 4, 5), dtype, seed=idx)
    outs = []
    for fused in (True, False):
        s = UnifiedSampler(**cfg)
        s.use_fused_kernel = fused
        assert s.use_fused_kernel is fused
        m = RecModel()
        res = s.sample(m, noise, generator=gen(7 + idx), return_trajectory=True)
        outs.append((split_result(res, noise)[1], m.calls))
    (ta, ca), (tb, cb) = outs
    assert ta.dtype == tb.dtype == dtype
    torch.testing.assert_close(ta, tb, **PATH_TOL[dtype])
    assert len(ca) == len(cb)
    for (xa, t_a, tta), (xb, t_b, ttb) in zip(ca, cb):
        assert torch.equal(t_a, t_b) and torch.equal(tta, ttb)
        torch.testing.assert_close(xa, xb, **PATH_TOL[dtype])
    # and the ops path also matches the reference
    check_against_reference(cfg, noise, fused=False, seed=7 + idx)


@pytest.mark.parametrize("tdc", TDCS + ((0.5, 2.0, 1.5),), ids=str)
@pytest.mark.parametrize("gaps", GAPS + ((0.1, 0.3), (0.3, 0.0)), ids=str)
@pytest.mark.parametrize("order", ORDERS)
def test_time_dist_and_gaps_sample(tdc, gaps, order):
    cfg = dict(
        sampling_steps=7,
        stochast_ratio="SDE",
        extrapol_ratio=0.3,
        sampling_order=order,
        time_dist_ctrl=tdc,
        rfba_gap_steps=gaps,
        sampling_style="any",
    )
    check_against_reference(cfg, make_noise((2, 3, 4), torch.float64, seed=3))
    cfg.update(stochast_ratio=0.0, extrapol_ratio=0.0, sampling_style="mul")
    check_against_reference(cfg, make_noise((2, 3, 4), torch.float32, seed=4))


@pytest.mark.parametrize("S", [1, 2, 3, 4])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("stoch", STOCHS, ids=str)
def test_short_step_counts(S, order, stoch):
    cfg = dict(sampling_steps=S, stochast_ratio=stoch, extrapol_ratio=0.3, sampling_order=order,
               rfba_gap_steps=(0.001, 0.5), sampling_style="mul")
    check_against_reference(cfg, make_noise((2, 3, 4), torch.float64, seed=S))


# ----------------------------------------------------------------------------- time grid

@pytest.mark.parametrize("S", [1, 2, 3, 5, 8, 20])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("tdc", TDCS + ((0.5, 2.0, 1.5),), ids=str)
@pytest.mark.parametrize("gaps", GAPS + ((0.1, 0.3),), ids=str)
def test_timesteps(S, order, tdc, gaps):
    s = UnifiedSampler(sampling_steps=S, sampling_order=order, time_dist_ctrl=tdc, rfba_gap_steps=gaps)
    ts = s.timesteps
    n = reference_n(S, order)
    assert isinstance(ts, torch.Tensor)
    assert ts.dtype == torch.float64
    assert ts.device == torch.device("cpu")
    assert tuple(ts.shape) == (n + 1,)
    assert ts[-1].item() == 0.0
    assert bool((ts[1:] < ts[:-1]).all()), ts
    torch.testing.assert_close(ts, reference_timesteps(S, order, tdc, gaps), atol=1e-14, rtol=1e-14)
    assert isinstance(s.nfe, int)
    assert s.nfe == (n if order == 1 else 2 * n - 1)


def test_default_settings():
    s = UnifiedSampler()
    assert s.sampling_steps == 20
    assert s.stochast_ratio == 0.0
    assert s.extrapol_ratio == 0.0
    assert s.sampling_order == 1
    assert isinstance(s.time_dist_ctrl, tuple) and s.time_dist_ctrl == (1.0, 1.0, 1.0)
    assert isinstance(s.rfba_gap_steps, tuple) and s.rfba_gap_steps == (0.0, 0.0)
    assert s.sampling_style == "few"
    assert s.use_fused_kernel is True
    assert s.nfe == 20
    torch.testing.assert_close(s.timesteps, reference_timesteps(20, 1), atol=1e-14, rtol=0)


def test_settings_properties_roundtrip():
    s = UnifiedSampler(sampling_steps=9, stochast_ratio="SDE", extrapol_ratio=0.25, sampling_order=2,
                       time_dist_ctrl=[1.17, 0.8, 1.1], rfba_gap_steps=[0.001, 0.3], sampling_style="any")
    assert s.sampling_steps == 9
    assert s.stochast_ratio == "SDE"
    assert s.extrapol_ratio == 0.25
    assert s.sampling_order == 2
    assert isinstance(s.time_dist_ctrl, tuple) and s.time_dist_ctrl == (1.17, 0.8, 1.1)
    assert isinstance(s.rfba_gap_steps, tuple) and s.rfba_gap_steps == (0.001, 0.3)
    assert s.sampling_style == "any"
    assert s.nfe == 2 * 5 - 1


def test_int_values_accepted_for_float_fields():
    # docs/algorithm.md writes the defaults as (1, 1, 1) and (0, 0)
    s = UnifiedSampler(sampling_steps=3, stochast_ratio=1, extrapol_ratio=0, time_dist_ctrl=(1, 1, 1),
                       rfba_gap_steps=(0, 0))
    assert s.stochast_ratio == 1.0
    torch.testing.assert_close(s.timesteps, reference_timesteps(3, 1), atol=1e-15, rtol=0)


@pytest.mark.parametrize("name", SETTING_NAMES)
def test_settings_are_read_only(name):
    s = UnifiedSampler()
    value = getattr(s, name)
    with pytest.raises((AttributeError, TypeError)):
        setattr(s, name, value)


def test_use_fused_kernel_is_writable():
    s = UnifiedSampler()
    assert s.use_fused_kernel is True
    s.use_fused_kernel = False
    assert s.use_fused_kernel is False
    s.use_fused_kernel = True
    assert s.use_fused_kernel is True


# ----------------------------------------------------------------------------- presets

PRESETS = {
    "1-nfe": dict(sampling_steps=(1,), stochast_ratio=0.8, rfba_gap_steps=(0.001, 0.7),
                  time_dist_ctrl=(1.0, 1.0, 1.0), sampling_style="few", sampling_order=1),
    "2-nfe": dict(sampling_steps=(2,), stochast_ratio=1.0, rfba_gap_steps=(0.001, 0.6),
                  time_dist_ctrl=(1.0, 1.0, 1.0), sampling_style="few", sampling_order=1),
    "4-nfe": dict(sampling_steps=(4,), stochast_ratio=1.0, rfba_gap_steps=(0.001, 0.5),
                  time_dist_ctrl=(1.0, 1.0, 1.0), sampling_style="few", sampling_order=1),
    "any-step": dict(sampling_steps=(4, 8), stochast_ratio=0.0, rfba_gap_steps=(0.001, 0.5),
                     time_dist_ctrl=(1.0, 1.0, 1.0), sampling_style="any", sampling_order=1),
    "multi-step": dict(sampling_steps=(30,), stochast_ratio=0.0, rfba_gap_steps=(0.001, 0.0),
                       time_dist_ctrl=(1.17, 0.8, 1.1), sampling_style="mul", sampling_order=1),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_values(name):
    want = PRESETS[name]
    s = UnifiedSampler.preset(name)
    assert isinstance(s, UnifiedSampler)
    assert s.sampling_steps in want["sampling_steps"]
    assert s.stochast_ratio == want["stochast_ratio"]
    assert s.rfba_gap_steps == want["rfba_gap_steps"]
    assert s.time_dist_ctrl == want["time_dist_ctrl"]
    assert s.sampling_style == want["sampling_style"]
    assert s.sampling_order == want["sampling_order"]
    assert s.nfe == s.sampling_steps
    ts = s.timesteps
    assert ts.dtype == torch.float64 and ts[-1].item() == 0.0
    torch.testing.assert_close(
        ts, reference_timesteps(s.sampling_steps, 1, want["time_dist_ctrl"], want["rfba_gap_steps"]),
        atol=1e-14, rtol=0,
    )


@pytest.mark.parametrize(
    "name,expected",
    [
        ("1-nfe", [0.999, 0.0]),
        ("2-nfe", [0.999, 0.6, 0.0]),
        ("4-nfe", [0.999, 0.999 - 0.499 / 3, 0.999 - 2 * 0.499 / 3, 0.5, 0.0]),
    ],
)
def test_preset_explicit_timesteps(name, expected):
    ts = UnifiedSampler.preset(name).timesteps
    assert ts.dtype == torch.float64
    # float64, not rounded to bf16 (docs/algorithm.md §5 item 5: 0.999 must not become 1.0)
    torch.testing.assert_close(ts, torch.tensor(expected, dtype=torch.float64), atol=1e-15, rtol=0)
    assert ts[0].item() != 1.0
    assert ts[-1].item() == 0.0


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_preset_sample_matches_reference(name, dtype):
    s = UnifiedSampler.preset(name)
    cfg = cfg_of(s)
    check_against_reference(cfg, make_noise((2, 3, 4), dtype, seed=11), seed=5)
    # the preset object itself (not a re-constructed one) samples identically
    res = s.sample(RecModel(), make_noise((2, 3, 4), dtype, seed=11), generator=gen(5), return_trajectory=True)
    ref, _ = reference_sample(ref_model, make_noise((2, 3, 4), dtype, seed=11), generator=gen(5), **cfg)
    torch.testing.assert_close(split_result(res, ref[0])[1], ref, **TOL[dtype])


def test_preset_overrides():
    s = UnifiedSampler.preset("4-nfe", sampling_steps=8)
    assert s.sampling_steps == 8
    assert s.stochast_ratio == 1.0
    assert s.rfba_gap_steps == (0.001, 0.5)
    assert s.sampling_style == "few"
    torch.testing.assert_close(s.timesteps, reference_timesteps(8, 1, (1, 1, 1), (0.001, 0.5)), atol=1e-14, rtol=0)

    s = UnifiedSampler.preset("multi-step", sampling_steps=10, sampling_order=2, stochast_ratio="SDE",
                              extrapol_ratio=0.2)
    assert (s.sampling_steps, s.sampling_order, s.stochast_ratio, s.extrapol_ratio) == (10, 2, "SDE", 0.2)
    assert s.time_dist_ctrl == (1.17, 0.8, 1.1) and s.sampling_style == "mul"
    assert s.nfe == 9
    check_against_reference(cfg_of(s), make_noise((2, 3, 4), torch.float64, seed=2))


# ----------------------------------------------------------------------------- RNG

@pytest.mark.parametrize("stoch", [0.5, 1.0, "SDE"], ids=str)
@pytest.mark.parametrize("order", ORDERS)
def test_global_rng_when_no_generator(stoch, order):
    cfg = dict(sampling_steps=6, stochast_ratio=stoch, extrapol_ratio=0.3, sampling_order=order,
               sampling_style="any", rfba_gap_steps=(0.001, 0.0))
    noise = make_noise((2, 3, 4), torch.float32, seed=9)
    s = UnifiedSampler(**cfg)
    torch.manual_seed(42)
    res = s.sample(RecModel(), noise, return_trajectory=True)
    state_impl = torch.get_rng_state()
    torch.manual_seed(42)
    ref, _ = reference_sample(ref_model, noise, **cfg)
    state_ref = torch.get_rng_state()
    _, traj = split_result(res, noise)
    torch.testing.assert_close(traj, ref, **TOL[torch.float32])
    assert torch.equal(state_impl, state_ref), "different number of global-RNG draws"
    # generator=None passed explicitly, plain return
    torch.manual_seed(42)
    x0 = s.sample(RecModel(), noise, generator=None)
    torch.testing.assert_close(x0, ref[-1], **TOL[torch.float32])


def test_generator_reproducible_and_seed_sensitive():
    s = UnifiedSampler(sampling_steps=4, stochast_ratio=0.7)
    noise = make_noise((2, 3, 4), torch.float32)
    a = s.sample(RecModel(), noise, generator=gen(1))
    b = s.sample(RecModel(), noise, generator=gen(1))
    c = s.sample(RecModel(), noise, generator=gen(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_deterministic_mode_does_not_draw():
    s = UnifiedSampler(sampling_steps=5, stochast_ratio=0.0, extrapol_ratio=0.3, sampling_order=2)
    g = gen(3)
    before = g.get_state()
    s.sample(RecModel(), make_noise((2, 3)), generator=g)
    assert torch.equal(g.get_state(), before)


# ----------------------------------------------------------------------------- a model with known answer

@pytest.mark.parametrize("style,order,stoch,extra", MODES[::3] + MODES[1::6],
                         ids=lambda v: str(v))
def test_point_mass_model_recovers_data(style, order, stoch, extra):
    """For data = one point d the exact velocity is (x_t - d)/t, so every x_hat is d in every mode."""
    d = make_noise((2, 3, 4), torch.float64, seed=77)

    def pm(x, *, t, tt):
        return (x - d) / _bcast(t, x)

    s = UnifiedSampler(sampling_steps=7, stochast_ratio=stoch, extrapol_ratio=extra, sampling_order=order,
                       sampling_style=style, rfba_gap_steps=(0.001, 0.0))
    res = s.sample(pm, make_noise((2, 3, 4), torch.float64, seed=1), generator=gen(0), return_trajectory=True)
    _, traj = split_result(res, d)
    torch.testing.assert_close(traj[1:], d.expand_as(traj[1:]), atol=1e-10, rtol=1e-10)


def test_model_ignoring_tt_order1_is_euler():
    """docs/algorithm.md §1: order 1, s = 0 is exactly Euler on the flow ODE."""
    def flow(x, *, t, tt):
        return torch.tanh(x) * _bcast(t, x) + 0.5 * x

    noise = make_noise((3, 5), torch.float64, seed=8)
    s = UnifiedSampler(sampling_steps=6, sampling_style="mul", rfba_gap_steps=(0.001, 0.0))
    res = s.sample(flow, noise, return_trajectory=True)
    _, traj = split_result(res, noise)
    ts = reference_timesteps(6, 1, (1, 1, 1), (0.001, 0.0))
    x = noise.clone()
    for i in range(6):
        tc, tn = float(ts[i]), float(ts[i + 1])
        F = flow(x, t=torch.full((3,), tc, dtype=torch.float64), tt=None)
        torch.testing.assert_close(traj[i + 1], x - tc * F, atol=1e-12, rtol=1e-12)
        x = x - (tc - tn) * F
    torch.testing.assert_close(traj[-1], x, atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- sampling_loop & kwargs

def test_sampling_loop_published_call_shape():
    noise = make_noise((2, 3, 4, 4), torch.float32, seed=12)
    cond = make_noise((2, 1, 4, 4), torch.float32, seed=13)
    s = UnifiedSampler()  # defaults: 20 steps
    m = RecModel()
    traj = s.sampling_loop(noise, m, sampling_steps=4, stochast_ratio=0.0, extrapol_ratio=0.0,
                           sampling_order=1, time_dist_ctrl=[1.0, 1.0, 1.0], rfba_gap_steps=[0.0, 0.0],
                           sampling_style="mul", cond=cond)
    assert isinstance(traj, torch.Tensor)
    assert tuple(traj.shape) == (5, 2, 3, 4, 4)
    assert traj.dtype == noise.dtype
    ref, ref_calls = reference_sample(ref_model, noise, sampling_steps=4, sampling_style="mul", cond=cond)
    torch.testing.assert_close(traj, ref, **TOL[torch.float32])
    assert_calls_match(m.calls, ref_calls, torch.float32, "cpu", 2)
    assert len(m.kwargs) == 4
    for kw in m.kwargs:
        assert set(kw) == {"cond"}
        assert kw["cond"] is cond
    # the cond really changed the result
    no_cond, _ = reference_sample(ref_model, noise, sampling_steps=4, sampling_style="mul")
    assert not torch.allclose(no_cond, traj)


@pytest.mark.parametrize("order", ORDERS)
def test_sampling_loop_overrides_stochastic(order):
    noise = make_noise((2, 3, 4), torch.float64, seed=14)
    s = UnifiedSampler.preset("multi-step")
    over = dict(sampling_steps=6, stochast_ratio="SDE", extrapol_ratio=0.3, sampling_order=order,
                time_dist_ctrl=(0.7, 1.3, 0.9), rfba_gap_steps=(0.05, 0.2), sampling_style="any")
    torch.manual_seed(5)
    traj = s.sampling_loop(noise, RecModel(), **over, scale=0.5)
    torch.manual_seed(5)
    ref, _ = reference_sample(ref_model, noise, **over, scale=0.5)
    torch.testing.assert_close(traj, ref, **TOL[torch.float64])


def test_sampling_loop_without_overrides_uses_sampler_settings():
    noise = make_noise((2, 3, 4), torch.float64, seed=15)
    s = UnifiedSampler(sampling_steps=5, stochast_ratio=0.5, extrapol_ratio=0.3, sampling_order=2,
                       time_dist_ctrl=(1.17, 0.8, 1.1), rfba_gap_steps=(0.001, 0.3), sampling_style="any")
    torch.manual_seed(6)
    traj = s.sampling_loop(noise, RecModel())
    torch.manual_seed(6)
    ref, _ = reference_sample(ref_model, noise, **cfg_of(s))
    torch.testing.assert_close(traj, ref, **TOL[torch.float64])


@pytest.mark.parametrize("fused", [True, False])
def test_sample_forwards_model_kwargs(fused):
    noise = make_noise((2, 3, 4), torch.float32, seed=16)
    cond = make_noise((2, 3, 4), torch.float32, seed=17)
    cfg = dict(sampling_steps=5, stochast_ratio=0.5, sampling_order=2, sampling_style="any")
    s = UnifiedSampler(**cfg)
    s.use_fused_kernel = fused
    m = RecModel()
    res = s.sample(m, noise, generator=gen(1), return_trajectory=True, cond=cond, scale=1.5)
    ref, _ = reference_sample(ref_model, noise, generator=gen(1), cond=cond, scale=1.5, **cfg)
    torch.testing.assert_close(split_result(res, noise)[1], ref, **TOL[torch.float32])
    assert len(m.kwargs) == s.nfe
    for kw in m.kwargs:
        assert set(kw) == {"cond", "scale"}
        assert kw["cond"] is cond and kw["scale"] == 1.5


def test_progress_bar():
    pytest.importorskip("tqdm")
    noise = make_noise((2, 3, 4), torch.float32, seed=18)
    s = UnifiedSampler(sampling_steps=4, stochast_ratio=0.5, sampling_order=2)
    a = s.sample(RecModel(), noise, generator=gen(1), progress=True)
    b = s.sample(RecModel(), noise, generator=gen(1), progress=False)
    assert torch.equal(a, b)
    res = s.sample(RecModel(), noise, generator=gen(1), progress=True, return_trajectory=True)
    assert torch.equal(split_result(res, noise)[0], a)


def test_model_can_be_nn_module():
    class Net(torch.nn.Module):
        def forward(self, x, t, tt):
            return velocity(x, t, tt)

    noise = make_noise((2, 3, 4), torch.float32, seed=19)
    cfg = dict(sampling_steps=5, stochast_ratio=0.5, sampling_order=2, sampling_style="mul")
    x0 = UnifiedSampler(**cfg).sample(Net(), noise, generator=gen(2))
    ref, _ = reference_sample(ref_model, noise, generator=gen(2), **cfg)
    torch.testing.assert_close(x0, ref[-1], **TOL[torch.float32])


# ----------------------------------------------------------------------------- dtypes, shapes, layouts

@pytest.mark.parametrize("fused", [None, True, False], ids=["default", "fused-flag", "ops"])
@pytest.mark.parametrize("stoch", [0.0, 0.5], ids=str)
@pytest.mark.parametrize("style", STYLES)
def test_bfloat16_noise(fused, stoch, style):
    noise32 = make_noise((2, 3, 4, 5), torch.float32, seed=20)
    noise = noise32.to(torch.bfloat16)
    cfg = dict(sampling_steps=6, stochast_ratio=stoch, extrapol_ratio=0.3, sampling_style=style)
    s = UnifiedSampler(**cfg)
    if fused is not None:
        s.use_fused_kernel = fused
    before = noise.clone()
    m = RecModel()
    res = s.sample(m, noise, generator=gen(3), return_trajectory=True)
    sample, traj = split_result(res, noise)
    assert sample.dtype == torch.bfloat16 and traj.dtype == torch.bfloat16
    assert tuple(traj.shape) == (7, 2, 3, 4, 5)
    assert torch.isfinite(traj.float()).all()
    assert torch.equal(noise, before)
    ref, ref_calls = reference_sample(ref_model, noise, generator=gen(3), **cfg)
    torch.testing.assert_close(traj.float(), ref.float(), atol=0.1, rtol=0.05)
    # times handed to the model are bf16 tensors of shape [B] (the float64 grid cast to bf16)
    assert len(m.calls) == len(ref_calls) == s.nfe
    for (_, t, tt), (_, rt, rtt) in zip(m.calls, ref_calls):
        assert t.dtype == tt.dtype == torch.bfloat16 and tuple(t.shape) == tuple(tt.shape) == (2,)
        assert torch.equal(t, rt) and torch.equal(tt, rtt)
    if stoch == 0.0:
        ref32, _ = reference_sample(ref_model, noise32, **cfg)
        torch.testing.assert_close(sample.float(), ref32[-1], atol=0.1, rtol=0.05)


def _linear_model(D, dtype, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(D, D).to(dtype)
    assert lin.weight.requires_grad

    def model(x, *, t, tt):
        return lin(x) * (1 + t[:, None]) + 0.3 * tt[:, None] + 0.1 * torch.sin(x)

    return model


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_model_output_requires_grad(fused, dtype):
    D = 6
    model = _linear_model(D, dtype)
    noise = make_noise((3, D), dtype, seed=21)
    with torch.enable_grad():
        probe = model(noise, t=torch.ones(3, dtype=dtype), tt=torch.zeros(3, dtype=dtype))
    assert probe.requires_grad
    cfg = dict(sampling_steps=5, stochast_ratio=0.5, extrapol_ratio=0.3, sampling_order=2, sampling_style="any")
    s = UnifiedSampler(**cfg)
    s.use_fused_kernel = fused
    with torch.enable_grad():
        res = s.sample(model, noise, generator=gen(4), return_trajectory=True)
    sample, traj = split_result(res, noise)
    assert isinstance(sample, torch.Tensor)
    assert sample.dtype == dtype and tuple(sample.shape) == (3, D)
    with torch.no_grad():
        ref, _ = reference_sample(model, noise, generator=gen(4), **cfg)
    torch.testing.assert_close(traj.detach(), ref, **TOL[dtype])
    torch.testing.assert_close(sample.detach(), ref[-1], **TOL[dtype])


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(
    "shape", [(1, 3, 4, 4), (4, 6), (5,), (1,), (3, 2, 1, 4, 2)], ids=lambda s: "x".join(map(str, s))
)
def test_shapes(shape, fused):
    cfg = dict(sampling_steps=5, stochast_ratio="SDE", extrapol_ratio=0.3, sampling_order=2, sampling_style="mul")
    check_against_reference(cfg, make_noise(shape, torch.float32, seed=22), fused=fused)
    check_against_reference(cfg, make_noise(shape, torch.float64, seed=23), fused=fused)


def _noncontig_transposed(x, *, t, tt):
    v = velocity(x, t, tt)
    out = v.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not out.is_contiguous()
    return out


def _noncontig_strided(x, *, t, tt):
    v = velocity(x, t, tt)
    big = torch.empty(v.shape[:-1] + (2 * v.shape[-1],), dtype=v.dtype)
    big[..., ::2] = v
    out = big[..., ::2]
    assert not out.is_contiguous()
    return out


def _noncontig_expanded(x, *, t, tt):
    v = velocity(x, t, tt)[:, :1]
    out = v.expand(x.shape)
    assert not out.is_contiguous()
    return out


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("model", [_noncontig_transposed, _noncontig_strided, _noncontig_expanded],
                         ids=["transposed", "strided", "expanded"])
def test_model_returning_non_contiguous(model, dtype, fused):
    noise = make_noise((2, 3, 4, 5), dtype, seed=24)
    cfg = dict(sampling_steps=6, stochast_ratio=0.5, extrapol_ratio=0.3, sampling_order=2, sampling_style="any")
    s = UnifiedSampler(**cfg)
    s.use_fused_kernel = fused
    res = s.sample(model, noise, generator=gen(5), return_trajectory=True)
    ref, _ = reference_sample(model, noise, generator=gen(5), **cfg)
    torch.testing.assert_close(split_result(res, noise)[1], ref, **TOL[dtype])


@pytest.mark.parametrize("fused", [True, False])
def test_non_contiguous_noise(fused):
    base = make_noise((2, 5, 4, 3), torch.float32, seed=25)
    noise = base.transpose(1, 3)
    assert not noise.is_contiguous()
    before = noise.clone()
    cfg = dict(sampling_steps=5, stochast_ratio=0.5, extrapol_ratio=0.3, sampling_style="mul")
    s = UnifiedSampler(**cfg)
    s.use_fused_kernel = fused
    res = s.sample(RecModel(), noise, generator=gen(6), return_trajectory=True)
    ref, _ = reference_sample(ref_model, noise.contiguous(), generator=gen(6), **cfg)
    torch.testing.assert_close(split_result(res, noise)[1], ref, **TOL[torch.float32])
    assert torch.equal(noise, before)


def test_sampler_is_reusable_and_independent_of_previous_runs():
    s = UnifiedSampler(sampling_steps=5, stochast_ratio=0.5, extrapol_ratio=0.3, sampling_order=2)
    n1 = make_noise((2, 3, 4), torch.float32, seed=26)
    n2 = make_noise((4, 3), torch.float64, seed=27)
    a1 = s.sample(RecModel(), n1, generator=gen(1))
    s.sample(RecModel(), n2, generator=gen(1))
    a2 = s.sample(RecModel(), n1, generator=gen(1))
    assert torch.equal(a1, a2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_cuda_noise(dtype):
    cfg = dict(sampling_steps=6, stochast_ratio="SDE", extrapol_ratio=0.3, sampling_order=2, sampling_style="any")
    noise = make_noise((2, 3, 4, 5), dtype, seed=28, device="cuda")
    check_against_reference(cfg, noise, seed=9)
