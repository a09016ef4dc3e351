"""TwinFlow on FLUX.1 Kontext (diffusers ``FluxKontextPipeline``), docs/algorithm.md §4.

The transformer is FLUX's (``FluxTransformer2DModel``), and so is the patch (``flux``: the aux
timestep path fed 1000·tt, the LoRA label t − tt/2; its ``Flux`` declaration is subclassed).
What editing adds:

* the reference image is conditioning, never noised: ``FluxKontextPipeline`` VAE-encodes it
  (posterior mode, ``sample_mode="argmax"``, then (z − shift)·scale), packs it into 2×2 tokens,
  appends them to the noisy target's (``torch.cat([latents, image_latents], dim=1)``) with RoPE
  ids whose first axis is 1 (``image_ids[..., 0] = 1``; the target's is 0), and keeps the
  output's first tokens. ``call`` does the same with the reference latents ending the cond list;
* its time: FLUX embeds one temb for the whole sequence (``time_text_embed(timestep, guidance,
  pooled)``, one row per sample): the reference tokens have no time embedding of their own and
  are modulated by the target's, told apart only by their ids. TwinFlow keeps that: they get
  temb(t, tt) as the stock model gives them temb(t), so at tt = t the model is the stock one;
* the text: FLUX's CLIP and T5 do not read the reference, so ``encode_text`` ignores it; the
  unconditional text is the empty prompt, the reference still in the call.

No TwinFlow Kontext recipe is published: training follows the published Qwen-Image-Edit one
(``qwen_image_edit``: the reference in both branches of the guidance-enhanced target).
``max_area`` = height · width keeps the requested output size (the pipeline rescales it to
1 MP otherwise); the reference is resized by the pipeline (``_auto_resize``: to the nearest
Kontext training resolution).
"""

from __future__ import annotations

from ._edit import reference_images
from .flux import AUX_PREFIX, Flux

__all__ = ["AUX_PREFIX", "BACKBONE", "patch", "unpatch"]


class FluxKontext(Flux):
    name, label = "flux-kontext", "FLUX.1 Kontext"
    pipeline_class_name = "FluxKontextPipeline"
    edit = True

    def exact_size_kwargs(self, height: int, width: int):
        return {**super().exact_size_kwargs(height, width), "max_area": height * width}

    def reference_arg(self, pipe, image, prompts: int):
        return image  # the pipeline repeats one reference for every prompt

    def call(self, transformer, x, t, cond):
        return self._velocity(transformer, x, t, cond[0], cond[1], reference=cond[2])

    def encode_text(self, pipe, texts, device, references=None):
        reference_images(self.name, references, len(texts))  # the same contract as every editing family
        return super().encode_text(pipe, texts, device)


BACKBONE = FluxKontext()
patch, unpatch = BACKBONE.patch, BACKBONE.unpatch
