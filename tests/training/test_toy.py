"""twinflow.toy: the exact Gaussian-mixture flow field, its metrics, and the demo CLI."""

import importlib.util
import math
import pathlib

import pytest
import torch

import twinflow.toy as toy

GaussianMixture2D = toy.GaussianMixture2D
GaussianMixtureVelocity = toy.GaussianMixtureVelocity


def _uneven_mixture(dtype=torch.float64):
    return GaussianMixture2D(
        std=[0.3, 0.2, 0.5, 0.3, 0.3, 0.4, 0.3, 0.25],
        weights=[1, 2, 1, 1, 3, 1, 1, 1],
        dtype=dtype,
    )


def _reference_velocity(mix, x, t):
    """Independent route: v = E[z|x_t] − E[x|x_t] from the score of p_t.

    E[z|x_t] = −t·∇log p_t(x_t) (Tweedie), E[x|x_t] = (x_t − t·E[z|x_t]) / (1 − t).
    """
    x = x.clone().requires_grad_(True)
    a = 1.0 - t
    var = t * t + a * a * mix.stds ** 2                                  # [K]
    d2 = ((x[:, None, :] - a * mix.means[None]) ** 2).sum(-1)           # [B, K]
    logp = torch.logsumexp(torch.log(mix.weights) - 0.5 * d2 / var - torch.log(2 * math.pi * var), dim=1)
    (score,) = torch.autograd.grad(logp.sum(), x)
    ez = -t * score
    ex = (x - t * ez) / (1.0 - t)
    return (ez - ex).detach()


@pytest.mark.parametrize("t", [0.01, 0.2, 0.5, 0.8, 0.99])
def test_velocity_matches_score_route_float64(t):
    mix = _uneven_mixture()
    field = GaussianMixtureVelocity(mix)
    g = torch.Generator().manual_seed(1)
    x = 3.0 * torch.randn(512, 2, generator=g, dtype=torch.float64)
    out = field(x, t=torch.full((512,), t, dtype=torch.float64), tt=torch.zeros(512, dtype=torch.float64))
    ref = _reference_velocity(mix, x, t)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_velocity_is_conditional_expectation_monte_carlo():
    # E[(z − x − v(x_t))·g(x_t)] = 0 for any g: check g = 1 and g = x_t coordinates.
    mix = GaussianMixture2D(dtype=torch.float64)
    field = GaussianMixtureVelocity(mix)
    gen = torch.Generator().manual_seed(2)
    n = 200_000
    x = mix.sample(n, generator=gen)
    z = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    t = torch.rand(n, generator=gen, dtype=torch.float64)
    xt = t[:, None] * z + (1 - t[:, None]) * x
    resid = (z - x) - field(xt, t=t, tt=t)
    assert resid.mean(0).abs().max() < 0.02
    assert (resid[:, :, None] * xt[:, None, :]).mean(0).abs().max() < 0.06
    # the exact field beats a slightly perturbed one on the flow-matching loss
    loss = resid.pow(2).sum(1).mean()
    worse = (resid + 0.05).pow(2).sum(1).mean()
    assert loss < worse


def test_endpoints_closed_form_and_finite():
    mix = GaussianMixture2D()
    field = GaussianMixtureVelocity(mix)
    x = 5.0 * torch.randn(1000, 2, generator=torch.Generator().manual_seed(3))
    v1 = field(x, t=torch.ones(1000), tt=torch.zeros(1000))
    torch.testing.assert_close(v1, x - mix.means.mean(0), rtol=1e-5, atol=1e-5)   # posterior = prior at t = 1
    v0 = field(x, t=torch.zeros(1000), tt=torch.zeros(1000))
    torch.testing.assert_close(v0, -x, rtol=1e-5, atol=1e-5)                         # x_t = x at t = 0
    far = torch.tensor([[1e4, -1e4], [0.0, 0.0], [4.0, 0.0], [-1e3, 3.0]])
    for t in [0.0, 1e-7, 1e-3, 0.5, 1 - 1e-7, 1.0]:
        v = field(far, t=torch.full((4,), t), tt=torch.zeros(4))
        assert torch.isfinite(v).all(), t


