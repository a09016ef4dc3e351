"""TwinFlow patch for ``diffusers.SD3Transformer2DModel`` (SD3 / SD3.5), SPEC §4.

Time convention: StableDiffusion3Pipeline passes ``timestep = 1000·t`` (t in "t units",
1 = noise, 0 = data), and the transformer embeds it with
``temb = self.time_text_embed(timestep, pooled_projections)``
(``CombinedTimestepTextProjEmbeddings``: sinusoidal projection of the raw timestep, MLP, plus
the projected pooled text embedding). That call is the only one hooked here: the
``forward`` of the ``time_text_embed`` instance is replaced (parameter names unchanged).

mode "aux" (SPEC §4 row "SD3 / SD3.5")::

    temb = time_text_embed(1000·t, pooled) + time_text_embed_2(1000·tt, pooled)·(t − tt)

with t = timestep / 1000 and tt = ``_common.target_time`` (tt = t when none is set, so the
stock output is kept exactly). ``time_text_embed_2`` is a deep copy of ``time_text_embed``
(the published initialisation), registered as a submodule, so ``state_dict()`` gains exactly
the keys under ``AUX_PREFIX``. SPEC gives no published key names for SD3; ``AUX_PREFIX``
mirrors the Qwen-Image naming.

mode "lora" (SPEC §4 row "LoRA variant")::

    temb = time_text_embed(1000·(t − tt/2), pooled)          (no second embedder)

Not hooked: the IP-adapter ``image_proj(..., timestep)`` (it keeps the raw timestep).
"""

from __future__ import annotations

import torch

from ._common import install, lora_label, scaled_times, uninstall

MODEL = "sd3"
MAIN = "time_text_embed"
AUX = "time_text_embed_2"
AUX_PREFIX = AUX + "."
#: the pipeline's timestep is t · TIME_SCALE
TIME_SCALE = 1000.0

__all__ = ["AUX_PREFIX", "patch", "unpatch"]


def _check(transformer) -> None:
    from diffusers import SD3Transformer2DModel

    if not isinstance(transformer, SD3Transformer2DModel):
        raise TypeError(f"sd3.patch: expected a diffusers SD3Transformer2DModel, got {type(transformer).__name__}")


def _aux_forward(transformer, orig, timestep, pooled_projection):
    temb = orig(timestep, pooled_projection)
    t, tt = scaled_times(transformer, timestep, TIME_SCALE)
    aux = transformer._modules[AUX](tt * TIME_SCALE, pooled_projection)
    return temb + aux * (t - tt).to(aux.dtype).unsqueeze(-1)


def _lora_forward(transformer, orig, timestep, pooled_projection):
    t, tt = scaled_times(transformer, timestep, TIME_SCALE)
    return orig(lora_label(t, tt) * TIME_SCALE, pooled_projection)


_FORWARDS = {"aux": _aux_forward, "lora": _lora_forward}


def patch(transformer: torch.nn.Module, mode: str = "aux") -> torch.nn.Module:
    """Patch an SD3Transformer2DModel in place (idempotent); returns it. Wire tt with
    ``diffusers_patch.set_target_time(transformer, scheduler)``."""
    _check(transformer)
    return install(transformer, model=MODEL, mode=mode, embed_name=MAIN, aux_name=AUX, forwards=_FORWARDS)


def unpatch(transformer: torch.nn.Module) -> torch.nn.Module:
    """Restore the stock behaviour and keys (drops the aux embedder and the tt wiring)."""
    _check(transformer)
    return uninstall(transformer, embed_name=MAIN, aux_name=AUX)
