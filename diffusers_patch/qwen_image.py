"""TwinFlow patch for diffusers' ``QwenImageTransformer2DModel`` (docs/algorithm.md §4).

Time convention: ``QwenImagePipeline`` calls the transformer with ``timestep = σ`` (t units,
1 = noise), cast to the latents' dtype; ``QwenTimestepProjEmbeddings`` (``time_text_embed``)
scales it ×1000 itself. So the model's time *is* t, and the target time tt is used as is.

mode "aux": a second embedder ``time_text_embed_2`` (its ``time_proj`` + ``timestep_embedder``,
deep copies of the main ones, so the state dict gains exactly
``time_text_embed_2.timestep_embedder.linear_{1,2}.{weight,bias}``) and

    temb = time_text_embed(t, hidden_states) + time_text_embed_2(tt, hidden_states) · (t − tt)

mode "lora": no second embedder; ``time_text_embed`` gets the label ``t − tt/2`` instead of t.

Hook: the ``forward`` of the ``transformer.time_text_embed`` instance is replaced by a
``functools.partial`` (the call site is ``self.time_text_embed(timestep, hidden_states,
additional_t_cond)`` in ``QwenImageTransformer2DModel.forward``); parameter names do not change.
With ``zero_cond_t`` (edit models) the transformer embeds ``cat([t, 0·t])``: the second half
(the clean reference image) keeps tt = t = 0, so it gets no aux term and the label 0.
"""

from __future__ import annotations

import torch

from ._backbone import Backbone, TimestepPath, ones_mask, pack_2x2, posterior, unpack_2x2
from ._common import TT_ATTR, lora_label, target_time

AUX_PREFIX = "time_text_embed_2."
MODEL = "qwen-image"
_AUX_NAME = AUX_PREFIX[:-1]

__all__ = ["AUX_PREFIX", "BACKBONE", "patch", "unpatch"]


class QwenAuxTimeEmbed(TimestepPath):
    """emb₂: the main embedder's sinusoidal projection (×1000) and MLP, applied to tt; called as
    the main embedder is, with the hidden states giving the dtype."""

    def forward(self, timestep: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(timestep, hidden_states.dtype)


def _time_and_target(transformer, timestep: torch.Tensor):
    """(t, tt) for the timestep batch that ``time_text_embed`` receives."""
    if getattr(transformer, "zero_cond_t", False):
        t_main, t_ref = timestep.chunk(2, dim=0)
        return timestep, torch.cat([target_time(transformer, t_main), t_ref], dim=0)
    return timestep, target_time(transformer, timestep)


def _aux_forward(transformer, orig, timestep, hidden_states, *args, **kwargs):
    temb = orig(timestep, hidden_states, *args, **kwargs)
    if getattr(transformer, TT_ATTR, None) is None:  # tt = t: the aux term is exactly 0
        return temb
    t, tt = _time_and_target(transformer, timestep)
    aux = getattr(transformer, _AUX_NAME)(tt, hidden_states)
    return temb + aux * (t - tt).to(aux.dtype).unsqueeze(-1)


def _lora_forward(transformer, orig, timestep, hidden_states, *args, **kwargs):
    t, tt = _time_and_target(transformer, timestep)
    return orig(lora_label(t, tt), hidden_states, *args, **kwargs)


class QwenImage(Backbone):
    name, label = MODEL, "Qwen-Image"
    transformer_class_name, pipeline_class_name, vae_class_name = (
        "QwenImageTransformer2DModel", "QwenImagePipeline", "AutoencoderKLQwenImage")
    embed_name, aux_name, aux_init = "time_text_embed", _AUX_NAME, "copy"
    cfg_kwarg = "true_cfg_scale"
    text_keys = ("prompt_embeds", "prompt_embeds_mask")
    forwards = {"aux": _aux_forward, "lora": _lora_forward}

    def make_aux(self, embed):
        # Only the timestep path: a full copy would also bring addition_t_embedding.
        return QwenAuxTimeEmbed.copy_of(embed)

    def call(self, transformer, x, t, cond):
        return self._velocity(transformer, x, t, cond[0], cond[1])

    @staticmethod
    def _velocity(transformer, x, t, embeds, mask, reference=None):
        """QwenImagePipeline._pack_latents / _unpack_latents: 2×2 patches become tokens; an edit
        pipeline appends the reference's tokens (its img_shapes entry second) and keeps the
        output's first tokens, those of x."""
        b, c, h, w = x.shape
        tokens, shapes = pack_2x2(x), [(1, h // 2, w // 2)]
        if reference is not None:
            tokens = torch.cat([tokens, pack_2x2(reference.to(x.dtype))], dim=1)
            shapes.append((1, reference.shape[-2] // 2, reference.shape[-1] // 2))
        out = transformer(hidden_states=tokens, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                          timestep=t, img_shapes=[shapes] * b, return_dict=False)[0]
        return unpack_2x2(out[:, : (h // 2) * (w // 2)], x.shape)

    def encode_text(self, pipe, texts, device):
        pe, mask = pipe.encode_prompt(prompt=texts, device=device)
        return {"prompt_embeds": pe, "prompt_embeds_mask": ones_mask(pe, mask)}

    @staticmethod
    def _stats(vae, latents):
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(shape)
        return mean, std

    def encode_latents(self, vae, pixels, generator):
        lat = posterior(vae.encode(pixels[:, :, None].to(vae.dtype)).latent_dist, generator).float()
        mean, std = self._stats(vae, lat)
        return ((lat - mean) / std)[:, :, 0]

    def decode_latents(self, vae, latents):
        lat = latents[:, :, None].float()
        mean, std = self._stats(vae, lat)
        return vae.decode((lat * std + mean).to(vae.dtype)).sample[:, :, 0].float()


BACKBONE = QwenImage()
patch, unpatch = BACKBONE.patch, BACKBONE.unpatch
