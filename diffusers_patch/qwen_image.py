"""TwinFlow patch for diffusers' ``QwenImageTransformer2DModel`` (SPEC §4).

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

import copy

import torch
from torch import nn

from ._common import TT_ATTR, install, lora_label, target_time, uninstall

AUX_PREFIX = "time_text_embed_2."
MODEL = "qwen-image"
_AUX_NAME = AUX_PREFIX[:-1]

__all__ = ["AUX_PREFIX", "patch", "unpatch"]


class QwenAuxTimeEmbed(nn.Module):
    """emb₂: the main embedder's sinusoidal projection (×1000) and MLP, applied to tt."""

    def __init__(self, time_proj: nn.Module, timestep_embedder: nn.Module):
        super().__init__()
        self.time_proj = time_proj
        self.timestep_embedder = timestep_embedder

    def forward(self, timestep: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        proj = self.time_proj(timestep)
        return self.timestep_embedder(proj.to(dtype=hidden_states.dtype))


def _make_aux(embed: nn.Module) -> nn.Module:
    # Only the timestep path: a full copy would also bring addition_t_embedding.
    return QwenAuxTimeEmbed(copy.deepcopy(embed.time_proj), copy.deepcopy(embed.timestep_embedder))


def _check(transformer) -> None:
    from diffusers import QwenImageTransformer2DModel

    if not isinstance(transformer, QwenImageTransformer2DModel):
        raise TypeError(f"expected a QwenImageTransformer2DModel, got {type(transformer).__name__}")


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


_FORWARDS = {"aux": _aux_forward, "lora": _lora_forward}


def patch(transformer: nn.Module, mode: str = "aux") -> nn.Module:
    """Patch a ``QwenImageTransformer2DModel`` in place (idempotent); returns it.

    An existing ``time_text_embed_2`` (e.g. trained aux weights already attached) is kept;
    otherwise it starts as a copy of ``time_text_embed``'s embedder.
    """
    _check(transformer)
    return install(transformer, model=MODEL, mode=mode, embed_name="time_text_embed", aux_name=_AUX_NAME,
                   forwards=_FORWARDS, make_aux=_make_aux)


def unpatch(transformer: nn.Module) -> nn.Module:
    """Restore the stock behaviour and state dict (drops the aux embedder); returns it."""
    _check(transformer)
    return uninstall(transformer, embed_name="time_text_embed", aux_name=_AUX_NAME)
