"""twinflow.TwinFlowScheduler: the UnifiedSampler (docs/algorithm.md §2) as a diffusers scheduler.

What is checked (CPU, small tensors, a few seconds in all):

* with s = 0, order 1 and ``time_grid="pipeline"`` it reproduces
  ``diffusers.FlowMatchEulerDiscreteScheduler`` on the same sigmas;
* a plain diffusers-style loop (``for t in s.timesteps: v = model(x, t); x = s.step(v, t, x)``)
  equals ``twinflow.UnifiedSampler.sample`` for every style / order / stochastic ratio /
  extrapolation, with the same model calls, the same ``tt`` (read from ``s.tt``) and the
  same random draws when a generator is given to ``step``;
* the time grids (``ucgm`` against the independent ``ucgm_reference``, order-2 duplication),
  presets, ``from_config`` of a FlowMatchEuler config, ``save_pretrained``/``from_pretrained``;
* reproducibility without a generator (internal generator seeded from the first sample);
* ``s.tt`` is one persistent tensor updated in place;
* ``scale_noise``, ``scale_model_input``, ``step_index``/``begin_index``/``set_begin_index``;
* errors are ``ValueError`` naming the field, never a leaked Rust panic;
* a stock ``StableDiffusion3Pipeline`` end to end with a tiny transformer and VAE.

The SD3 pipeline is the stock one (diffusers + transformers installed) with a tiny
random-weight transformer and VAE and no text encoders: prompt embeddings are passed directly.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch


from checks import PATH_SETTINGS, expect_error  # noqa: E402
from ucgm_reference import reference_nfe, reference_timesteps, style_tt  # noqa: E402

diffusers = pytest.importorskip("diffusers")

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.configuration_utils import ConfigMixin  # noqa: E402
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: E402

from twinflow import TwinFlowScheduler, UnifiedSampler  # noqa: E402

N_TRAIN = 1000
STYLES = ("few", "mul", "any")
# the scheduler takes the step count in set_timesteps, not in its config
OUR_KEYS = ("num_train_timesteps", *(k for k in PATH_SETTINGS if k != "sampling_steps"), "time_grid")

# ----------------------------------------------------------------------------- helpers


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    v = v.reshape(-1)
    if v.numel() == 1:
        v = v.expand(x.shape[0])
    return v.reshape(x.shape[0], *([1] * (x.dim() - 1))).to(x.dtype)


def velocity(x, t, tt):
    """Deterministic, nontrivial velocity of x, t and tt (t, tt in [0, 1], shape [B] or [1])."""
    tb, ttb = _bcast(t, x), _bcast(tt, x)
    return torch.sin(x) * (1 + tb) + 0.3 * ttb + 0.2 * torch.cos(x) * ttb + 0.1 * x


class RecModel:
    """UnifiedSampler model: keyword t / tt; records (x, t, tt) of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, *, t, tt, **kw):
        assert not kw
        self.calls.append((x.clone(), t.clone(), tt.clone()))
        return velocity(x, t, tt)


