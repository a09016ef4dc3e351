"""TwinFlow patch for diffusers' ``Lumina2Transformer2DModel`` (Lumina-Image 2.0), docs/algorithm.md §4.

Time convention, reversed as Z-Image's: ``Lumina2Pipeline`` calls the transformer with
``timestep = 1 − t/1000`` for the scheduler's ``t = 1000·σ`` ("Lumina uses t=0 as the noise
and t=1 as the image") and negates its output; the transformer feeds that time unscaled to
``time_caption_embed(hidden_states, timestep, encoder_hidden_states)``, which returns
(time embedding, caption embedding). A signed TwinFlow time t maps to

    t_L = copysign(1 − |t|, t)     (t = 0 → 1, the data end; fake times t < 0 → t_L < 0)

computed as the pipeline does, 1 − (1000·|t|)/1000, so that training and the pipeline feed
bit-identical times. Unlike the published Z-Image wrapper's torch.sign, copysign keeps tt = 0 at
the data end (t_L = 1) and −0 negative; no TwinFlow Lumina-2 checkpoint is published.

mode "aux"::

    temb = time_embed(t_L) + emb₂(tt_L)·(t − tt)

``emb₂`` (``time_caption_embed_2``) is the timestep path of the main embedder (``time_proj``,
``timestep_embedder.linear_{1,2}``), copied: Z-Image's published aux embedder, the model
nearest Lumina-2 (a copy of its timestep MLP, fed its reversed time), and Qwen-Image's are
copies. The caption embedding is untouched. t and tt are both read back from model times
(t = copysign(1 − |t_L|, t_L), tt through tt_L), so tt = t gives a factor of exactly 0.

mode "lora"::

    temb = time_embed(l_L),  l = t − tt/2
"""

from __future__ import annotations

import torch

from ._backbone import Backbone, TimestepPath
from ._common import lora_label, target_time

AUX = "time_caption_embed_2"
#: Lumina2Pipeline's num_train_timesteps: its time is 1 − (1000·σ)/1000
_STEPS = 1000.0

__all__ = ["AUX_PREFIX", "BACKBONE", "from_model_time", "patch", "to_model_time", "unpatch"]


def to_model_time(t: torch.Tensor) -> torch.Tensor:
    """Lumina-2's time of a signed TwinFlow time: copysign(1 − |t|, t), in the pipeline's
    arithmetic (1 − (1000·|t|)/1000)."""
    return torch.copysign(1.0 - (t.abs() * _STEPS) / _STEPS, t)


def from_model_time(t_l: torch.Tensor) -> torch.Tensor:
    """The signed TwinFlow time of a Lumina-2 time (the inverse of ``to_model_time``)."""
    return torch.copysign(1.0 - t_l.abs(), t_l)


def _times(transformer, timestep):
    """(t, tt) in t units, at least float32, both read back from Lumina-2 times."""
    t_l = timestep.to(torch.promote_types(timestep.dtype, torch.float32))
    t = from_model_time(t_l)
    return t, from_model_time(to_model_time(target_time(transformer, t)))


def _aux_forward(transformer, orig, hidden_states, timestep, encoder_hidden_states):
    temb, caption = orig(hidden_states, timestep, encoder_hidden_states)
    t, tt = _times(transformer, timestep)
    aux = transformer._modules[AUX](to_model_time(tt), hidden_states.dtype)
    return temb + aux * (t - tt).to(aux.dtype).unsqueeze(-1), caption


def _lora_forward(transformer, orig, hidden_states, timestep, encoder_hidden_states):
    t, tt = _times(transformer, timestep)
    return orig(hidden_states, to_model_time(lora_label(t, tt)).to(timestep.dtype), encoder_hidden_states)


class Lumina2(Backbone):
    name, label = "lumina2", "Lumina-Image 2.0"
    transformer_class_name, pipeline_class_name = "Lumina2Transformer2DModel", "Lumina2Pipeline"
    embed_name, aux_name, aux_init = "time_caption_embed", AUX, "copy"
    text_keys = ("prompt_embeds", "prompt_attention_mask")
    #: the unconditional branch as Lumina2Pipeline encodes it: its negative prompt "", without the
    #: system prompt that encode_prompt puts before every prompt (None below)
    null_texts = (None,)
    block_attrs = ("noise_refiner", "context_refiner", "layers")
    forwards = {"aux": _aux_forward, "lora": _lora_forward}

    def make_aux(self, embed):
        return TimestepPath.copy_of(embed)

    def call(self, transformer, x, t, cond):
        # Lumina2Pipeline: latents unpacked, time t_L, output negated
        out = transformer(hidden_states=x, timestep=to_model_time(t), encoder_hidden_states=cond[0],
                          encoder_attention_mask=cond[1], return_dict=False)[0]
        return -out

    def encode_text(self, pipe, texts, device):
        texts = list(texts)
        if texts and all(p is None for p in texts):  # the pipeline's own negative-prompt path
            _, _, embeds, mask = pipe.encode_prompt([""] * len(texts), do_classifier_free_guidance=True,
                                                    negative_prompt=[""] * len(texts), device=device)
        elif any(p is None for p in texts):
            raise ValueError("lumina2.encode_text: texts mixes None (the unconditional prompt) with prompts; "
                             "encode them in separate calls")
        else:
            embeds, mask, _, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False, device=device)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}


BACKBONE = Lumina2()
AUX_PREFIX = BACKBONE.aux_prefix
patch, unpatch = BACKBONE.patch, BACKBONE.unpatch
