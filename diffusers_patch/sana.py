"""TwinFlow patch for ``diffusers.SanaTransformer2DModel`` (stock Sana, also OpenUni's backbone), docs/algorithm.md §4.

Time convention: SanaPipeline passes ``timestep = t_s · timestep_scale`` where t_s is the
scheduler's timestep, ``1000·t`` for its flow-matching schedulers (t in "t units", 1 = noise,
0 = data); so the transformer gets ``S·t`` with ``S = 1000 · config.timestep_scale``. The
transformer embeds it with
``timestep, embedded_timestep = self.time_embed(timestep, batch_size=..., hidden_dtype=...)``
(``AdaLayerNormSingle``: ``embedded = emb(timestep)``, ``modulation = linear(silu(embedded))``;
the modulation feeds every block, the embedded timestep the output norm). That call is the
only one hooked: the ``forward`` of the ``time_embed`` instance is replaced (parameter names
unchanged).

mode "aux" (docs/algorithm.md §4 row "Sana (OpenUni)", as the published OpenUni Sana wrapper)::

    (mod, emb)   = time_embed(S·t)
    (mod₂, emb₂) = time_embed_2(S·tt)
    returns (mod + mod₂·(t − tt), emb + emb₂·(t − tt))

i.e. the aux term is added to both the modulation and the embedded timestep. t = timestep/S,
tt = ``_common.target_time`` (tt = t when none is set: stock output exactly). docs/algorithm.md writes
emb₂(tt); here tt is given to emb₂ in the embedder's own input units (S·tt, like the main
embedder and like the SD3 row), while the scale (t − tt) is in t units. ``time_embed_2`` is an
``AdaLayerNormSingle`` like ``time_embed`` (published key prefix ``time_embed_2.``); without
trained weights its Linear layers start from N(0, 0.02) weights and zero biases, as the
published training does.

mode "lora"::  time_embed(S·(t − tt/2)), no second embedder.

Not supported: ``guidance_embeds=True`` (Sana-Sprint: its pipeline passes a TrigFlow-derived
timestep without ``timestep_scale``, a different convention) — ValueError. OpenUni's own
wrapper around Sana is not part of diffusers and is not patched here.
"""

from __future__ import annotations

import inspect

import torch

from ._backbone import Backbone, ones_mask
from ._common import lora_label, scaled_times

AUX = "time_embed_2"
#: scheduler timesteps are t · NUM_TRAIN_TIMESTEPS (before the pipeline's timestep_scale)
NUM_TRAIN_TIMESTEPS = 1000.0

__all__ = ["AUX_PREFIX", "BACKBONE", "patch", "unpatch"]


def _scale(transformer) -> float:
    """S: the transformer's timestep is t · S."""
    return NUM_TRAIN_TIMESTEPS * float(transformer.config.timestep_scale)


def _aux_forward(transformer, orig, timestep, *args, **kwargs):
    mod, emb = orig(timestep, *args, **kwargs)
    scale = _scale(transformer)
    t, tt = scaled_times(transformer, timestep, scale)
    mod2, emb2 = transformer._modules[AUX](tt * scale, *args, **kwargs)
    d = (t - tt).unsqueeze(-1)
    return mod + mod2 * d.to(mod2.dtype), emb + emb2 * d.to(emb2.dtype)


def _lora_forward(transformer, orig, timestep, *args, **kwargs):
    scale = _scale(transformer)
    t, tt = scaled_times(transformer, timestep, scale)
    return orig(lora_label(t, tt) * scale, *args, **kwargs)


class Sana(Backbone):
    name, label = "sana", "Sana"
    transformer_class_name, pipeline_class_name, vae_class_name = (
        "SanaTransformer2DModel", "SanaPipeline", "AutoencoderDC")
    embed_name, aux_name, aux_init = "time_embed", AUX, "normal"  # published initialisation
    # SanaPipeline otherwise renders at the nearest trained aspect-ratio bin and resizes.
    exact_size = (("use_resolution_binning", False),)
    text_keys = ("prompt_embeds", "prompt_attention_mask")
    forwards = {"aux": _aux_forward, "lora": _lora_forward}

    def check_config(self, transformer):
        if transformer.config.guidance_embeds:
            raise ValueError("sana.patch: guidance_embeds=True (Sana-Sprint) is not supported: "
                             "its pipeline uses a different timestep convention")

    def call(self, transformer, x, t, cond):
        return transformer(hidden_states=x, encoder_hidden_states=cond[0], encoder_attention_mask=cond[1],
                           timestep=t * _scale(transformer), return_dict=False)[0]

    def encode_text(self, pipe, texts, device):
        # SanaPipeline.__call__ prefixes prompts with its "complex human instruction" by default;
        # train on the embeddings inference will use.
        chi = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
        pe, mask, _, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False, device=device,
                                            complex_human_instruction=chi)
        return {"prompt_embeds": pe, "prompt_attention_mask": ones_mask(pe, mask)}

    def encode_latents(self, vae, pixels, generator):
        return vae.encode(pixels.to(vae.dtype)).latent.float() * vae.config.scaling_factor

    def decode_latents(self, vae, latents):
        return vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float()


BACKBONE = Sana()
AUX_PREFIX = BACKBONE.aux_prefix
patch, unpatch = BACKBONE.patch, BACKBONE.unpatch