def make_noise(shape=(2, 3, 4, 5), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def gen(seed=1234):
    return torch.Generator().manual_seed(seed)


def run_loop(s, x, *, generator=None, calls=None):
    """The diffusers denoising loop. Model sees t = timestep / num_train_timesteps and tt = s.tt."""
    B = x.shape[0]
    for ts in s.timesteps:
        t = (ts / s.config.num_train_timesteps).to(x.dtype).reshape(1).expand(B)
        tt = s.tt.detach().reshape(1).to(x.dtype).expand(B).clone()
        if calls is not None:
            calls.append((x.clone(), t.clone(), tt.clone()))
        v = velocity(x, t, tt)
        x = s.step(v, ts, x, generator=generator).prev_sample
    return x


def eval_times(grid, order):
    """Per-evaluation times of docs/algorithm.md §2 for a grid t_0 > ... > t_n = 0 (list of floats)."""
    n = len(grid) - 1
    if order == 1:
        return list(grid[:-1])
    ev = []
    for i in range(n - 1):
        ev += [grid[i], grid[i + 1]]
    ev.append(grid[n - 1])
    return ev


def eval_tts(grid, order, style):
    """tt before each model call (few -> 0, mul -> t, any -> next t; corrector: tt at t_n)."""
    n = len(grid) - 1
    out = []
    for i in range(n):
        t_c, t_n = grid[i], grid[i + 1]
        out.append(style_tt(style, t_c, t_n))
        if order == 2 and i < n - 1:
            out.append(style_tt(style, t_n, t_n))
    return out


def cfg_dict(s):
    return {k: s.config[k] for k in OUR_KEYS}


def _norm(v):
    return list(v) if isinstance(v, (tuple, list)) else v


# ----------------------------------------------------------------------------- basics


def test_is_a_diffusers_scheduler():
    s = TwinFlowScheduler()
    assert isinstance(s, SchedulerMixin) and isinstance(s, ConfigMixin)
    assert TwinFlowScheduler.order == 1 and s.order == 1
    assert s.init_noise_sigma == 1.0
    for k in OUR_KEYS:
        assert k in s.config, k
    assert s.config.num_train_timesteps == 1000
    assert s.config.time_grid == "ucgm"
    assert s.config.sampling_style == "few"


def _smooth_model(x, t):
    """A smooth velocity field of (x, t), t in [0, 1000] as SD3 passes it."""
    tb = _bcast(t / 1000.0, x)
    return torch.sin(x) * (1 + tb) + 0.1 * x + 0.3 * tb


def _diffusers_loop(scheduler, x0):
    """``for t in timesteps: x = step(model(x, t), t, x)`` from x0, as a pipeline runs it."""
    x = x0.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(_smooth_model(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("order", (1, 2))
@pytest.mark.parametrize("S", (1, 2, 3, 4, 7))
@pytest.mark.parametrize(
    "tdc,gaps",
    [((1.0, 1.0, 1.0), (0.0, 0.0)), ((1.17, 0.8, 1.1), (0.001, 0.0)), ((1.0, 1.0, 1.0), (0.001, 0.5))],
    ids=["plain", "warped", "gaps"],
)
def test_ucgm_grid(order, S, tdc, gaps):
    s = TwinFlowScheduler(sampling_order=order, time_dist_ctrl=tdc, rfba_gap_steps=gaps)
    s.set_timesteps(S)
    grid = reference_timesteps(S, order, tdc, gaps).tolist()
    ev = eval_times(grid, order)
    assert len(s.timesteps) == reference_nfe(S, order) == len(ev)
    assert s.timesteps.dtype == torch.float32 and s.sigmas.dtype == torch.float32
    assert s.timesteps.device.type == "cpu" and s.sigmas.device.type == "cpu"
    want_sigmas = torch.tensor(ev + [0.0], dtype=torch.float64).float()
    torch.testing.assert_close(s.sigmas, want_sigmas, atol=1e-7, rtol=0)
    assert float(s.sigmas[-1]) == 0.0
    want_ts = (torch.tensor(ev, dtype=torch.float64) * N_TRAIN).float()
    torch.testing.assert_close(s.timesteps, want_ts, atol=1e-4, rtol=1e-6)
    if order == 2:
        assert s.order == 1  # order 2 is done through duplicated timesteps
    assert s.step_index is None
    assert s.begin_index is None


# ----------------------------------------------------------------------------- 1. Euler parity


@pytest.mark.parametrize("n", (1, 2, 3, 8, 28))
@pytest.mark.parametrize("form", ("list", "numpy", "list+n"))
def test_pipeline_grid_matches_flow_match_euler(n, form):
    ref = FlowMatchEulerDiscreteScheduler(shift=1.0)
    ref.set_timesteps(n)
    sig = ref.sigmas[:-1]
    sig_arg = sig.numpy().copy() if form == "numpy" else sig.tolist()

    s = TwinFlowScheduler(stochast_ratio=0.0, sampling_order=1, time_grid="pipeline")
    if form == "list+n":
        s.set_timesteps(n, sigmas=sig_arg, mu=0.5)
    else:
        s.set_timesteps(sigmas=sig_arg)
    assert len(s.timesteps) == n
    torch.testing.assert_close(s.sigmas, ref.sigmas.float(), atol=1e-7, rtol=0)
    torch.testing.assert_close(s.timesteps, ref.timesteps.float(), atol=1e-3, rtol=1e-6)

    x0 = make_noise((2, 4, 8, 8), seed=3)
    xa, xb = _diffusers_loop(ref, x0), _diffusers_loop(s, x0)
    assert xb.dtype == torch.float32 and xb.shape == x0.shape
    torch.testing.assert_close(xb, xa, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", (1, 2, 3, 6))
def test_pipeline_grid_order2_matches_flow_match_heun(n):
    """Order 2 on the pipeline grid is Heun with duplicated timesteps, like FlowMatchHeunDiscreteScheduler."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    ref = FlowMatchHeunDiscreteScheduler(shift=1.0)
    ref.set_timesteps(n)
    grid = FlowMatchEulerDiscreteScheduler(shift=1.0)
    grid.set_timesteps(n)
    s = TwinFlowScheduler(stochast_ratio=0.0, sampling_order=2, time_grid="pipeline")
    s.set_timesteps(sigmas=grid.sigmas[:-1].tolist())
    assert len(s.timesteps) == len(ref.timesteps) == 2 * n - 1
    torch.testing.assert_close(s.timesteps, ref.timesteps.float(), atol=1e-3, rtol=1e-6)
    torch.testing.assert_close(s.sigmas, ref.sigmas.float(), atol=1e-7, rtol=0)

    x0 = make_noise((2, 4, 8, 8), seed=4)
    xa, xb = _diffusers_loop(ref, x0), _diffusers_loop(s, x0)
    # diffusers' Heun goes through x0 = x - sigma*v and (x - x0)/sigma, which loses ~1e-5 absolute
    # at sigma = 0.001 in float32; against a float64 Heun on the same grid ours is float-exact
    torch.testing.assert_close(xb, xa, rtol=1e-4, atol=2e-4)
    g = s.sigmas.double().tolist()
    ev = [g[0]] + g[1:-1:2]  # t_0, t_1, ..., t_{n-1}, then 0
    ev.append(0.0)
    x = x0.double()
    for i in range(n):
        tc, tn = ev[i], ev[i + 1]
        F = _smooth_model(x, torch.tensor(tc * 1000, dtype=torch.float32).double())
        xp = x - (tc - tn) * F
        if i < n - 1:
            xp = x - (tc - tn) * 0.5 * (F + _smooth_model(xp, torch.tensor(tn * 1000, dtype=torch.float32).double()))
        x = xp
    torch.testing.assert_close(xb.double(), x, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- 2. loop == UnifiedSampler

GRIDS = [((1.0, 1.0, 1.0), (0.0, 0.0)), ((1.17, 0.8, 1.1), (0.001, 0.5))]


def _check_loop_vs_sampler(cfg, S, noise, seed=77):
    s = TwinFlowScheduler(**cfg)
    s.set_timesteps(S)
    u = UnifiedSampler(sampling_steps=S, **cfg)

    m = RecModel()
    g_ref = gen(seed)
    want = u.sample(m, noise.clone(), generator=g_ref)

    calls = []
    g_sch = gen(seed)
    got = run_loop(s, noise.clone(), generator=g_sch, calls=calls)

    assert len(calls) == u.nfe == len(s.timesteps) == len(m.calls)
    grid = reference_timesteps(S, cfg["sampling_order"], cfg["time_dist_ctrl"], cfg["rfba_gap_steps"]).tolist()
    want_tt = eval_tts(grid, cfg["sampling_order"], cfg["sampling_style"])
    for k, ((gx, gt, gtt), (wx, wt, wtt)) in enumerate(zip(calls, m.calls)):
        torch.testing.assert_close(gt, wt, atol=1e-6, rtol=0, msg=lambda e: f"call {k} t: {e}")
        torch.testing.assert_close(gtt, wtt, atol=1e-7, rtol=0, msg=lambda e: f"call {k} tt (s.tt): {e}")
        assert abs(float(gtt[0]) - want_tt[k]) < 1e-6, f"call {k}: s.tt {float(gtt[0])} != {want_tt[k]}"
        assert 0.0 <= float(gtt[0]) <= 1.0
        torch.testing.assert_close(gx, wx, atol=2e-5, rtol=2e-5, msg=lambda e: f"call {k} x: {e}")
    assert got.dtype == noise.dtype and got.shape == noise.shape
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert torch.equal(g_sch.get_state(), g_ref.get_state()), "different number of noise draws"
    return s


@pytest.mark.parametrize("grid", GRIDS, ids=["plain", "warped-gaps"])
@pytest.mark.parametrize("extra", (0.0, 0.3), ids=lambda v: f"r{v}")
@pytest.mark.parametrize("stoch", (0.0, 1.0, "SDE"), ids=lambda v: f"s{v}")
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("order", (1, 2), ids=lambda v: f"o{v}")
def test_loop_matches_unified_sampler(order, style, stoch, extra, grid):
    tdc, gaps = grid
    cfg = dict(stochast_ratio=stoch, extrapol_ratio=extra, sampling_order=order,
               time_dist_ctrl=tdc, rfba_gap_steps=gaps, sampling_style=style)
    _check_loop_vs_sampler(cfg, 6, make_noise(seed=order))


@pytest.mark.parametrize("order", (1, 2), ids=lambda v: f"o{v}")
@pytest.mark.parametrize("S", (1, 2, 3, 5))
def test_loop_matches_unified_sampler_short(order, S):
    cfg = dict(stochast_ratio=0.5, extrapol_ratio=0.3, sampling_order=order,
               time_dist_ctrl=(1.0, 1.0, 1.0), rfba_gap_steps=(0.001, 0.5), sampling_style="any")
    _check_loop_vs_sampler(cfg, S, make_noise(seed=S))


@pytest.mark.parametrize("order", (1, 2), ids=lambda v: f"o{v}")
def test_loop_matches_unified_sampler_float64(order):
    cfg = dict(stochast_ratio="SDE", extrapol_ratio=0.3, sampling_order=order,
               time_dist_ctrl=(1.0, 1.0, 1.0), rfba_gap_steps=(0.0, 0.0), sampling_style="mul")
    _check_loop_vs_sampler(cfg, 6, make_noise(dtype=torch.float64, seed=5))


def test_step_return_tuple_and_noise_draws():
    """return_dict=False gives a tuple whose [0] is prev_sample; the draws are torch.randn(..., generator)."""
    s = TwinFlowScheduler(stochast_ratio=1.0)
    s.set_timesteps(2)
    x = make_noise(seed=9)
    ts = s.timesteps[0]
    t_c, t_n = float(s.sigmas[0]), float(s.sigmas[1])
    assert t_n > 0
    out = s.step(torch.zeros_like(x), ts, x, generator=gen(5), return_dict=False)
    assert isinstance(out, tuple)
    x1 = out[0]
    # with F = 0 and s = 1: x1 = (1 - t_n) x + t_n eps
    eps = (x1.double() - (1 - t_n) * x.double()) / t_n
    want = torch.randn(x.shape, generator=gen(5), dtype=x.dtype)
    torch.testing.assert_close(eps.float(), want, atol=1e-5, rtol=1e-5)
    # the tuple and the dataclass agree
    s2 = TwinFlowScheduler(stochast_ratio=1.0)
    s2.set_timesteps(2)
    assert torch.equal(s2.step(torch.zeros_like(x), ts, x, generator=gen(5)).prev_sample, x1)


# ----------------------------------------------------------------------------- 3. from_config / save / load


def test_from_flow_match_config_ignores_shift_and_mu():
    fm = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    s = TwinFlowScheduler.from_config(fm.config, stochast_ratio=1.0, sampling_style="any")
    assert isinstance(s, TwinFlowScheduler)
    assert s.config.stochast_ratio == 1.0
    assert s.config.sampling_style == "any"
    assert s.config.num_train_timesteps == 1000
    assert s.config.time_grid == "ucgm"
    grid = reference_timesteps(4).float()
    # like QwenImage / Z-Image: sigmas and mu always passed; the UCGM grid ignores both
    s.set_timesteps(4, sigmas=np.linspace(1.0, 0.25, 4), mu=0.8)
    torch.testing.assert_close(s.sigmas, grid, atol=1e-7, rtol=0)
    s.set_timesteps(4, mu=1.1)
    torch.testing.assert_close(s.sigmas, grid, atol=1e-7, rtol=0)
    s.set_timesteps(num_inference_steps=4)
    torch.testing.assert_close(s.sigmas, grid, atol=1e-7, rtol=0)
    # the override also acts: s = 1 draws noise
    x = make_noise(seed=1)
    a = run_loop(s, x, generator=gen(1))
    s.set_timesteps(4)
    b = run_loop(s, x, generator=gen(2))
    assert not torch.allclose(a, b)


def test_from_config_of_own_config_and_overrides():
    s = TwinFlowScheduler(stochast_ratio=0.5, sampling_order=2, sampling_style="mul")
    s2 = TwinFlowScheduler.from_config(s.config, extrapol_ratio=0.2)
    d = cfg_dict(s2)
    assert d["stochast_ratio"] == 0.5 and d["sampling_order"] == 2 and d["sampling_style"] == "mul"
    assert d["extrapol_ratio"] == 0.2


def test_save_load_round_trip(tmp_path):
    s = TwinFlowScheduler(num_train_timesteps=1000, stochast_ratio="SDE", extrapol_ratio=0.3, sampling_order=2,
                          time_dist_ctrl=(1.17, 0.8, 1.1), rfba_gap_steps=(0.001, 0.5), sampling_style="any",
                          time_grid="ucgm")
    s.save_pretrained(str(tmp_path))
    files = os.listdir(tmp_path)
    assert "scheduler_config.json" in files, files
    with open(tmp_path / "scheduler_config.json") as f:
        saved = json.load(f)
    assert saved["_class_name"] == "TwinFlowScheduler"
    s2 = TwinFlowScheduler.from_pretrained(str(tmp_path))
    assert isinstance(s2, TwinFlowScheduler)
    for k in OUR_KEYS:
        assert k in saved, k
        assert _norm(s2.config[k]) == _norm(s.config[k]), (k, s2.config[k], s.config[k])
    s.set_timesteps(7)
    s2.set_timesteps(7)
    assert torch.equal(s.timesteps, s2.timesteps) and torch.equal(s.sigmas, s2.sigmas)
    x = make_noise(seed=4)
    assert torch.equal(run_loop(s, x, generator=gen(3)), run_loop(s2, x, generator=gen(3)))
    # and without a generator (internal generator from the first sample)
    s.set_timesteps(7)
    s2.set_timesteps(7)
    assert torch.equal(run_loop(s, x), run_loop(s2, x))


# ----------------------------------------------------------------------------- 4. presets


@pytest.mark.parametrize("name", ("1-nfe", "2-nfe", "4-nfe", "any-step", "multi-step"))
def test_presets(name):
    u = UnifiedSampler.preset(name)
    s = TwinFlowScheduler.preset(name)
    assert isinstance(s, TwinFlowScheduler)
    assert s.config.stochast_ratio == u.stochast_ratio
    assert s.config.extrapol_ratio == u.extrapol_ratio
    assert s.config.sampling_order == u.sampling_order
    assert _norm(s.config.time_dist_ctrl) == _norm(u.time_dist_ctrl)
    assert _norm(s.config.rfba_gap_steps) == _norm(u.rfba_gap_steps)
    assert s.config.sampling_style == u.sampling_style
    s.set_timesteps(u.sampling_steps)
    want = (u.timesteps[:-1] * 1000).float()
    assert len(s.timesteps) == u.nfe
    torch.testing.assert_close(s.timesteps, want, atol=1e-4, rtol=1e-6)


def test_preset_unknown_name():
    expect_error(ValueError, lambda: TwinFlowScheduler.preset("3-nfe"))


# ----------------------------------------------------------------------------- 5. reproducibility without generator


def _first_eps(s, x):
    """One step with F = 0 at s = 1 recovers the ε the scheduler drew: x1 = (1 - t_n) x + t_n ε."""
    s.set_timesteps(2)
    t_n = float(s.sigmas[1])
    x1 = s.step(torch.zeros_like(x), s.timesteps[0], x).prev_sample
    return ((x1.double() - (1 - t_n) * x.double()) / t_n).float()


def test_no_generator_reproducible_from_latents():
    xa = make_noise((2, 4, 16, 16), seed=10)
    xb = make_noise((2, 4, 16, 16), seed=11)

    def fresh():
        return TwinFlowScheduler(stochast_ratio=1.0)

    torch.manual_seed(1)
    rng_before = torch.get_rng_state()
    ea1 = _first_eps(fresh(), xa)
    assert torch.equal(torch.get_rng_state(), rng_before), "the global RNG was used"
    torch.manual_seed(2)  # the global RNG does not matter
    ea2 = _first_eps(fresh(), xa.clone())
    eb = _first_eps(fresh(), xb)
    assert torch.equal(ea1, ea2)
    assert not torch.allclose(ea1, eb, atol=1e-3), "different latents must give different noise"
    for e in (ea1, eb):
        assert abs(float(e.mean())) < 0.15 and 0.85 < float(e.std()) < 1.15, "ε is not standard normal"
    # not the noise a fixed seed (generator=) would have given, nor the latents themselves
    assert not torch.allclose(ea1, xa, atol=1e-3)

    # whole loops: same latents -> identical output, different latents -> different noise
    cfg = dict(stochast_ratio=1.0, sampling_order=1, sampling_style="few")
    outs = []
    for x in (xa, xa.clone(), xb):
        s = TwinFlowScheduler(**cfg)
        s.set_timesteps(4)
        outs.append(run_loop(s, x))
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])


def test_no_generator_vs_generator_both_deterministic():
    x = make_noise(seed=12)
    cfg = dict(stochast_ratio=1.0, sampling_order=2, sampling_style="any")

    def loop(generator_seed=None):
        s = TwinFlowScheduler(**cfg)
        s.set_timesteps(5)
        return run_loop(s, x, generator=None if generator_seed is None else gen(generator_seed))

    a1, a2 = loop(), loop()
    g1, g2 = loop(3), loop(3)
    assert torch.equal(a1, a2) and torch.equal(g1, g2)
    assert not torch.allclose(a1, g1)  # with generator= the given generator is used
    # the generator given is the one drawn from: UnifiedSampler with that generator agrees
    u = UnifiedSampler(sampling_steps=5, **cfg)
    torch.testing.assert_close(g1, u.sample(RecModel(), x.clone(), generator=gen(3)), atol=2e-5, rtol=2e-5)


def test_set_timesteps_resets_internal_generator():
    xa = make_noise((2, 4, 8, 8), seed=20)
    xb = make_noise((2, 4, 8, 8), seed=21)
    s = TwinFlowScheduler(stochast_ratio=1.0)
    e1 = _first_eps(s, xa)
    e2 = _first_eps(s, xa)  # set_timesteps again: same first sample -> same ε
    assert torch.equal(e1, e2)
    eb = _first_eps(s, xb)  # a reused scheduler is seeded from the new first sample
    assert torch.equal(eb, _first_eps(TwinFlowScheduler(stochast_ratio=1.0), xb))
    # full loops on a reused scheduler
    s.set_timesteps(4)
    la = run_loop(s, xa)
    s.set_timesteps(4)
    lb = run_loop(s, xb)
    s.set_timesteps(4)
    la2 = run_loop(s, xa)
    assert torch.equal(la, la2)
    f = TwinFlowScheduler(stochast_ratio=1.0)
    f.set_timesteps(4)
    assert torch.equal(lb, run_loop(f, xb))


# ----------------------------------------------------------------------------- 6. s.tt


@pytest.mark.parametrize("order", (1, 2))
@pytest.mark.parametrize("style", STYLES)
def test_tt_is_one_persistent_tensor(style, order):
    s = TwinFlowScheduler(sampling_style=style, sampling_order=order, rfba_gap_steps=(0.001, 0.5))
    s.set_timesteps(5, device="cpu")
    tt = s.tt
    ptr = tt.data_ptr()
    assert isinstance(tt, torch.Tensor)
    assert tt.dtype == torch.float32 and tt.numel() == 1 and tt.device.type == "cpu"
    for S in (5, 3, 6):
        s.set_timesteps(S)
        assert s.tt is tt and s.tt.data_ptr() == ptr
        grid = reference_timesteps(S, order, (1.0, 1.0, 1.0), (0.001, 0.5)).tolist()
        want = eval_tts(grid, order, style)
        x = make_noise(seed=S)
        for k, ts in enumerate(s.timesteps):
            assert s.tt is tt and tt.data_ptr() == ptr, f"S={S} call {k}: s.tt replaced"
            assert abs(float(tt.reshape(())) - want[k]) < 1e-6, f"S={S} call {k}: tt {float(tt)} != {want[k]}"
            v = velocity(x, ts.reshape(1) / 1000, tt.reshape(1))
            x = s.step(v, ts, x).prev_sample
        assert s.tt is tt and tt.data_ptr() == ptr
        assert 0.0 <= float(tt) <= 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_placement_and_parity():
    s = TwinFlowScheduler(stochast_ratio=0.0, sampling_order=2, sampling_style="any", extrapol_ratio=0.3)
    s.set_timesteps(6, device="cuda")
    assert s.timesteps.device.type == "cuda" and s.tt.device.type == "cuda"
    x = make_noise(seed=2)
    got = run_loop(s, x.cuda())
    assert got.device.type == "cuda"
    c = TwinFlowScheduler(stochast_ratio=0.0, sampling_order=2, sampling_style="any", extrapol_ratio=0.3)
    c.set_timesteps(6)
    torch.testing.assert_close(got.cpu(), run_loop(c, x), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- 7. small API


def test_scale_noise_and_scale_model_input():
    s = TwinFlowScheduler()
    s.set_timesteps(4)
    x = make_noise((2, 3, 4, 4), seed=1)
    z = make_noise((2, 3, 4, 4), seed=2)
    for t in (1000.0, 750.0, 250.0, 1.0):
        got = s.scale_noise(x, torch.tensor([t]), z)
        sig = t / 1000.0
        torch.testing.assert_close(got, sig * z + (1 - sig) * x, atol=1e-6, rtol=1e-6)
    # per-sample timesteps, like FlowMatchEulerDiscreteScheduler.scale_noise
    got = s.scale_noise(x, torch.tensor([800.0, 200.0]), z)
    sig = torch.tensor([0.8, 0.2]).reshape(2, 1, 1, 1)
    torch.testing.assert_close(got, sig * z + (1 - sig) * x, atol=1e-6, rtol=1e-6)
    # scale_model_input: identity
    y = s.scale_model_input(x, s.timesteps[0])
    assert torch.equal(y, x)


def test_step_index_and_begin_index():
    cfg = dict(stochast_ratio=0.0, sampling_order=1, sampling_style="mul")
    s = TwinFlowScheduler(**cfg)
    s.set_timesteps(6)
    assert s.step_index is None and s.begin_index is None
    x = make_noise(seed=6)
    xs = [x]
    for j, ts in enumerate(s.timesteps):
        v = velocity(x, ts.reshape(1) / 1000, s.tt.reshape(1))
        x = s.step(v, ts, x).prev_sample
        assert s.step_index == j + 1
        xs.append(x)
    full = x
    # set_timesteps resets the step index
    s.set_timesteps(6)
    assert s.step_index is None and s.begin_index is None
    for k in (1, 3, 5):
        s2 = TwinFlowScheduler(**cfg)
        s2.set_timesteps(6)
        s2.set_begin_index(k)
        assert s2.begin_index == k
        # tt for the first call after set_begin_index is not checked here (it is set for the next call
        # of the ordinary sequence); the model here reads the time from the timestep only
        x = xs[k]
        for j, ts in enumerate(s2.timesteps[k:]):
            t = ts.reshape(1) / 1000
            v = velocity(x, t, t)  # style "mul": tt = t
            x = s2.step(v, ts, x).prev_sample
            assert s2.step_index == k + j + 1
        torch.testing.assert_close(x, full, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- 8. errors

BAD_SETTINGS = [
    ("stochast_ratio", 2.0),
    ("stochast_ratio", -0.1),
    ("stochast_ratio", "ODE"),
    ("stochast_ratio", float("nan")),
    ("extrapol_ratio", -1.0),
    ("sampling_order", 3),
    ("sampling_order", 0),
    ("time_dist_ctrl", (0.0, 1.0, 1.0)),
    ("time_dist_ctrl", (1.0, -1.0, 1.0)),
    ("rfba_gap_steps", (-0.1, 0.0)),
    ("rfba_gap_steps", (0.6, 0.5)),
    ("sampling_style", "bogus"),
    ("time_grid", "bogus"),
]


@pytest.mark.parametrize("field,value", BAD_SETTINGS, ids=lambda v: str(v))
def test_invalid_settings(field, value):
    # at construction or, at the latest, at set_timesteps
    def go():
        s = TwinFlowScheduler(**{field: value})
        s.set_timesteps(4)

    expect_error(ValueError, go, contains=field)


@pytest.mark.parametrize("field,value", BAD_SETTINGS[:3] + BAD_SETTINGS[-2:], ids=lambda v: str(v))
def test_invalid_settings_via_from_config(field, value):
    fm = FlowMatchEulerDiscreteScheduler()

    def go():
        s = TwinFlowScheduler.from_config(fm.config, **{field: value})
        s.set_timesteps(4)

    expect_error(ValueError, go, contains=field)


@pytest.mark.parametrize("n", (0, -1))
def test_zero_steps(n):
    s = TwinFlowScheduler()
    expect_error(ValueError, lambda: s.set_timesteps(n), contains=(("sampling_steps", "num_inference_steps"),))


@pytest.mark.parametrize("stock_kw,mu", [({}, None), ({"shift": 3.0}, None),
                                         ({"use_dynamic_shifting": True, "time_shift_type": "exponential"}, 0.8)],
                         ids=["default", "shift-3", "dynamic"])
def test_pipeline_grid_without_sigmas_is_the_stock_schedule(stock_kw, mu):
    """A pipeline that passes no sigmas (StableDiffusion3Pipeline) gets the sigmas the stock
    FlowMatchEuler scheduler of the same config would run for that step count."""
    stock = FlowMatchEulerDiscreteScheduler(**stock_kw)
    s = TwinFlowScheduler.from_config(stock.config, time_grid="pipeline")
    for n in (1, 4, 7):
        stock.set_timesteps(n, mu=mu)
        s.set_timesteps(n, mu=mu)
        assert torch.equal(s.sigmas, stock.sigmas.to(torch.float32)), n
        torch.testing.assert_close(s.timesteps, stock.timesteps.to(torch.float32), rtol=0, atol=1e-3)


def test_pipeline_grid_without_sigmas_needs_a_step_count():
    s = TwinFlowScheduler(time_grid="pipeline")
    expect_error(ValueError, lambda: s.set_timesteps(), contains="num_inference_steps")
    expect_error(ValueError, lambda: s.set_timesteps(0), contains="num_inference_steps")
    dynamic = TwinFlowScheduler.from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config,
                                            time_grid="pipeline")
    expect_error(ValueError, lambda: dynamic.set_timesteps(4), contains="mu")


@pytest.mark.parametrize(
    "sigmas",
    [[0.5, 0.8, 0.2], [1.0, 0.5, 0.5], [1.5, 0.5], [1.0, 0.0, 0.5], [1.0, float("nan")], [1.0, -0.2], []],
    ids=["ascending", "repeated", "above-1", "inner-zero", "nan", "negative", "empty"],
)
def test_pipeline_grid_rejects_bad_sigmas(sigmas):
    s = TwinFlowScheduler(time_grid="pipeline")
    expect_error(ValueError, lambda: s.set_timesteps(sigmas=sigmas), contains="sigmas")


def test_pipeline_grid_trailing_zero_is_the_terminal():
    """sigmas that already end in the terminal 0 give the same schedule as without it."""
    a = TwinFlowScheduler(time_grid="pipeline")
    a.set_timesteps(sigmas=[1.0, 0.6, 0.2])
    b = TwinFlowScheduler(time_grid="pipeline")
    b.set_timesteps(sigmas=[1.0, 0.6, 0.2, 0.0])
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas)
    assert len(a.timesteps) == 3


@pytest.mark.parametrize("order", (1, 2))
def test_step_past_the_end(order):
    s = TwinFlowScheduler(sampling_order=order)
    s.set_timesteps(3)
    x = make_noise(seed=0)
    x = run_loop(s, x)
    expect_error(ValueError, lambda: s.step(torch.zeros_like(x), s.timesteps[-1], x))
    # set_timesteps makes it usable again
    s.set_timesteps(3)
    run_loop(s, make_noise(seed=0))


def test_step_before_set_timesteps_is_an_error_not_a_panic():
    s = TwinFlowScheduler()
    x = make_noise(seed=0)
    expect_error(Exception, lambda: s.step(torch.zeros_like(x), torch.tensor(1000.0), x))


def test_step_shape_mismatch_is_an_error_not_a_panic():
    s = TwinFlowScheduler()
    s.set_timesteps(2)
    x = make_noise((2, 3, 4, 5), seed=0)
    expect_error((ValueError, RuntimeError), lambda: s.step(torch.zeros(2, 3, 4, 6), s.timesteps[0], x))


# ----------------------------------------------------------------------------- 9. SD3 pipeline, end to end

TINY_TRANSFORMER = dict(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                        pooled_projection_dim=64, out_channels=4)
TINY_VAE = dict(block_out_channels=(4,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=1, sample_size=32,
                use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def _tiny_models():
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(**TINY_TRANSFORMER).eval()
    vae = AutoencoderKL(**TINY_VAE).eval()
    return tr, vae


@pytest.fixture(scope="module")
def sd3():
    from diffusers import StableDiffusion3Pipeline

    tr, vae = _tiny_models()
    # No text encoders: the tests pass prompt embeddings directly.
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(123)
    emb = dict(prompt_embeds=torch.randn(1, 7, 32, generator=g),
               pooled_prompt_embeds=torch.randn(1, 64, generator=g),
               negative_prompt_embeds=torch.randn(1, 7, 32, generator=g),
               negative_pooled_prompt_embeds=torch.randn(1, 64, generator=g))
    calls = []
    hook = tr.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(kwargs["timestep"].detach().clone()), with_kwargs=True)
    yield pipe, emb, calls
    hook.remove()


def _run_pipe(pipe, emb, calls, *, seed=0, **kw):
    calls.clear()
    kw.setdefault("guidance_scale", 1.0)
    kw.setdefault("output_type", "pt")
    out = pipe(**emb, height=32, width=32, generator=torch.Generator().manual_seed(seed), **kw)
    return out.images


SD3_CASES = [
    (1, dict(stochast_ratio=0.8, rfba_gap_steps=(0.001, 0.7))),
    (2, dict(stochast_ratio=1.0, rfba_gap_steps=(0.001, 0.6))),
    (4, dict(stochast_ratio=1.0, rfba_gap_steps=(0.001, 0.5))),
    (4, dict(stochast_ratio="SDE", sampling_order=2, sampling_style="any", extrapol_ratio=0.3)),
    (7, dict(stochast_ratio=0.5, sampling_order=2, sampling_style="mul")),
]


@pytest.mark.parametrize("cfg_scale", (1.0, 2.0), ids=["nocfg", "cfg"])
@pytest.mark.parametrize("steps,kw", SD3_CASES, ids=[f"S{c[0]}-{i}" for i, c in enumerate(SD3_CASES)])
def test_sd3_pipeline_end_to_end(sd3, steps, kw, cfg_scale):
    pipe, emb, calls = sd3
    fm = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch = TwinFlowScheduler.from_config(fm.config, **kw)
    pipe.scheduler = sch
    try:
        img = _run_pipe(pipe, emb, calls, num_inference_steps=steps, guidance_scale=cfg_scale)
        n_calls = len(calls)
        assert n_calls == len(sch.timesteps) == reference_nfe(steps, kw.get("sampling_order", 1))
        B = 2 if cfg_scale > 1 else 1
        for k, t in enumerate(calls):
            assert t.shape == (B,)
            torch.testing.assert_close(t, sch.timesteps[k].expand(B), atol=0, rtol=0)
        assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()
        img2 = _run_pipe(pipe, emb, calls, num_inference_steps=steps, guidance_scale=cfg_scale)
        assert len(calls) == n_calls
        assert torch.equal(img, img2), "same pipeline generator must give the same image"
        img3 = _run_pipe(pipe, emb, calls, seed=1, num_inference_steps=steps, guidance_scale=cfg_scale)
        assert not torch.equal(img, img3), "a different seed must give a different image"
    finally:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler()


def test_sd3_pipeline_dynamic_shifting_config_passes_mu(sd3):
    """A config with use_dynamic_shifting makes SD3 pass mu=; the UCGM grid ignores it."""
    pipe, emb, calls = sd3
    fm = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    sch = TwinFlowScheduler.from_config(fm.config, stochast_ratio=1.0)
    pipe.scheduler = sch
    try:
        _run_pipe(pipe, emb, calls, num_inference_steps=4, output_type="latent")
        assert len(calls) == 4
        torch.testing.assert_close(sch.sigmas, reference_timesteps(4).float(), atol=1e-7, rtol=0)
    finally:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler()


def _transformer_model_fn(tr, emb):
    def model(x, *, t, tt, **kw):
        return tr(hidden_states=x, timestep=t * 1000, encoder_hidden_states=emb["prompt_embeds"],
                  pooled_projections=emb["pooled_prompt_embeds"], return_dict=False)[0]

    return model


@pytest.mark.parametrize("order", (1, 2))
def test_sd3_pipeline_matches_unified_sampler(sd3, order):
    """Deterministic (s = 0): the stock pipeline's latents equal UnifiedSampler on the same latents."""
    pipe, emb, calls = sd3
    sch = TwinFlowScheduler(stochast_ratio=0.0, sampling_order=order, sampling_style="any", extrapol_ratio=0.3)
    pipe.scheduler = sch
    lat = make_noise((1, 4, 32, 32), seed=8)
    try:
        out = _run_pipe(pipe, emb, calls, num_inference_steps=6, output_type="latent", latents=lat.clone())
        n_calls = len(calls)
    finally:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    u = UnifiedSampler(sampling_steps=6, stochast_ratio=0.0, sampling_order=order, sampling_style="any",
                       extrapol_ratio=0.3)
    with torch.no_grad():
        want = u.sample(_transformer_model_fn(pipe.transformer, emb), lat.clone())
    assert n_calls == u.nfe
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def test_sd3_pipeline_equals_hand_loop_without_generator(sd3):
    """Stochastic, no generator to step: the pipeline equals the same loop by hand (internal generator)."""
    pipe, emb, calls = sd3
    lat = make_noise((1, 4, 32, 32), seed=9)
    cfg = dict(stochast_ratio=1.0, sampling_order=2, sampling_style="few")
    pipe.scheduler = TwinFlowScheduler(**cfg)
    try:
        out = _run_pipe(pipe, emb, calls, num_inference_steps=5, output_type="latent", latents=lat.clone())
    finally:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    s = TwinFlowScheduler(**cfg)
    s.set_timesteps(5)
    x = lat.clone()
    with torch.no_grad():
        for t in s.timesteps:
            v = pipe.transformer(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=emb["prompt_embeds"],
                                 pooled_projections=emb["pooled_prompt_embeds"], return_dict=False)[0]
            x = s.step(v, t, x, return_dict=False)[0]
    torch.testing.assert_close(out, x, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("n", (1, 2, 4))
def test_sd3_pipeline_grid_matches_flow_match_euler(sd3, n):
    """time_grid="pipeline", s = 0: the pipeline with our scheduler equals it with FlowMatchEuler (shift 1)."""
    pipe, emb, calls = sd3
    sigmas = np.linspace(1.0, 1.0 / n, n)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    try:
        want = _run_pipe(pipe, emb, calls, sigmas=sigmas, output_type="latent")
        pipe.scheduler = TwinFlowScheduler(time_grid="pipeline", stochast_ratio=0.0)
        got = _run_pipe(pipe, emb, calls, sigmas=sigmas, output_type="latent")
        assert len(calls) == n
    finally:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("order", (1, 2))
def test_sd3_hand_loop_matches_unified_sampler(order):
    """The SD3 denoising loop written out by hand (no pipeline class needed), stochastic with generator=."""
    tr, _ = _tiny_models()
    g = torch.Generator().manual_seed(5)
    emb = dict(prompt_embeds=torch.randn(1, 7, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 64, generator=g))
    cfg = dict(stochast_ratio=1.0, sampling_order=order, sampling_style="any", extrapol_ratio=0.3)
    s = TwinFlowScheduler(**cfg)
    s.set_timesteps(6)
    lat = make_noise((1, 4, 32, 32), seed=3)
    x = lat.clone()
    n_calls = 0
    g_sch = gen(42)
    with torch.no_grad():
        for t in s.timesteps:
            v = tr(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=emb["prompt_embeds"],
                   pooled_projections=emb["pooled_prompt_embeds"], return_dict=False)[0]
            n_calls += 1
            x = s.step(v, t, x, generator=g_sch, return_dict=False)[0]
        u = UnifiedSampler(sampling_steps=6, **cfg)
        want = u.sample(_transformer_model_fn(tr, emb), lat.clone(), generator=gen(42))
    assert n_calls == u.nfe
    torch.testing.assert_close(x, want, atol=1e-4, rtol=1e-4)
