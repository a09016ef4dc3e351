"""The sampler settings table (``twinflow._core.SAMPLER_SETTINGS``, declared once in the Rust
core) against the behaviour of ``UnifiedSampler``: defaults, types, and that every value
outside a declared range raises ValueError naming the setting while every value inside is
accepted (hypothesis draws both)."""

from __future__ import annotations

import inspect
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twinflow import UnifiedSampler
from twinflow._core import SAMPLER_SETTINGS, SamplerSettings

from checks import expect_error  # noqa: E402

SPEC = {s["name"]: s for s in SAMPLER_SETTINGS}
NUMERIC = [s for s in SAMPLER_SETTINGS if s["min"] is not None]
FEW = settings(max_examples=40, deadline=None, database=None, derandomize=True)


def test_table_lists_every_setting_with_its_fields():
    assert [s["name"] for s in SAMPLER_SETTINGS] == [
        "sampling_steps", "stochast_ratio", "extrapol_ratio", "sampling_order", "time_dist_ctrl",
        "rfba_gap_steps", "sampling_style", "use_fused_kernel", "check_finite"]
    for s in SAMPLER_SETTINGS:
        assert set(s) == {"name", "type", "default", "range", "min", "max", "min_inclusive", "max_inclusive",
                          "choices", "rule", "doc", "saved"}
        assert s["doc"] and s["type"] and s["range"]
    assert SPEC["sampling_style"]["choices"] == ["few", "mul", "any"]
    assert SPEC["rfba_gap_steps"]["rule"] == "g0 + g1 < 1"


def test_defaults_signature_and_to_dict_follow_the_table():
    s = UnifiedSampler()
    for spec in SAMPLER_SETTINGS:
        assert getattr(s, spec["name"]) == spec["default"], spec["name"]
    assert list(s.to_dict()) == [x["name"] for x in SAMPLER_SETTINGS if x["saved"]]
    params = inspect.signature(UnifiedSampler).parameters
    assert {k: p.default for k, p in params.items()} == {x["name"]: x["default"] for x in SAMPLER_SETTINGS}
    for spec in SAMPLER_SETTINGS:
        assert spec["name"] in UnifiedSampler.__doc__ and spec["range"] in UnifiedSampler.__doc__


def _element(spec, v):
    """A value of the setting whose (every) element is v."""
    if spec["type"].startswith("tuple"):
        n = spec["type"].count("float")
        if spec["name"] == "rfba_gap_steps":  # keep the other gap 0 so the sum rule holds
            return (v, 0.0)
        return (v,) * n
    return int(v) if spec["type"] == "int" else v


def _outside(spec):
    lo, hi = spec["min"], spec["max"]
    below = st.floats(max_value=lo, exclude_max=spec["min_inclusive"], allow_nan=False, allow_infinity=False,
                      min_value=lo - 1e6)
    parts = [below, st.just(math.nan), st.just(math.inf), st.just(-math.inf)]
    if math.isfinite(hi):
        parts.append(st.floats(min_value=hi, exclude_min=spec["max_inclusive"], max_value=hi + 1e6,
                               allow_nan=False))
    if spec["type"] == "int":
        parts = [st.integers(max_value=math.ceil(lo) - 1, min_value=-(2 ** 70)),
                 st.integers(min_value=math.floor(hi) + 1, max_value=2 ** 70)]
    return st.one_of(*parts)


def _inside(spec):
    lo, hi = spec["min"], spec["max"]
    if spec["type"] == "int":
        return st.integers(int(lo), int(hi))
    hi = min(hi, 0.999 if spec["name"] == "rfba_gap_steps" else 1e3)
    return st.floats(min_value=lo, max_value=hi, exclude_min=not spec["min_inclusive"], allow_nan=False)


def _for_drawn_values(name, strategy, check):
    """check(value) for values of the setting `name` whose elements hypothesis draws from
    strategy(spec)."""
    spec = SPEC[name]
    FEW(given(strategy(spec))(lambda v: check(_element(spec, v))))()


@pytest.mark.parametrize("name", [s["name"] for s in NUMERIC])
def test_every_value_outside_the_declared_range_is_refused(name):
    def refused(value):
        expect_error(ValueError, lambda: UnifiedSampler(**{name: value}), contains=name)
        expect_error(ValueError, lambda: SamplerSettings().replace(**{name: value}), contains=name)

    _for_drawn_values(name, _outside, refused)


@pytest.mark.parametrize("name", [s["name"] for s in NUMERIC])
def test_every_value_inside_the_declared_range_is_accepted(name):
    def accepted(value):
        got = getattr(UnifiedSampler(**{name: value}), name)
        assert got == (tuple(float(x) for x in value) if isinstance(value, tuple) else value)

    _for_drawn_values(name, _inside, accepted)


def test_rule_and_choices_are_enforced():
    expect_error(ValueError, lambda: UnifiedSampler(rfba_gap_steps=(0.5, 0.5)), contains="g0 + g1 < 1")
    expect_error(ValueError, lambda: UnifiedSampler(sampling_style="fast"), contains=("sampling_style", "one of"))
    assert UnifiedSampler(sampling_style="MUL").sampling_style == "mul"


@pytest.mark.parametrize("spec", SAMPLER_SETTINGS, ids=lambda s: s["name"])
def test_a_value_of_the_wrong_type_is_a_type_error_naming_the_setting(spec):
    wrong = object()
    expect_error(TypeError, lambda: UnifiedSampler(**{spec["name"]: wrong}), contains=spec["name"])


def test_switches_are_keywords_and_writable_but_settings_are_not():
    s = UnifiedSampler(use_fused_kernel=False, check_finite=False)
    assert (s.use_fused_kernel, s.check_finite) == (False, False)
    s.check_finite = True
    assert s.check_finite is True
    expect_error(TypeError, lambda: setattr(s, "check_finite", 1), contains="check_finite")
    with pytest.raises(AttributeError):
        s.sampling_steps = 3
    assert "check_finite" not in s.to_dict()
    assert repr(s).startswith("UnifiedSampler(sampling_steps=20, stochast_ratio=0.0")