def test_call_conventions():
    mix = GaussianMixture2D(dtype=torch.float64)
    field = GaussianMixtureVelocity(mix)
    x = torch.randn(16, 2, dtype=torch.float64)
    ref = field(x, t=torch.full((16,), 0.3, dtype=torch.float64))
    torch.testing.assert_close(field(x, t=0.3), ref)                                 # python float
    torch.testing.assert_close(field(x, t=torch.tensor(0.3)), ref)                   # 0-dim tensor
    torch.testing.assert_close(field(x, t=torch.full((16,), -0.3)), ref)             # signed t: uses |t|
    torch.testing.assert_close(field(x, t=0.3, tt=torch.zeros(16), cond=[1]), ref)   # ignores tt / extras
    x32 = x.float()
    out32 = field(x32, t=torch.full((16,), 0.3))
    assert out32.dtype == torch.float32 and out32.shape == (16, 2)
    torch.testing.assert_close(out32, ref.float(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        field(torch.randn(4, 3), t=0.5)
    with pytest.raises(TypeError):
        field(x)
    assert field.calls == 6


def test_many_step_euler_reaches_the_mixture():
    mix = GaussianMixture2D()
    field = GaussianMixtureVelocity(mix)
    g = torch.Generator().manual_seed(0)
    n = 4000
    x = torch.randn(n, 2, generator=g)
    ts = torch.linspace(1.0, 0.0, 501)
    for t_c, t_n in zip(ts[:-1], ts[1:]):
        t = t_c.expand(n)
        x = x - (t_c - t_n) * field(x, t=t, tt=t)
    assert torch.isfinite(x).all()
    d = toy.mean_nearest_mode_distance(x, mix)
    assert d < 0.45, d                            # exact samples: 0.3·√(π/2) ≈ 0.376
    assert toy.mode_coverage(x, mix) == 8
    frac = toy.mode_counts(x, mix).double() / n
    assert frac.min() > 0.09 and frac.max() < 0.16, frac  # balanced: 1/8 = 0.125
    assert frac.sum() > 0.95                      # nearly all within 3σ of some mode
    assert toy.fraction_near_modes(x, mix) > 0.95


def test_mixture_sampling_and_metrics():
    mix = GaussianMixture2D()
    assert mix.num_modes == 8 and mix.dim == 2
    torch.testing.assert_close(mix.means.norm(dim=1), torch.full((8,), 4.0))
    a = mix.sample(20000, generator=torch.Generator().manual_seed(5))
    b = mix.sample(20000, generator=torch.Generator().manual_seed(5))
    assert a.shape == (20000, 2) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert abs(toy.mean_nearest_mode_distance(a, mix) - 0.3 * math.sqrt(math.pi / 2)) < 0.01
    assert toy.mode_coverage(a, mix) == 8
    assert toy.mode_coverage(a, mix, radius=0.9, min_count=2000) == 8
    collapsed = torch.zeros(100, 2)
    assert abs(toy.mean_nearest_mode_distance(collapsed, mix) - 4.0) < 1e-6
    assert toy.mode_coverage(collapsed, mix) == 0
    assert toy.mode_coverage(collapsed, mix, radius=4.5) == 8
    assert abs(toy.fraction_near_modes(a, mix) - (1 - math.exp(-4.5))) < 0.005
    assert toy.fraction_near_modes(collapsed, mix) == 0.0
    assert toy.mean_nearest_mode_distance(torch.tensor([[float("nan"), 0.0]]), mix) == float("inf")
    assert mix.to(dtype=torch.float64).sample(3).dtype == torch.float64
    assert torch.isfinite(mix.log_prob(a)).all()


def test_mixture_validation():
    with pytest.raises(ValueError, match="std"):
        GaussianMixture2D(std=0.0)
    with pytest.raises(ValueError, match="std"):
        GaussianMixture2D(std=[0.1, 0.2])
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture2D(weights=[0.0] * 8)
    with pytest.raises(ValueError, match="num_modes"):
        GaussianMixture2D(num_modes=0)
    with pytest.raises(ValueError, match="means"):
        GaussianMixture2D(means=[1.0, 2.0])
    m = GaussianMixture2D(means=[[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]], std=[0.5, 1.0])
    v = GaussianMixtureVelocity(m)(torch.randn(7, 3), t=torch.rand(7))
    assert v.shape == (7, 3) and torch.isfinite(v).all()


# --- with the built package: the toy through the UnifiedSampler -------------



def test_unified_sampler_multistep_on_exact_field():
    from twinflow import UnifiedSampler

    mix = GaussianMixture2D()
    field = GaussianMixtureVelocity(mix)
    sampler = UnifiedSampler.preset("multi-step")
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    x0 = sampler.sample(field, noise)
    assert x0.shape == noise.shape and x0.dtype == noise.dtype
    assert field.calls == sampler.nfe == 30
    assert toy.mean_nearest_mode_distance(x0, mix) < 0.6
    assert toy.mode_coverage(x0, mix) == 8


def test_unified_sampler_euler_matches_plain_loop_and_one_step_collapses():
    from twinflow import UnifiedSampler

    mix = GaussianMixture2D(dtype=torch.float64)
    field = GaussianMixtureVelocity(mix)
    noise = torch.randn(500, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sampler = UnifiedSampler(sampling_steps=8, stochast_ratio=0.0)
    x0 = sampler.sample(field, noise)
    ts = sampler.timesteps.to(torch.float64)
    x = noise.clone()
    for i in range(len(ts) - 1):
        x = x - (ts[i] - ts[i + 1]) * field(x, t=ts[i].expand(500), tt=torch.zeros(500, dtype=torch.float64))
    torch.testing.assert_close(x0, x, rtol=1e-9, atol=1e-9)
    one = UnifiedSampler(sampling_steps=1, stochast_ratio=0.0).sample(field, noise)
    # one Euler step from t = 1 lands on the mixture mean (the origin): collapse
    assert toy.mean_nearest_mode_distance(one, mix) > 3.9
    assert toy.mode_coverage(one, mix) == 0


def test_cli_demo_smoke(tmp_path, capsys):
    import json

    from twinflow.cli import main

    rc = main(["demo", "--steps-list", "1", "8", "--num-samples", "300", "--output-dir", str(tmp_path),
               "--image-size", "128", "--train-steps", "0"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "euler-8" in printed and "multi-step" in printed
    summary = json.loads((tmp_path / "demo.json").read_text())
    rows = {r["setting"]: r for r in summary["results"]}
    assert set(rows) == {"data", "euler-1", "euler-8", "multi-step"}
    assert rows["euler-8"]["nfe"] == rows["euler-8"]["model_calls"] == 8
    assert rows["euler-1"]["modes_covered"] == 0 and rows["multi-step"]["modes_covered"] == 8
    for r in rows.values():
        png = (tmp_path / r["image"]).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_demo_trains_the_toy_nets(tmp_path):
    import json

    from twinflow.cli import main

    rc = main(["demo", "--steps-list", "1", "--presets", "--num-samples", "200", "--output-dir", str(tmp_path),
               "--image-size", "64", "--train-steps", "20"])
    assert rc == 0
    rows = {r["setting"]: r for r in json.loads((tmp_path / "demo.json").read_text())["results"]}
    assert {"twinflow-net 1-nfe", "twinflow-net 2-nfe", "fm-net euler-1", "fm-net euler-30"} <= set(rows)
    for r in rows.values():
        assert r["model_calls"] == r["nfe"]
        assert (tmp_path / r["image"]).exists()


def test_cli_errors_and_scatter(tmp_path):
    import numpy as np
    from PIL import Image

    from twinflow import cli
    from twinflow.demo import render_scatter

    assert cli.main([]) == 2
    with pytest.raises(SystemExit):
        cli.main(["demo", "--steps-list", "0"])
    if not torch.cuda.is_available():
        assert cli.main(["demo", "--device", "cuda"]) == 1  # a clear one-line error, not a traceback
    path = render_scatter(np.array([[0.0, 0.0], [100.0, 0.0]]), tmp_path / "s.png", size=64, title="t")
    img = np.asarray(Image.open(path))
    assert img.shape == (64, 64, 3)
    assert (img[31:34, 31:34] == (31, 90, 180)).all()  # the point at the origin is drawn
