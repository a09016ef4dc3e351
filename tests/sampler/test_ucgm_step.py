"""twinflow.ucgm_step: one UCGM interval without extrapolation, against plain torch.

ucgm_step(x, velocity, t_cur, t_next, stochast_ratio=0.0, noise=None, out=None)
  s == 0:  x - (t_cur - t_next) * velocity
  s >  0:  (1 - t_next) * x_hat + t_next * (sqrt(1 - s) * z_hat + sqrt(s) * noise)
           x_hat = x - t_cur * v,  z_hat = x + (1 - t_cur) * v
"""

from __future__ import annotations

import math

import pytest
import torch

from twinflow import ucgm_step

SHAPE = (4, 16, 32, 32)
TOL = {
    torch.float32: dict(atol=5e-6, rtol=5e-6),
    torch.float64: dict(atol=1e-12, rtol=1e-12),
}
TIMES = [(0.999, 0.6), (0.6, 0.0), (1.0, 0.5), (0.3, 0.29), (0.5, 0.5)]
RATIOS = [0.0, 0.3, 1.0]


def ref_step(x, v, t_cur, t_next, s=0.0, noise=None):
    x, v = x.double(), v.double()
    if s == 0:
        return x - (t_cur - t_next) * v
    xh = x - t_cur * v
    zh = x + (1 - t_cur) * v
    return (1 - t_next) * xh + t_next * (math.sqrt(1 - s) * zh + math.sqrt(s) * noise.double())


def rand(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def make_inputs(dtype, layout, shape=SHAPE):
    """x, velocity, noise in the requested layout (values independent of the layout)."""
    if layout == "contiguous":
        return [rand(shape, dtype, k) for k in range(3)]
    if layout == "transposed":
        # allocate with the last two dims swapped, then transpose back: same shape, non-contiguous
        swapped = shape[:-2] + (shape[-1], shape[-2])
        out = [rand(swapped, dtype, k).transpose(-1, -2) for k in range(3)]
    elif layout == "strided":
        wide = shape[:-1] + (2 * shape[-1],)
        out = [rand(wide, dtype, k)[..., ::2] for k in range(3)]
    elif layout == "mixed":
        # one contiguous, one transposed, one channel-strided
        swapped = shape[:-2] + (shape[-1], shape[-2])
        wide = shape[:1] + (2 * shape[1],) + shape[2:]
        out = [rand(shape, dtype, 0), rand(swapped, dtype, 1).transpose(-1, -2), rand(wide, dtype, 2)[:, 1::2]]
    else:
        raise AssertionError(layout)
    assert all(t.shape == shape for t in out)
    assert not all(t.is_contiguous() for t in out)
    return out


LAYOUTS = ["contiguous", "transposed", "strided", "mixed"]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])


@DTYPES
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("s", RATIOS, ids=str)
@pytest.mark.parametrize("times", TIMES, ids=str)
def test_ucgm_step_matches_torch(times, s, layout, dtype):
    t_cur, t_next = times
    x, v, eps = make_inputs(dtype, layout)
    copies = [a.clone() for a in (x, v, eps)]
    res = ucgm_step(x, v, t_cur, t_next, stochast_ratio=s, noise=eps if s > 0 else None)
    assert isinstance(res, torch.Tensor)
    assert res.dtype == dtype and res.device == x.device and tuple(res.shape) == SHAPE
    torch.testing.assert_close(res.double(), ref_step(x, v, t_cur, t_next, s, eps), **TOL[dtype])
    for a, c in zip((x, v, eps), copies):
        assert torch.equal(a, c), "an input was modified"


@DTYPES
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_ucgm_step_default_is_euler(layout, dtype):
    x, v, _ = make_inputs(dtype, layout)
    res = ucgm_step(x, v, 0.8, 0.3)
    torch.testing.assert_close(res, x - (0.8 - 0.3) * v, **TOL[dtype])


@DTYPES
def test_ucgm_step_zero_ratio_ignores_noise(dtype):
    x, v, eps = make_inputs(dtype, "contiguous")
    res = ucgm_step(x, v, 0.7, 0.2, stochast_ratio=0.0, noise=eps)
    torch.testing.assert_close(res, x - (0.7 - 0.2) * v, **TOL[dtype])


@DTYPES
def test_ucgm_step_ratio_one_t_next_zero_is_x_hat(dtype):
    x, v, eps = make_inputs(dtype, "contiguous")
    res = ucgm_step(x, v, 0.4, 0.0, stochast_ratio=1.0, noise=eps)
    torch.testing.assert_close(res, x - 0.4 * v, **TOL[dtype])


@DTYPES
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("s", RATIOS, ids=str)
def test_ucgm_step_out(s, layout, dtype):
    x, v, eps = make_inputs(dtype, layout)
    out = torch.full(SHAPE, 123.0, dtype=dtype)
    res = ucgm_step(x, v, 0.9, 0.45, stochast_ratio=s, noise=eps if s > 0 else None, out=out)
    assert res is out
    torch.testing.assert_close(out.double(), ref_step(x, v, 0.9, 0.45, s, eps), **TOL[dtype])


@DTYPES
@pytest.mark.parametrize("s", [0.0, 0.5], ids=str)
def test_ucgm_step_non_contiguous_out(s, dtype):
    x, v, eps = make_inputs(dtype, "contiguous")
    swapped = SHAPE[:-2] + (SHAPE[-1], SHAPE[-2])
    out = torch.zeros(swapped, dtype=dtype).transpose(-1, -2)
    assert not out.is_contiguous()
    res = ucgm_step(x, v, 0.9, 0.45, stochast_ratio=s, noise=eps if s > 0 else None, out=out)
    assert res is out
    torch.testing.assert_close(out.double(), ref_step(x, v, 0.9, 0.45, s, eps), **TOL[dtype])


@DTYPES
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 4, 5)], ids=str)
def test_ucgm_step_small_shapes(shape, dtype):
    x, v, eps = (rand(shape, dtype, k) for k in range(3))
    for s in RATIOS:
        res = ucgm_step(x, v, 0.75, 0.25, stochast_ratio=s, noise=eps)
        torch.testing.assert_close(res.double(), ref_step(x, v, 0.75, 0.25, s, eps), **TOL[dtype])


def test_ucgm_step_is_one_sampler_interval():
    """Order 1, no extrapolation: x_{i+1} = ucgm_step(x_i, F_i, t_i, t_{i+1}, s, eps_i)."""
    from twinflow import UnifiedSampler

    noise = rand((2, 3, 4), torch.float64, 5)

    def model(x, *, t, tt):
        return torch.sin(x) * (1 + t.reshape(-1, 1, 1)) + 0.3 * tt.reshape(-1, 1, 1)

    s = UnifiedSampler(sampling_steps=4, stochast_ratio=0.4, sampling_style="mul", rfba_gap_steps=(0.001, 0.0))
    got = s.sample(model, noise, generator=torch.Generator().manual_seed(3))
    ts = s.timesteps.tolist()
    g = torch.Generator().manual_seed(3)
    x = noise.clone()
    for i in range(len(ts) - 1):
        t = torch.full((2,), ts[i], dtype=torch.float64)
        F = model(x, t=t, tt=t)
        x_hat = x - ts[i] * F
        eps = torch.randn(x.shape, generator=g, dtype=x.dtype)
        x = ucgm_step(x, F, ts[i], ts[i + 1], stochast_ratio=0.4, noise=eps)
    torch.testing.assert_close(got, x_hat, atol=1e-10, rtol=1e-10)
