"""Error behaviour of twinflow.UnifiedSampler / ucgm_step (docs/algorithm.md §2, "Invalid configurations").

Every check goes through ``expect_error``, which catches BaseException so that a
leaked Rust panic (``pyo3_runtime.PanicException``, a BaseException subclass) is
reported as such instead of escaping pytest.raises.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from twinflow import UnifiedSampler, ucgm_step

NAN, INF = float("nan"), float("inf")


from checks import _is_panic, expect_error  # noqa: E402


def velocity(x, *, t, tt, **_):
    tb = t.reshape(-1, *([1] * (x.dim() - 1)))
    return torch.sin(x) * (1 + tb) + 0.1 * x


def noise(shape=(2, 3, 4, 5), dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)


# ----------------------------------------------------------------------------- invalid configurations

INVALID = [
    ("sampling_steps", 0),
    ("sampling_steps", -1),
    ("stochast_ratio", 1.5),
    ("stochast_ratio", -0.1),
    ("stochast_ratio", "foo"),
    ("stochast_ratio", NAN),
    ("stochast_ratio", INF),
    ("stochast_ratio", -INF),
    ("extrapol_ratio", -1.0),
    ("extrapol_ratio", -1e-9),
    ("extrapol_ratio", NAN),
    ("extrapol_ratio", INF),
    ("sampling_order", 0),
    ("sampling_order", 3),
    ("sampling_order", -1),
    ("time_dist_ctrl", (0.0, 1.0, 1.0)),
    ("time_dist_ctrl", (1.0, 0.0, 1.0)),
    ("time_dist_ctrl", (1.0, 1.0, 0.0)),
    ("time_dist_ctrl", (-1.0, 1.0, 1.0)),
    ("time_dist_ctrl", (1.0, -0.5, 1.0)),
    ("time_dist_ctrl", (1.0, 1.0, -2.0)),
    ("time_dist_ctrl", (1.0, 1.0)),
    ("time_dist_ctrl", (1.0, 1.0, 1.0, 1.0)),
    ("time_dist_ctrl", ()),
    ("time_dist_ctrl", (NAN, 1.0, 1.0)),
    ("time_dist_ctrl", (1.0, INF, 1.0)),
    ("time_dist_ctrl", (1.0, 1.0, NAN)),
    ("time_dist_ctrl", (1.0, 1.0, -INF)),
    ("rfba_gap_steps", (-0.1, 0.0)),
    ("rfba_gap_steps", (0.0, -0.1)),
    ("rfba_gap_steps", (0.5, 0.5)),
    ("rfba_gap_steps", (0.6, 0.5)),
    ("rfba_gap_steps", (1.0, 0.0)),
    ("rfba_gap_steps", (0.0, 1.0)),
    ("rfba_gap_steps", (NAN, 0.0)),
    ("rfba_gap_steps", (0.0, NAN)),
    ("rfba_gap_steps", (0.0, INF)),
    ("rfba_gap_steps", (0.1,)),
    ("rfba_gap_steps", (0.0, 0.0, 0.0)),
    ("sampling_style", "bogus"),
    ("sampling_style", ""),
]
INVALID_IDS = [f"{k}={v!r}" for k, v in INVALID]


@pytest.mark.parametrize("field,value", INVALID, ids=INVALID_IDS)
def test_invalid_config_constructor(field, value):
    expect_error(ValueError, lambda: UnifiedSampler(**{field: value}), contains=field)


@pytest.mark.parametrize("field,value", INVALID, ids=INVALID_IDS)
def test_invalid_config_preset_override(field, value):
    expect_error(ValueError, lambda: UnifiedSampler.preset("4-nfe", **{field: value}), contains=field)


@pytest.mark.parametrize("field,value", INVALID, ids=INVALID_IDS)
def test_invalid_config_sampling_loop_override(field, value):
    calls = []

    def model(x, *, t, tt, **kw):
        calls.append(1)
        return velocity(x, t=t, tt=tt)

    s = UnifiedSampler(sampling_steps=3)
    expect_error(ValueError, lambda: s.sampling_loop(noise(), model, **{field: value}), contains=field)
    assert not calls, "the model was called before the configuration was validated"


class _Opaque:
    """A value of no accepted type, with a stable repr: pytest-xdist's workers must collect the
    same test ids, and ``object()``'s repr carries its address."""

    def __repr__(self):
        return "<opaque>"


WRONG_TYPES = [
    ("sampling_steps", "4"),
    ("sampling_steps", 4.5),
    ("sampling_steps", [4]),
    ("sampling_order", "2"),
    ("sampling_order", 1.5),
    ("stochast_ratio", [0.5]),
    ("stochast_ratio", _Opaque()),
    ("extrapol_ratio", "0.3"),
    ("extrapol_ratio", [0.3]),
    ("time_dist_ctrl", 1.0),
    ("time_dist_ctrl", "abc"),
    ("time_dist_ctrl", ("a", "b", "c")),
    ("rfba_gap_steps", 0.0),
    ("rfba_gap_steps", ("a", "b")),
    ("sampling_style", 3),
    ("sampling_style", ["few"]),
]


