"""The editing families' patches on their stock transformers (docs/algorithm.md §4, "Editing
families"; diffusers_patch/qwen_image_edit.py, qwen_image_edit_plus.py, flux_kontext.py), no
pipeline needed:

1. Qwen-Image-Edit with ``zero_cond_t`` (the transformer embeds cat([t, 0·t])): the reference
   half of the time embedding the transformer computes is the stock model's at 0 whatever tt
   is (aux weights trained-looking; aux and LoRA mode); the target half is
   emb(t) + emb₂(tt)·(t − tt) against a float64 evaluation (aux) or the stock embedding at the
   label t − tt/2 (LoRA). Without ``zero_cond_t`` every row is the target's (the reference
   tokens share it, as in the stock model);
2. FLUX Kontext: one embedding per sample for the whole token sequence, reference tokens
   included: the aux formula against float64 and the LoRA label through the Kontext call;
3. ``Backbone.call`` builds the model input as the pipelines do (their own ``_pack_latents``,
   the reference's tokens appended, Qwen's img_shapes [[target, reference]], Kontext's ids with
   first axis 1) and keeps the target's tokens;
4. the declarations: subclasses of the base families with their hooks and aux keys, Edit-Plus's
   condition size from diffusers, and the errors (no references, batches Plus refuses, a
   family that does not edit, torchvision missing).
The registry-wide contract (tt = t is stock with the reference in the call, LoRA, keys) runs on
these families in tests/families/test_family_contract.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from checks import expect_error
from tiny_pipelines import build_transformer, family_inputs, one_thread, perturb  # noqa: F401 (autouse fixture)
from twinflow import diffusers_patch
from twinflow.diffusers_patch.flux import Flux
from twinflow.diffusers_patch.qwen_image import QwenImage

B = 3
T = torch.tensor([0.875, 0.5, 0.25])
#: target times: 0 (the one-step jump), between, equal to t, and above t
TTS = [torch.zeros(3), torch.tensor([0.25, 0.125, 0.0625]), T.clone(), torch.tensor([1.0, 0.75, 0.5])]
F64 = torch.float64


def _qwen(zero_cond_t: bool):
    """The tiny Qwen-Image-Edit transformer (zero_cond_t as given), its inputs, a stock copy."""
    from diffusers import QwenImageTransformer2DModel

    stock = build_transformer("qwen-image-edit")
    if not zero_cond_t:
        config = {k: v for k, v in stock.config.items() if not k.startswith("_")}
        torch.manual_seed(0)
        stock = QwenImageTransformer2DModel(**{**config, "zero_cond_t": False}).eval()
    assert stock.zero_cond_t is zero_cond_t
    x, cond = family_inputs("qwen-image-edit", stock, B)
    return stock, x, cond


class Embeddings:
    """The time embedder's outputs during one transformer call (a forward hook)."""

    def __init__(self, module):
        self.seen = []
        self.handle = module.register_forward_hook(lambda m, args, out: self.seen.append((args, out)))


def _run(family, transformer, x, t, tt, cond):
    """The trainer's model call at (t, tt) — TwinFlowModel sets tt around Backbone.call."""
    from twinflow.training.models import TwinFlowModel

    with torch.no_grad():
        return TwinFlowModel(transformer, family)(x, t, tt, c=cond)


# ----------------------------------------------------------------------------- 1. Qwen-Image-Edit

@pytest.mark.parametrize("mode", ["aux", "lora"])
def test_qwen_reference_half_is_the_stock_embedding_at_zero_whatever_tt(mode):
    family = diffusers_patch.backbone("qwen-image-edit")
    stock, x, cond = _qwen(zero_cond_t=True)
    stock_embed = copy.deepcopy(stock.time_text_embed)
    patched = family.patch(copy.deepcopy(stock), mode=mode)
    if mode == "aux":
        perturb(patched.time_text_embed_2)
    hook = Embeddings(patched.time_text_embed)
    for tt in TTS:
        hook.seen.clear()
        _run(family, patched, x, T, tt, cond)
        (timestep, hs, *_), temb = hook.seen[0]
        assert timestep.shape == (2 * B,) and torch.equal(timestep[B:], torch.zeros(B)), "cat([t, 0·t])"
        with torch.no_grad():
            at_zero = stock_embed(timestep, hs)[B:]  # the stock transformer's own reference rows
            target = stock_embed(T - tt / 2, hs) if mode == "lora" else None
        assert torch.equal(temb[B:], at_zero), f"tt={tt.tolist()}: the reference half moved"
        if mode == "lora":
            torch.testing.assert_close(temb[:B], target, rtol=1e-6, atol=1e-6)
        else:  # the target half: emb(t) + emb₂(tt)·(t − tt), float64
            aux64 = copy.deepcopy(patched.time_text_embed_2).double()
            hs64 = hs.double()
            want = (copy.deepcopy(stock_embed).double()(T.double(), hs64)
                    + aux64(tt.double(), hs64) * (T - tt).double()[:, None])
            torch.testing.assert_close(temb[:B].double(), want, rtol=1e-5, atol=1e-5)
            if not torch.equal(tt, T):
                assert not torch.allclose(temb[:B], stock_embed(T, hs), atol=1e-4)


