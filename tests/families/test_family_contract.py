"""The contract every registered family keeps, checked on each one by being registered
(``twinflow.tiny.BACKBONES`` and ``VIDEO_BACKBONES``: a family with a tiny pipeline builder is in
this suite; a video family — ``Backbone.video`` — gets latents [B, C, F, h, w]).

Through the trainer's call path (``TwinFlowModel`` → ``Backbone.call`` → patched transformer),
on the family's tiny random-weight transformer:

1. aux mode with tt = t is the stock model (trained-looking aux weights, which the (t − tt)
   factor must cancel exactly);
2. aux mode with tt ≠ t differs from the stock model, and depends on the aux weights;
3. LoRA mode adds no weights, and at (t, tt) is the stock model at the label t − tt/2;
4. the state dict gains exactly the aux keys (``aux_prefix``) in aux mode and none in LoRA
   mode; unpatching restores the stock keys and outputs;
5. a saved pipeline of the family loaded as the next registered family is a ValueError naming
   both transformer classes.

The rest of the contract runs in the backbone-parametrised suites: save_pretrained →
load_pipeline round trip (test_load_pipeline), a training step in each mode
(test_train_backbones), a 2-step generation through the stock pipeline class with
TwinFlowScheduler (test_load_pipeline, test_generate_cli).

Each family's formula itself (against a float64 transcription, or the published wrapper) is
checked in its own module test (tests/families/test_patch_*.py, tests/families/test_published_fidelity.py). An
editing family's model call gets reference latents too (another token grid than x): with
Qwen-Image-Edit's ``zero_cond_t`` the reference half of the time embedding is in every check.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tiny_pipelines import (BACKBONES as IMAGE_BACKBONES, build_transformer, family_inputs, one_thread,  # noqa: F401
                            perturb, saved_pipeline)
from twinflow.tiny import VIDEO_BACKBONES
from twinflow import diffusers_patch, load_pipeline
from twinflow.training.models import TwinFlowModel

BACKBONES = IMAGE_BACKBONES + VIDEO_BACKBONES
B = 4
# dyadic times: exact on both sides of a family's time conversion (Z-Image's t_z = 1 − t)
T = torch.tensor([0.875, 0.625, 0.375, 0.125])
TT = torch.tensor([0.0, 0.25, 0.375, 0.0625])


def _inputs(model, transformer):
    """Latents [B, C, 8, 8] ([B, C, 2, 8, 8] for a video family) and the cond list (text tensors;
    an editing family's reference latents last), built from the family's config
    (tiny_pipelines.family_inputs)."""
    return family_inputs(model, transformer, B)


def _call(net, x, t, tt, cond):
    with torch.no_grad():
        return net(x, t, tt, c=cond)


def _stock(bb, transformer, x, t, cond):
    """The family's call on an unpatched transformer: the stock model at time t."""
    with torch.no_grad():
        return bb.call(transformer, x, t, list(cond))


def _setup(model, mode):
    """(backbone, stock transformer, latents, cond, a patched copy in `mode`)."""
    bb = diffusers_patch.backbone(model)
    stock = build_transformer(model)
    x, cond = _inputs(model, stock)
    return bb, stock, x, cond, diffusers_patch.patch(copy.deepcopy(stock), model, mode=mode)


@pytest.mark.parametrize("model", BACKBONES)
def test_aux_mode_is_the_stock_model_at_tt_equal_t_and_uses_its_weights(model):
    bb, stock, x, cond, patched = _setup(model, "aux")
    perturb(patched, seed=7, prefix=bb.aux_prefix)
    ref = _stock(bb, stock, x, T, cond)
    net = TwinFlowModel(patched, bb)
    assert torch.equal(_call(net, x, T, T, cond), ref)
    moved = _call(net, x, T, TT, cond)
    assert not torch.allclose(moved, ref, atol=1e-5)
    perturb(patched, seed=7, prefix=bb.aux_prefix)
    assert not torch.allclose(_call(net, x, T, TT, cond), moved, atol=1e-5)


@pytest.mark.parametrize("model", BACKBONES)
def test_lora_mode_is_the_stock_model_at_the_label(model):
    bb, stock, x, cond, patched = _setup(model, "lora")
    label = T - TT / 2
    want = _stock(bb, stock, x, label, cond)
    torch.testing.assert_close(_call(TwinFlowModel(patched, bb), x, T, TT, cond), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", BACKBONES)
def test_keys_added_and_unpatch_restores_the_stock_model(model):
    bb = diffusers_patch.backbone(model)
    stock = build_transformer(model)
    x, cond = _inputs(model, stock)
    keys = set(stock.state_dict())
    aux = diffusers_patch.patch(copy.deepcopy(stock), model, mode="aux")
    added = set(aux.state_dict()) - keys
    assert added and all(k.startswith(bb.aux_prefix) for k in added) and keys <= set(aux.state_dict())
    lora = diffusers_patch.patch(copy.deepcopy(stock), model, mode="lora")
    assert set(lora.state_dict()) == keys
    ref = _stock(bb, stock, x, T, cond)
    for patched in (aux, lora):
        _call(TwinFlowModel(patched, bb), x, T, TT, cond)  # leaves a target time wired
        bb.unpatch(patched)
        assert set(patched.state_dict()) == keys
        assert torch.equal(_stock(bb, patched, x, T, cond), ref)


@pytest.mark.parametrize("model", BACKBONES)
def test_a_checkpoint_of_another_family_is_refused_naming_both(model):
    other = BACKBONES[(BACKBONES.index(model) + 1) % len(BACKBONES)]
    want = {m: diffusers_patch.backbone(m).transformer_class_name for m in (model, other)}
    if want[model] == want[other]:  # variants sharing a transformer class: told apart by their pipelines
        want = {m: diffusers_patch.backbone(m).pipeline_class_name for m in (model, other)}
    with pytest.raises(ValueError) as err:
        load_pipeline(saved_pipeline(model, "stock"), other)
    assert want[model] in str(err.value) and want[other] in str(err.value), str(err.value)
