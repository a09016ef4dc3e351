"""The contract every diffusers scheduler keeps, checked for TwinFlowScheduler and
TwinFlowPresetScheduler: a saved config reloads equal to the original (for every setting, not
modulo tuple/list), a reloaded scheduler steps to the same numbers, ``return_dict=False`` gives
the same tensor as the output object, ``step`` keeps the sample's shape at any timestep, and
the attributes pipelines read are there.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from twinflow import TwinFlowPresetScheduler, TwinFlowScheduler  # noqa: E402

CLASSES = [TwinFlowScheduler, TwinFlowPresetScheduler]

# One non-default value per setting (and the defaults): each must survive save → reload.
SETTINGS = [
    {},
    {"num_train_timesteps": 500},
    {"stochast_ratio": 0.3},
    {"stochast_ratio": "SDE"},
    {"extrapol_ratio": 0.2},
    {"sampling_order": 2},
    {"time_dist_ctrl": (1.17, 0.8, 1.1)},
    {"time_dist_ctrl": [1.0, 1.0, 1.0]},
    {"rfba_gap_steps": (0.001, 0.5)},
    {"sampling_style": "any"},
    {"time_grid": "pipeline"},
]


def _settings(s):
    """The config without diffusers' bookkeeping of which keys a load left at their defaults."""
    return {k: v for k, v in s.config.items() if k != "_use_default_values"}


def _steps(s, sample, steps=2, seed=0):
    """Run the schedule: a fixed velocity field, a seeded generator; every output kept."""
    s.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    out, x = [], sample
    for t in s.timesteps:
        x = s.step(0.3 * x + 0.1, t, x, generator=g).prev_sample
        out.append(x)
    return out


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda d: ",".join(d) or "defaults")
def test_saved_config_reloads_equal(cls, settings, tmp_path):
    s = cls(**settings)
    s.save_config(tmp_path)
    r = cls.from_pretrained(tmp_path)
    assert _settings(r) == _settings(s)
    assert _settings(cls.from_config(s.config)) == _settings(s)
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1))
    for a, b in zip(_steps(s, x), _steps(r, x)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", CLASSES)
def test_tuple_and_output_object_agree(cls):
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    a, b = cls(), cls()
    for s in (a, b):
        s.set_timesteps(2)
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for t in a.timesteps:
        v = torch.cos(x)
        out = a.step(v, t, x, generator=ga)
        (tup,) = b.step(v, t, x, generator=gb, return_dict=False)
        assert torch.equal(out.prev_sample, tup)
        x = tup


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("shape", [(1, 4), (2, 3, 8, 8), (1, 16, 2, 4, 4)])
def test_step_keeps_the_shape_at_any_timestep(cls, shape):
    for k in range(2):  # each of the two timesteps, started there
        s = cls()
        s.set_timesteps(2)
        s.set_begin_index(k)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(k))
        out = s.step(torch.ones(shape), s.timesteps[k], x, generator=torch.Generator().manual_seed(0)).prev_sample
        assert out.shape == x.shape and out.dtype == x.dtype


@pytest.mark.parametrize("cls", CLASSES)
def test_what_pipelines_read(cls):
    s = cls()
    assert s.init_noise_sigma == 1.0 and s.order == 1
    x = torch.randn(1, 2)
    assert s.scale_model_input(x, 0) is x
    s.set_timesteps(4, device="cpu")
    assert s.num_inference_steps == len(s.timesteps) == 4
    assert s.timesteps.dtype == torch.float32 and s.timesteps[0] <= s.config.num_train_timesteps
    assert len(s.sigmas) == len(s.timesteps) + 1 and s.sigmas[-1] == 0
    assert s.step_index is None and s.begin_index is None
    assert "FlowMatchEulerDiscreteScheduler" in [c.__name__ for c in s.compatibles]
    assert hasattr(s, "scale_noise") and len(s) == s.config.num_train_timesteps
    with pytest.raises(AttributeError):
        s.no_such_attribute  # config keys are reached through .config, unknown names are errors