@pytest.mark.parametrize("field,value", WRONG_TYPES, ids=[f"{k}={v!r}" for k, v in WRONG_TYPES])
def test_wrong_python_types(field, value):
    expect_error((TypeError, ValueError), lambda: UnifiedSampler(**{field: value}), contains=field)


@pytest.mark.parametrize("name", ["nope", "", "8-nfe"])
def test_unknown_preset(name):
    expect_error(ValueError, lambda: UnifiedSampler.preset(name))


def test_valid_edge_configs_are_accepted():
    # boundaries that docs/algorithm.md allows
    UnifiedSampler(sampling_steps=1)
    UnifiedSampler(stochast_ratio=0.0)
    UnifiedSampler(stochast_ratio=1.0)
    UnifiedSampler(stochast_ratio="SDE")
    UnifiedSampler(extrapol_ratio=0.0)
    UnifiedSampler(extrapol_ratio=5.0)
    UnifiedSampler(sampling_order=2)
    UnifiedSampler(rfba_gap_steps=(0.0, 0.0))
    UnifiedSampler(rfba_gap_steps=(0.4, 0.59))
    UnifiedSampler(rfba_gap_steps=(0.9, 0.0))
    UnifiedSampler(time_dist_ctrl=(1e-3, 50.0, 0.1))
    for style in ("few", "mul", "any"):
        UnifiedSampler(sampling_style=style)


# ----------------------------------------------------------------------------- sample() arguments

FUSED = pytest.mark.parametrize("fused", [True, False], ids=["fused", "ops"])


def _sampler(fused, **kw):
    s = UnifiedSampler(**{"sampling_steps": 3, **kw})
    s.use_fused_kernel = fused
    return s


@FUSED
@pytest.mark.parametrize(
    "bad", [[[1.0, 2.0]], np.zeros((2, 3), dtype=np.float32), 1.0, None, "noise"],
    ids=["list", "ndarray", "float", "None", "str"],
)
def test_noise_not_a_tensor(bad, fused):
    expect_error(TypeError, lambda: _sampler(fused).sample(velocity, bad))


@FUSED
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool], ids=str)
def test_integer_noise(dtype, fused):
    expect_error(TypeError, lambda: _sampler(fused).sample(velocity, torch.zeros((2, 3), dtype=dtype)))


@FUSED
def test_zero_dim_noise(fused):
    expect_error(ValueError, lambda: _sampler(fused).sample(velocity, torch.tensor(1.0)))


@FUSED
@pytest.mark.parametrize("model", [42, None, "model", torch.zeros(2)], ids=["int", "None", "str", "tensor"])
def test_model_not_callable(model, fused):
    expect_error(TypeError, lambda: _sampler(fused).sample(model, noise()))


@FUSED
@pytest.mark.parametrize(
    "ret",
    [
        lambda x: 1.0,
        lambda x: None,
        lambda x: x.numpy(),
        lambda x: x.tolist(),
        lambda x: (x,),
        lambda x: {"sample": x},
    ],
    ids=["float", "None", "ndarray", "list", "tuple", "dict"],
)
def test_model_returns_non_tensor(ret, fused):
    def model(x, *, t, tt, **kw):
        return ret(velocity(x, t=t, tt=tt))

    expect_error(TypeError, lambda: _sampler(fused).sample(model, noise()))


def _mentions_shape(msg: str, shape) -> bool:
    pat = r"\D{1,4}".join(str(int(d)) for d in shape)
    return re.search(pat, msg) is not None


@FUSED
@pytest.mark.parametrize(
    "reshape",
    [
        lambda v: v[..., :-1],
        lambda v: v.unsqueeze(0),
        lambda v: v[0],
        lambda v: v[:1],
        lambda v: v.reshape(2, 60),
    ],
    ids=["last-dim", "extra-dim", "dropped-dim", "batch-1", "flattened"],
)
def test_model_returns_wrong_shape(reshape, fused):
    x = noise((2, 3, 4, 5))
    returned = []

    def model(x, *, t, tt, **kw):
        out = reshape(velocity(x, t=t, tt=tt))
        returned.append(tuple(out.shape))
        return out

    e = expect_error(ValueError, lambda: _sampler(fused).sample(model, x))
    msg = str(e)
    assert _mentions_shape(msg, returned[-1]) or _mentions_shape(msg, x.shape), (
        f"message {msg!r} mentions neither the returned shape {returned[-1]} nor the expected {tuple(x.shape)}"
    )