def test_qwen_without_zero_cond_t_the_reference_shares_the_target_embedding():
    family = diffusers_patch.backbone("qwen-image-edit")
    stock, x, cond = _qwen(zero_cond_t=False)
    patched = family.patch(copy.deepcopy(stock))
    perturb(patched.time_text_embed_2)
    hook = Embeddings(patched.time_text_embed)
    tt = TTS[1]
    _run(family, patched, x, T, tt, cond)
    (timestep, hs, *_), temb = hook.seen[0]
    assert torch.equal(timestep, T) and temb.shape[0] == B  # one row per sample, for every token
    aux64 = copy.deepcopy(patched.time_text_embed_2).double()
    want = (copy.deepcopy(stock.time_text_embed).double()(T.double(), hs.double())
            + aux64(tt.double(), hs.double()) * (T - tt).double()[:, None])
    torch.testing.assert_close(temb.double(), want, rtol=1e-5, atol=1e-5)
    # and tt = t is the stock model, the reference tokens in the call
    with torch.no_grad():
        ref = family.call(stock, x, T, cond)
    assert torch.equal(_run(family, patched, x, T, T, cond), ref)


# ----------------------------------------------------------------------------- 2. FLUX Kontext

@pytest.mark.parametrize("mode", ["aux", "lora"])
def test_kontext_one_embedding_for_target_and_reference_tokens(mode):
    family = diffusers_patch.backbone("flux-kontext")
    stock = build_transformer("flux-kontext")
    x, cond = family_inputs("flux-kontext", stock, B)
    stock_embed = copy.deepcopy(stock.time_text_embed)
    patched = family.patch(copy.deepcopy(stock), mode=mode)
    if mode == "aux":
        perturb(patched.time_text_embed_2)
    hook = Embeddings(patched.time_text_embed)
    tt = TTS[1]
    _run(family, patched, x, T, tt, cond)
    (timestep, guidance, pooled), temb = hook.seen[0]
    assert temb.shape[0] == B, "one embedding per sample: the reference tokens have no time of their own"
    torch.testing.assert_close(timestep, 1000 * T)
    if mode == "lora":
        with torch.no_grad():
            want = stock_embed(1000 * (T - tt / 2), guidance, pooled)
        torch.testing.assert_close(temb, want, rtol=1e-6, atol=1e-5)
    else:
        aux64 = copy.deepcopy(patched.time_text_embed_2).double()
        want = (copy.deepcopy(stock_embed).double()(1000 * T.double(), guidance.double(), pooled.double())
                + aux64(1000 * tt.double(), F64) * (T - tt).double()[:, None])
        torch.testing.assert_close(temb.double(), want, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- 3. the pipelines' model input

def test_qwen_call_is_the_edit_pipelines_transformer_call():
    from diffusers import QwenImageEditPipeline

    family = diffusers_patch.backbone("qwen-image-edit")
    stock, x, cond = _qwen(zero_cond_t=True)
    ref = cond[2]
    b, c, h, w = x.shape
    tokens = torch.cat([QwenImageEditPipeline._pack_latents(x[:, None], b, c, h, w),
                        QwenImageEditPipeline._pack_latents(ref[:, None], b, c, *ref.shape[-2:])], dim=1)
    shapes = [[(1, h // 2, w // 2), (1, ref.shape[-2] // 2, ref.shape[-1] // 2)]] * b
    with torch.no_grad():
        out = stock(hidden_states=tokens, timestep=T, encoder_hidden_states=cond[0],
                    encoder_hidden_states_mask=cond[1], img_shapes=shapes, return_dict=False)[0]
        want = QwenImageEditPipeline._unpack_latents(out[:, : (h // 2) * (w // 2)], 8 * h, 8 * w, 8)[:, :, 0]
        assert torch.equal(family.call(stock, x, T, cond), want)
        # the reference is read: another one, another velocity
        other = family.call(stock, x, T, [*cond[:2], torch.randn_like(ref)])
    assert not torch.allclose(other, want, atol=1e-5)


def test_kontext_call_is_the_kontext_pipelines_transformer_call():
    from diffusers import FluxKontextPipeline

    family = diffusers_patch.backbone("flux-kontext")
    stock = build_transformer("flux-kontext")
    x, cond = family_inputs("flux-kontext", stock, B)
    ref = cond[2]
    b, c, h, w = x.shape
    rh, rw = ref.shape[-2:]
    tokens = torch.cat([FluxKontextPipeline._pack_latents(x, b, c, h, w),
                        FluxKontextPipeline._pack_latents(ref, b, c, rh, rw)], dim=1)
    image_ids = FluxKontextPipeline._prepare_latent_image_ids(b, rh // 2, rw // 2, x.device, x.dtype)
    image_ids[..., 0] = 1  # as FluxKontextPipeline.prepare_latents marks the reference
    ids = torch.cat([FluxKontextPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype), image_ids])
    with torch.no_grad():
        out = stock(hidden_states=tokens, timestep=T, guidance=torch.full((b,), 3.5), pooled_projections=cond[1],
                    encoder_hidden_states=cond[0], txt_ids=torch.zeros(cond[0].shape[1], 3), img_ids=ids,
                    return_dict=False)[0]
        want = FluxKontextPipeline._unpack_latents(out[:, : (h // 2) * (w // 2)], 8 * h, 8 * w, 8)
        assert torch.equal(family.call(stock, x, T, cond), want)
        other = family.call(stock, x, T, [*cond[:2], torch.randn_like(ref)])
    assert not torch.allclose(other, want, atol=1e-5)


# ----------------------------------------------------------------------------- 4. declarations, errors

def test_declarations_subclass_their_base_family():
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus_module

    base = {"qwen-image-edit": QwenImage, "qwen-image-edit-plus": QwenImage, "flux-kontext": Flux}
    for name, cls in base.items():
        bb = diffusers_patch.backbone(name)
        parent = diffusers_patch.backbone("qwen-image" if cls is QwenImage else "flux")
        assert isinstance(bb, cls) and bb.edit and not parent.edit
        assert bb.forwards is parent.forwards and bb.aux_prefix == parent.aux_prefix
        assert bb.transformer_class() is parent.transformer_class() and bb.text_keys == parent.text_keys
        assert diffusers_patch.module_for(name).AUX_PREFIX == parent.aux_prefix
    edit, plus = diffusers_patch.backbone("qwen-image-edit"), diffusers_patch.backbone("qwen-image-edit-plus")
    assert plus.condition_area == plus_module.CONDITION_IMAGE_SIZE and edit.condition_area == 1024 * 1024
    assert plus.pipeline_class().__name__ == "QwenImageEditPlusPipeline"
    assert edit.null_texts == ("Edit this image.",)  # the published unconditional edit prompt
    assert edit.area_size(1024 * 1024, 300, 200) == (1248, 832)  # diffusers' calculate_dimensions
    kontext = diffusers_patch.backbone("flux-kontext")
    assert kontext.exact_size_kwargs(48, 80) == {"max_area": 48 * 80}


def test_errors_name_the_problem(monkeypatch):
    from tiny_pipelines import reference_image

    image = reference_image()
    for name in ("qwen-image-edit", "flux-kontext"):
        bb = diffusers_patch.backbone(name)
        expect_error(ValueError, lambda: bb.encode_text(None, ["a", "b"], "cpu"), contains=(name, "reference"))
        expect_error(ValueError, lambda: bb.encode_text(None, ["a", "b"], "cpu", references=[image]),
                     contains=("expected 2 reference images", "got 1"))
        expect_error(ValueError, lambda: bb.encode_text(None, ["a"], "cpu", references=torch.zeros(1, 4, 8, 8)),
                     contains="[B, 3, H, W]")
    edit = diffusers_patch.backbone("qwen-image-edit")
    assert edit.reference_arg(None, image, 1) is image
    # a batch: the images the pipeline would resize one reference to (it leaves a list as it is)
    from types import SimpleNamespace

    from diffusers.image_processor import VaeImageProcessor

    pipe = SimpleNamespace(image_processor=VaeImageProcessor(vae_scale_factor=16))
    batch = edit.reference_arg(pipe, image, 2)
    assert len(batch) == 2 and all(b.size == (1024, 1024) for b in batch)
    assert np.array_equal(np.asarray(batch[0]), np.asarray(edit.condition_image(pipe, image)))
    expect_error(ValueError, lambda: diffusers_patch.backbone("qwen-image-edit-plus").reference_arg(None, image, 2),
                 contains=("one prompt per call", "batch size 1"))
    expect_error(ValueError, lambda: diffusers_patch.backbone("flux").reference_arg(None, image, 1),
                 contains=("flux", "reference image"))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torchvision" else real(n, *a))
    expect_error(ImportError, lambda: diffusers_patch.backbone("qwen-image-edit").check_environment(),
                 contains=("torchvision", "Qwen2VLProcessor"))
    diffusers_patch.backbone("flux-kontext").check_environment()  # needs nothing more than FLUX
