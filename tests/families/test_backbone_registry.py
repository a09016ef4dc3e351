"""diffusers_patch's backbone registry: one home per backbone, one list of backbones.

Every module that needs something backbone-specific (loading, generate, training config and
glue) derives it from ``diffusers_patch.BACKBONES``; a backbone may bring a pipeline class of its
own (not a diffusers class name), which ``twinflow.load_pipeline`` then uses.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch


import diffusers  # noqa: E402

from twinflow import diffusers_patch  # noqa: E402
from twinflow.diffusers_patch import Backbone  # noqa: E402
from twinflow.diffusers_patch.sd3 import SD3  # noqa: E402
from tiny_pipelines import one_thread, saved_pipeline  # noqa: E402,F401


def test_every_view_lists_the_registry():
    from twinflow.cli import build_parser

    names = list(diffusers_patch.BACKBONES)
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    model_choices = next(a.choices for a in generate._actions if a.dest == "model")
    assert list(model_choices) == names


@pytest.mark.parametrize("name", list(diffusers_patch.BACKBONES))
def test_backbone_declares_its_parts(name):
    bb = diffusers_patch.backbone(name)
    mod = diffusers_patch.module_for(name)
    assert isinstance(bb, Backbone) and bb.name == name and bb.label
    assert mod.AUX_PREFIX == bb.aux_prefix
    assert issubclass(bb.transformer_class(), diffusers.ModelMixin)
    assert issubclass(bb.pipeline_class(), diffusers.DiffusionPipeline)
    assert issubclass(bb.vae_class(), diffusers.ModelMixin)
    assert set(bb.forwards) == {"aux", "lora"}
    assert bb.aux_init in ("copy", "normal") and bb.text_keys
    # the names the user may type
    assert diffusers_patch.backbone(name.upper().replace("-", "_")) is bb


def test_the_old_registry_names_still_work_with_a_warning():
    from twinflow import pipelines

    with pytest.warns(DeprecationWarning, match="BACKBONES"):
        assert diffusers_patch.MODELS is diffusers_patch.BACKBONES
    with pytest.warns(DeprecationWarning, match="backbone"):
        spec = pipelines.MODELS["sd3"]
    bb = diffusers_patch.backbone("sd3")
    assert (spec.pipeline, spec.transformer, spec.cfg_kwarg) == (
        bb.pipeline_class_name, bb.transformer_class_name, bb.cfg_kwarg)


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ValueError, match="unknown backbone 'hidream'.*sd3"):
        diffusers_patch.backbone("hidream")


class _OwnSD3Pipeline(diffusers.StableDiffusion3Pipeline):
    """Stands in for a pipeline class of our own (not reachable as diffusers.<name>)."""


class _OwnPipelineSD3(SD3):
    name, label, pipeline_class_name = "sd3-own", "SD3 with its own pipeline class", "_OwnSD3Pipeline"

    def pipeline_class(self):
        return _OwnSD3Pipeline


def test_a_backbone_may_bring_its_own_pipeline_class(monkeypatch):
    from twinflow import load_pipeline

    module = types.ModuleType("twinflow_tests.own_backbone")  # a full dotted module path
    module.BACKBONE, module.AUX_PREFIX = _OwnPipelineSD3(), _OwnPipelineSD3().aux_prefix
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(diffusers_patch.BACKBONES, "sd3-own", module.__name__)
    with pytest.warns(UserWarning, match="aux"):
        pipe = load_pipeline(saved_pipeline("sd3", "stock"), "sd3-own")
    assert type(pipe) is _OwnSD3Pipeline
    assert diffusers_patch.is_patched(pipe.transformer)
    assert isinstance(pipe.transformer.time_text_embed_2, torch.nn.Module)
