"""TwinFlow patch for diffusers' ``FluxTransformer2DModel`` (FLUX.1 dev and schnell), docs/algorithm.md §4.

Time convention: ``FluxPipeline`` calls the transformer with ``timestep = σ`` (t units, 1 =
noise), and the transformer multiplies it by 1000 before
``temb = self.time_text_embed(timestep, [guidance,] pooled_projections)`` (the guidance-
distilled dev model also embeds ``guidance``·1000; schnell has no guidance input). That call is
hooked: the embedder receives 1000·t, so t = timestep / 1000.

mode "aux"::

    temb = time_text_embed(1000·t, [1000·g,] pooled) + emb₂(1000·tt)·(t − tt)

``emb₂`` (``time_text_embed_2``) is the timestep path only — a copy of ``time_proj`` (no
weights) and ``timestep_embedder`` (``linear_1``, ``linear_2``) of the main embedder, applied to
tt: the aux term depends on the target time alone, and the guidance and pooled-text parts of
the main embedder are untouched. No TwinFlow FLUX checkpoint is published; this is the design
the published Qwen-Image aux embedder follows (the timestep path, copy-initialised).

mode "lora"::

    temb = time_text_embed(1000·(t − tt/2), [1000·g,] pooled)

The guidance embedding of FLUX.1-dev stays as it is (the pipeline's ``guidance_scale``, 3.5 by
default); TwinFlow training feeds it ``TRAIN_GUIDANCE``. Classifier-free guidance proper is
``FluxPipeline``'s ``true_cfg_scale`` (off at 1, as TwinFlow models run).
"""

from __future__ import annotations

import torch

from ._backbone import Backbone, TimestepPath, ids_2x2, pack_2x2, scaled_timestep_forwards, unpack_2x2

AUX = "time_text_embed_2"
#: the transformer embeds timestep · TIME_SCALE
TIME_SCALE = 1000.0
#: the distilled guidance value a training step feeds FLUX.1-dev (FluxPipeline's default)
TRAIN_GUIDANCE = 3.5

__all__ = ["AUX_PREFIX", "BACKBONE", "patch", "unpatch"]


class Flux(Backbone):
    name, label = "flux", "FLUX.1"
    transformer_class_name, pipeline_class_name = "FluxTransformer2DModel", "FluxPipeline"
    embed_name, aux_name, aux_init = "time_text_embed", AUX, "copy"
    cfg_kwarg = "true_cfg_scale"
    text_keys = ("prompt_embeds", "pooled_prompt_embeds")
    block_attrs = ("transformer_blocks", "single_transformer_blocks")
    forwards = scaled_timestep_forwards(AUX, TIME_SCALE, aux_gets="dtype")

    def make_aux(self, embed):
        return TimestepPath.copy_of(embed)

    def call(self, transformer, x, t, cond):
        return self._velocity(transformer, x, t, cond[0], cond[1])

    @staticmethod
    def _velocity(transformer, x, t, embeds, pooled, reference=None):
        """FluxPipeline._pack_latents / _prepare_latent_image_ids / _unpack_latents; FLUX Kontext
        appends the reference's tokens, their ids' first axis 1 (FluxKontextPipeline.prepare_latents),
        and keeps the output's first tokens, those of x."""
        b, c, h, w = x.shape
        tokens, ids = pack_2x2(x), [ids_2x2(x.shape, x.device, x.dtype)]
        if reference is not None:
            tokens = torch.cat([tokens, pack_2x2(reference.to(x.dtype))], dim=1)
            ids.append(ids_2x2(reference.shape, x.device, x.dtype, index=1.0))
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = (torch.full((b,), TRAIN_GUIDANCE, device=x.device, dtype=x.dtype)
                    if transformer.config.guidance_embeds else None)
        out = transformer(hidden_states=tokens, encoder_hidden_states=embeds, pooled_projections=pooled,
                          timestep=t, guidance=guidance, img_ids=torch.cat(ids), txt_ids=txt_ids,
                          return_dict=False)[0]
        return unpack_2x2(out[:, : (h // 2) * (w // 2)], x.shape)

    def encode_text(self, pipe, texts, device):
        pe, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, device=device)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}


BACKBONE = Flux()
AUX_PREFIX = BACKBONE.aux_prefix
patch, unpatch = BACKBONE.patch, BACKBONE.unpatch
