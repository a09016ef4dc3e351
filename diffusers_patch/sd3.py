"""TwinFlow patch for ``diffusers.SD3Transformer2DModel`` (SD3 / SD3.5), docs/algorithm.md §4.

Time convention: StableDiffusion3Pipeline passes ``timestep = 1000·t`` (t in "t units",
1 = noise, 0 = data), and the transformer embeds it with
``temb = self.time_text_embed(timestep, pooled_projections)``
(``CombinedTimestepTextProjEmbeddings``: sinusoidal projection of the raw timestep, MLP, plus
the projected pooled text embedding). That call is the only one hooked here: the
``forward`` of the ``time_text_embed`` instance is replaced (parameter names unchanged).

mode "aux" (docs/algorithm.md §4 row "SD3 / SD3.5")::

    temb = time_text_embed(1000·t, pooled) + time_text_embed_2(1000·tt, pooled)·(t − tt)

with t = timestep / 1000 and tt = ``_common.target_time`` (tt = t when none is set, so the
stock output is kept exactly). ``time_text_embed_2`` is a full
``CombinedTimestepTextProjEmbeddings`` (timestep and pooled-text parts) registered as a
submodule, so ``state_dict()`` gains exactly the keys under ``AUX_PREFIX`` = the published
``time_text_embed_2.*``. Without trained weights its Linear layers start from N(0, 0.02)
weights and zero biases, as the published training does (not a copy of the main embedder).

mode "lora" (docs/algorithm.md §4 row "LoRA variant")::

    temb = time_text_embed(1000·(t − tt/2), pooled)          (no second embedder)

Not hooked: the IP-adapter ``image_proj(..., timestep)`` (it keeps the raw timestep).
"""

from __future__ import annotations

from ._backbone import Backbone, scaled_timestep_forwards

AUX = "time_text_embed_2"
#: the pipeline's timestep is t · TIME_SCALE
TIME_SCALE = 1000.0

__all__ = ["AUX_PREFIX", "BACKBONE", "patch", "unpatch"]


class SD3(Backbone):
    name, label = "sd3", "SD3 / SD3.5"
    transformer_class_name, pipeline_class_name = "SD3Transformer2DModel", "StableDiffusion3Pipeline"
    embed_name, aux_name, aux_init = "time_text_embed", AUX, "normal"  # published initialisation
    text_keys = ("prompt_embeds", "pooled_prompt_embeds")
    forwards = scaled_timestep_forwards(AUX, TIME_SCALE, aux_gets="args")

    def call(self, transformer, x, t, cond):
        return transformer(hidden_states=x, encoder_hidden_states=cond[0], pooled_projections=cond[1],
                           timestep=t * TIME_SCALE, return_dict=False)[0]

    def encode_text(self, pipe, texts, device):
        pe, _, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None, device=device,
                                              do_classifier_free_guidance=False)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}


BACKBONE = SD3()
AUX_PREFIX = BACKBONE.aux_prefix
patch, unpatch = BACKBONE.patch, BACKBONE.unpatch
