"""The public classes have written-out, typed signatures (what type checkers and IDEs read),
and they agree with the settings tables the Rust core declares — names, order, kinds,
defaults and types — so neither can drift from the other.
"""

from __future__ import annotations

import inspect
import typing

import pytest

from twinflow import TwinFlowLoss, UnifiedSampler
from twinflow._core import LOSS_SETTINGS, SAMPLER_SETTINGS

P = inspect.Parameter

from typing import Dict, Literal, Optional, Tuple, Union  # noqa: E402

# The tables' type names as Python types.
TYPES = {"int": int, "float": float, "bool": bool, "str": str, 'float | "SDE"': Union[float, Literal["SDE"]],
         "tuple[float, float, float]": Tuple[float, float, float], "tuple[float, float]": Tuple[float, float],
         "Tuple[float, float, float]": Tuple[float, float, float], "Tuple[float, float]": Tuple[float, float],
         "Dict[str, float]": Dict[str, float]}


def _type(spec):
    return Literal[tuple(spec["choices"])] if spec["choices"] else TYPES[spec["type"]]


def _hints(cls):
    return typing.get_type_hints(cls.__init__, vars(inspect.getmodule(cls)))


def _params(fn):
    return [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]


def test_unified_sampler_signature_is_the_table():
    params = _params(UnifiedSampler.__init__)
    assert [p.name for p in params] == [s["name"] for s in SAMPLER_SETTINGS]
    hints = _hints(UnifiedSampler)
    for p, s in zip(params, SAMPLER_SETTINGS):
        assert p.kind == (P.POSITIONAL_OR_KEYWORD if s["saved"] else P.KEYWORD_ONLY), s["name"]
        assert p.default == s["default"], s["name"]
        assert hints[p.name] == _type(s), (s["name"], hints[p.name])
    assert UnifiedSampler().to_dict() == UnifiedSampler(**{s["name"]: s["default"] for s in SAMPLER_SETTINGS}).to_dict()


def test_twinflow_loss_signature_is_the_table():
    params = _params(TwinFlowLoss.__init__)
    assert [p.name for p in params[:2]] == ["recipe", "batch_calls"]
    settings = params[2:]
    assert [p.name for p in settings] == [s["name"] for s in LOSS_SETTINGS]
    hints = _hints(TwinFlowLoss)
    for p, s in zip(settings, LOSS_SETTINGS):
        assert p.kind == P.KEYWORD_ONLY and p.default is None, s["name"]  # None: the recipe's value
        assert hints[p.name] == Optional[_type(s)], (s["name"], hints[p.name])
    # Every setting given by keyword reaches the objective (a recipe's defaults otherwise).
    loss = TwinFlowLoss("rcgm", estimate_order=3, loss="l2")
    assert loss.config["estimate_order"] == 3 and loss.config["loss"] == "l2"
    with pytest.raises(TypeError, match="no_such_setting"):
        TwinFlowLoss(no_such_setting=1.0)


@pytest.mark.parametrize("cls", [UnifiedSampler, TwinFlowLoss])
def test_every_parameter_is_annotated(cls):
    assert set(_hints(cls)) == {p.name for p in _params(cls.__init__)} | {"return"}


USER_SCRIPT = '''
import torch

from twinflow import TwinFlowLoss, TwinFlowScheduler, UnifiedSampler


def velocity(x: torch.Tensor, t: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
    return x * t.view(-1, 1) - 0.5 * tt.view(-1, 1)


sampler = UnifiedSampler(sampling_steps=2, stochast_ratio=1.0, rfba_gap_steps=(0.001, 0.6))
x0: torch.Tensor = sampler.sample(velocity, torch.randn(4, 2), generator=torch.Generator().manual_seed(0))
nfe: int = sampler.nfe
preset: UnifiedSampler = UnifiedSampler.preset("1-nfe")
loss_fn = TwinFlowLoss("rcgm", estimate_order=3, loss="l2")
scheduler = TwinFlowScheduler(stochast_ratio=0.5, time_grid="pipeline")
'''


@pytest.mark.slow
def test_mypy_strict_accepts_a_user_script(tmp_path):
    """What a user's type checker sees of the public API: no errors under mypy --strict (the
    installed package ships py.typed and _core.pyi). The script is also run, so it is real."""
    import subprocess
    import sys

    pytest.importorskip("mypy")
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    # transformers and peft (5.5k modules, two thirds of what mypy reads here, 67 s → 40 s) appear
    # nowhere in the script or in these classes' signatures; torch and diffusers (the scheduler's
    # bases) are read in full.
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\n[mypy-transformers.*]\nfollow_imports = skip\n[mypy-peft.*]\nfollow_imports = skip\n")
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--config-file", str(config),
                        "--cache-dir", str(tmp_path / "cache"), str(script)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_scheduler_signature_follows_the_sampler_table():
    """TwinFlowScheduler takes the sampler's saved settings (not the step count: that is the
    pipeline's num_inference_steps) under their names and defaults, plus its own two."""
    from twinflow import TwinFlowScheduler

    params = {p.name: p for p in _params(TwinFlowScheduler.__init__)}
    saved = [s for s in SAMPLER_SETTINGS if s["saved"] and s["name"] != "sampling_steps"]
    assert set(params) == {s["name"] for s in saved} | {"num_train_timesteps", "time_grid"}
    for s in saved:
        assert params[s["name"]].default == s["default"], s["name"]
    assert set(_hints(TwinFlowScheduler)) == set(params)  # every parameter annotated (no return hint: diffusers')
