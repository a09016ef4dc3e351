"""TwinFlow patch for diffusers' ``ZImageTransformer2DModel`` (docs/algorithm.md §4).

Time convention: ``ZImagePipeline`` calls the transformer with ``t_z = (1000 − timestep)/1000
= 1 − σ`` and negates its output; the transformer embeds ``t_embedder(t_z · t_scale)``
(t_scale = 1000). A signed TwinFlow time t maps to t_z = sign(t)(1 − |t|) with torch.sign, as
the published wrapper (inclusionAI/TwinFlow, ``diffusers_patch/z_image``) does; so does tt:

    tt_z = torch.sign(tt)·(1 − |tt|),  sign(0) = 0:  tt = 0 → tt_z = 0

(Z-Image's *noise* end, not its data end t_z = 1: a literal reading of the published formula,
which is how the published TwinFlow-Z-Image-Turbo checkpoint was made; docs/decisions.md).

mode "aux": a second embedder ``t_embedder_2`` (a deep copy of ``t_embedder``, the published
initialisation: state-dict keys ``t_embedder_2.mlp.{0,2}.{weight,bias}``) and, in float64
with autocast off,

    emb = t_embedder(t_scale · t_z) + t_embedder_2(t_scale · (tt_z − t_z)) · |t_z − tt_z|

(cast back to the main embedding's dtype). The published wrapper embeds t_scale·|t_z|; the
stock embedder used here gets t_scale·t_z, the same for every t ≥ 0 (every pipeline call),
and for the fake rows t < 0 of training it keeps their sign, which |t_z| would lose: at
t = tt = −τ the aux term vanishes, so (−τ, −τ) would embed exactly as (τ, τ).

mode "lora": no second embedder; ``t_embedder`` gets the label l = t − tt/2 mapped like t,
t_scale · sign(l)(1 − |l|) (signed, as the published LoRA path feeds the stock transformer).
The signed t is recovered from t_z: t = 1 − t_z for t_z ≥ 0, −1 − t_z for t_z < 0 (−0.0 too).

Hook: the ``forward`` of the ``transformer.t_embedder`` instance is replaced by a
``functools.partial`` (call sites in ``ZImageTransformer2DModel.forward``:
``self.t_embedder(t * self.t_scale)`` and, in omni mode, the clean-image embedding
``self.t_embedder(torch.ones_like(t) * self.t_scale)``). Rows at t_z = 1 (the omni clean
images) are passed through unchanged, so clean tokens keep the stock embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from ._backbone import Backbone
from ._common import TT_ATTR, lora_label, target_time

AUX_PREFIX = "t_embedder_2."
MODEL = "z-image"
_AUX_NAME = AUX_PREFIX[:-1]

__all__ = ["AUX_PREFIX", "BACKBONE", "patch", "unpatch", "to_model_time", "from_model_time"]


def to_model_time(t: torch.Tensor) -> torch.Tensor:
    """Z-Image's time of a signed TwinFlow time: t_z = torch.sign(t)·(1 − |t|) (published;
    sign(0) = 0, so t = 0 maps to t_z = 0)."""
    return torch.sign(t) * (1.0 - t.abs())


def from_model_time(t_z: torch.Tensor) -> torch.Tensor:
    """The signed TwinFlow time of a model time t_z ≠ 0 (the inverse of ``to_model_time``;
    t_z = 0 gives t = 1, or t = −1 for −0.0)."""
    return torch.where(torch.signbit(t_z), -1.0 - t_z, 1.0 - t_z)


def _model_time(transformer, t_scaled: torch.Tensor) -> torch.Tensor:
    """t_z in float64 from the embedder's input t_z · t_scale."""
    return t_scaled.to(torch.float64) / float(transformer.t_scale)


def _aux_forward(transformer, orig, t_scaled):
    emb = orig(t_scaled)
    if getattr(transformer, TT_ATTR, None) is None:  # tt = t: the aux term is exactly 0
        return emb
    with torch.autocast(device_type=t_scaled.device.type, enabled=False):
        t_z = _model_time(transformer, t_scaled)
        d = to_model_time(target_time(transformer, t_z)) - t_z
        d = torch.where(t_z == 1.0, torch.zeros_like(d), d)  # omni clean images
        aux = getattr(transformer, _AUX_NAME)(d * float(transformer.t_scale))
        out = emb.to(torch.float64) + aux.to(torch.float64) * d.abs().unsqueeze(-1)
    return out.to(emb.dtype)


def _lora_forward(transformer, orig, t_scaled):
    with torch.autocast(device_type=t_scaled.device.type, enabled=False):
        t_z = _model_time(transformer, t_scaled)
        t = from_model_time(t_z)
        label = to_model_time(lora_label(t, target_time(transformer, t))) * float(transformer.t_scale)
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
        # t_z = sign(t)(1 − |t|) in ZImagePipeline's own arithmetic, (1000 − 1000·σ)/1000, so
        # that training and the pipeline feed the model bit-identical times.
        caps = [e[m.bool()] for e, m in zip(cond[0], cond[1])]
        t_z = torch.sign(t) * ((1000.0 - t.abs() * 1000.0) / 1000.0)
        out = transformer(list(x[:, :, None]), t_z, caps, return_dict=False)[0]
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
