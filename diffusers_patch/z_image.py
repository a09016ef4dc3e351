"""TwinFlow patch for diffusers' ``ZImageTransformer2DModel`` (SPEC §4).

Time convention: ``ZImagePipeline`` calls the transformer with ``t_z = (1000 − timestep)/1000
= 1 − σ`` and negates its output; the transformer embeds ``t_embedder(t_z · t_scale)``
(t_scale = 1000). In TwinFlow's signed time, t_z = sign(t)(1 − |t|); a pipeline only runs
t = σ ≥ 0, so the model's time is recovered as t = 1 − t_z. tt (t units, signed) is converted
the same way, tt_z = sign(tt)(1 − |tt|) with sign(0) = +1 (so tt = 0 → tt_z = 1, the data end;
a literal torch.sign would send tt = 0 to Z-Image's noise end t_z = 0).

mode "aux": a second embedder ``t_embedder_2`` (a deep copy of ``t_embedder``: state-dict keys
``t_embedder_2.mlp.{0,2}.{weight,bias}``) and, in float64 with autocast off,

    emb = t_embedder(t_scale · t_z) + t_embedder_2(t_scale · (tt_z − t_z)) · |t_z − tt_z|

(cast back to the main embedding's dtype). mode "lora": no second embedder; ``t_embedder``
gets the label t − tt/2 converted like t: ``t_scale · |sign(l)(1 − |l|)|``, l = t − tt/2.

Hook: the ``forward`` of the ``transformer.t_embedder`` instance is replaced by a
``functools.partial`` (call sites in ``ZImageTransformer2DModel.forward``:
``self.t_embedder(t * self.t_scale)`` and, in omni mode, the clean-image embedding
``self.t_embedder(torch.ones_like(t) * self.t_scale)``). Rows at t_z = 1 (t = 0: the omni
clean images) are passed through unchanged, so clean tokens keep the stock embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from ._backbone import Backbone
from ._common import TT_ATTR, lora_label, target_time

AUX_PREFIX = "t_embedder_2."
MODEL = "z-image"
_AUX_NAME = AUX_PREFIX[:-1]

__all__ = ["AUX_PREFIX", "BACKBONE", "patch", "unpatch", "to_model_time"]


def to_model_time(t: torch.Tensor) -> torch.Tensor:
    """Z-Image's time of a signed TwinFlow time: t_z = sign(t)(1 − |t|), with sign(0) = +1.

    t = 0 (data, e.g. the one-step target tt = 0) maps to t_z = 1, Z-Image's data end, as every
    t ≥ 0 maps to 1 − t; only t < 0 (the fake trajectory) takes the negative branch.
    """
    return torch.where(t < 0, -1.0, 1.0).to(t.dtype) * (1.0 - t.abs())


def _times(transformer, t_scaled: torch.Tensor):
    """(t_z, t, tt) in float64 from the embedder's input t_z · t_scale."""
    t_z = t_scaled.to(torch.float64) / float(transformer.t_scale)
    t = 1.0 - t_z
    return t_z, t, target_time(transformer, t)


def _aux_forward(transformer, orig, t_scaled):
    emb = orig(t_scaled)
    if getattr(transformer, TT_ATTR, None) is None:  # tt = t: the aux term is exactly 0
        return emb
    with torch.autocast(device_type=t_scaled.device.type, enabled=False):
        t_z, _, tt = _times(transformer, t_scaled)
        d = to_model_time(tt) - t_z
        d = torch.where(t_z == 1.0, torch.zeros_like(d), d)  # t = 0 rows (omni clean images)
        aux = getattr(transformer, _AUX_NAME)(d * float(transformer.t_scale))
        out = emb.to(torch.float64) + aux.to(torch.float64) * d.abs().unsqueeze(-1)
    return out.to(emb.dtype)


def _lora_forward(transformer, orig, t_scaled):
    with torch.autocast(device_type=t_scaled.device.type, enabled=False):
        t_z, t, tt = _times(transformer, t_scaled)
        label = to_model_time(lora_label(t, tt)).abs() * float(transformer.t_scale)
        label = torch.where(t_z == 1.0, t_scaled.to(torch.float64), label).to(t_scaled.dtype)
    return orig(label)


class ZImage(Backbone):
    name, label = MODEL, "Z-Image-Turbo"
    transformer_class_name, pipeline_class_name = "ZImageTransformer2DModel", "ZImagePipeline"
    embed_name, aux_name, aux_init = "t_embedder", _AUX_NAME, "copy"
    text_keys = ("prompt_embeds", "prompt_embeds_mask")
    block_attrs = ("noise_refiner", "context_refiner", "layers")
    forwards = {"aux": _aux_forward, "lora": _lora_forward}

    def call(self, transformer, x, t, cond):
        # ZImagePipeline: frames [C, 1, h, w], captions unpadded, time t_z, output negated.
        caps = [e[m.bool()] for e, m in zip(cond[0], cond[1])]
        out = transformer(list(x[:, :, None]), to_model_time(t), caps, return_dict=False)[0]
        return -torch.stack(out)[:, :, 0]

    def encode_text(self, pipe, texts, device):
        embeds, _ = pipe.encode_prompt(texts, device=device, do_classifier_free_guidance=False)
        mask = _pad_stack([torch.ones(e.shape[0], dtype=torch.long, device=e.device) for e in embeds])
        return {"prompt_embeds": _pad_stack(list(embeds)), "prompt_embeds_mask": mask}


def _pad_stack(tensors):
    from torch.nn.utils.rnn import pad_sequence

    return pad_sequence(tensors, batch_first=True)


BACKBONE = ZImage()
patch, unpatch = BACKBONE.patch, BACKBONE.unpatch