@FUSED
def test_model_wrong_shape_in_corrector_call(fused):
    """Order 2: the second (corrector) call returns the wrong shape."""
    calls = []

    def model(x, *, t, tt, **kw):
        calls.append(1)
        v = velocity(x, t=t, tt=tt)
        return v if len(calls) == 1 else v[..., :-1]

    expect_error(ValueError, lambda: _sampler(fused, sampling_steps=4, sampling_order=2).sample(model, noise()))


class MyError(Exception):
    pass


@FUSED
@pytest.mark.parametrize("fail_at", [1, 2, 3])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("err_type", [MyError, KeyError, RuntimeError, ValueError, TypeError])
def test_model_exception_propagates_unchanged(err_type, order, fail_at, fused):
    err = err_type("boom from the user's model")
    calls = []

    def model(x, *, t, tt, **kw):
        calls.append(1)
        if len(calls) == fail_at:
            raise err
        return velocity(x, t=t, tt=tt)

    s = _sampler(fused, sampling_steps=6, sampling_order=order, stochast_ratio=0.5)
    e = expect_error(err_type, lambda: s.sample(model, noise(), generator=torch.Generator().manual_seed(0)))
    assert e is err
    assert type(e) is err_type
    assert len(calls) == fail_at, "the sampler kept calling the model after it raised"


@FUSED
def test_model_exception_propagates_from_sampling_loop(fused):
    err = MyError("boom")

    def model(x, *, t, tt, **kw):
        raise err

    s = _sampler(fused)
    e = expect_error(MyError, lambda: s.sampling_loop(noise(), model, sampling_steps=2, cond=1))
    assert e is err


@FUSED
def test_model_exception_with_progress_bar(fused):
    pytest.importorskip("tqdm")
    err = MyError("boom")

    def model(x, *, t, tt, **kw):
        raise err

    e = expect_error(MyError, lambda: _sampler(fused).sample(model, noise(), progress=True))
    assert e is err


@FUSED
def test_missing_model_kwarg_error_propagates(fused):
    """A model that requires a keyword the caller did not pass raises the model's own TypeError."""

    def model(x, *, t, tt, cond):
        return velocity(x, t=t, tt=tt) + cond

    expect_error(TypeError, lambda: _sampler(fused).sample(model, noise()))


def test_sampler_usable_after_errors():
    s = UnifiedSampler(sampling_steps=3, stochast_ratio=0.5)
    err = MyError("x")

    def bad(x, *, t, tt):
        raise err

    expect_error(MyError, lambda: s.sample(bad, noise()))
    expect_error(ValueError, lambda: s.sample(lambda x, *, t, tt: x[..., :-1], noise()))
    out = s.sample(velocity, noise(), generator=torch.Generator().manual_seed(1))
    assert out.shape == noise().shape and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- ucgm_step

@pytest.mark.parametrize("s", [0.5, 1.0, 1e-6])
def test_ucgm_step_stochastic_without_noise(s):
    x = noise((2, 3))
    v = noise((2, 3))
    expect_error(ValueError, lambda: ucgm_step(x, v, 0.8, 0.5, stochast_ratio=s))
    expect_error(ValueError, lambda: ucgm_step(x, v, 0.8, 0.5, stochast_ratio=s, noise=None))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(velocity=torch.zeros(2, 4)),
        dict(noise=torch.zeros(3, 3), stochast_ratio=0.5),
    ],
    ids=["velocity", "noise"],
)
def test_ucgm_step_shape_mismatch_is_an_error_not_a_panic(kwargs):
    x = noise((2, 3))
    args = dict(velocity=torch.zeros(2, 3), noise=None, stochast_ratio=0.0, out=None)
    args.update(kwargs)
    expect_error(
        (ValueError, TypeError, RuntimeError),
        lambda: ucgm_step(x, args["velocity"], 0.8, 0.5, stochast_ratio=args["stochast_ratio"],
                          noise=args["noise"], out=args["out"]),
    )


def test_ucgm_step_non_tensor_is_type_error():
    expect_error(TypeError, lambda: ucgm_step([1.0, 2.0], torch.zeros(2), 0.8, 0.5))
    expect_error(TypeError, lambda: ucgm_step(torch.zeros(2), [1.0, 2.0], 0.8, 0.5))


def test_ucgm_step_wrong_out_shape_never_panics():
    x = noise((2, 3))
    try:
        ucgm_step(x, torch.zeros(2, 3), 0.8, 0.5, out=torch.zeros(2, 4))
    except BaseException as e:  # noqa: BLE001
        assert not _is_panic(e), f"Rust panic leaked to Python: {e}"
        assert isinstance(e, (TypeError, ValueError, RuntimeError)), type(e)


def test_ucgm_step_dtype_mismatch_never_panics():
    x = noise((2, 3), torch.float32)
    v = noise((2, 3), torch.float64)
    try:
        ucgm_step(x, v, 0.8, 0.5)
    except BaseException as e:  # noqa: BLE001
        assert not _is_panic(e), f"Rust panic leaked to Python: {e}"
        assert isinstance(e, (TypeError, ValueError, RuntimeError)), type(e)
