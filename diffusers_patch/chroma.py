"""TwinFlow patch for diffusers' ``ChromaTransformer2DModel`` (Chroma1), docs/algorithm.md §4.

Time convention: ``ChromaPipeline`` calls the transformer with ``timestep = σ`` (t units, 1 =
noise). The transformer casts it to its dtype, multiplies by 1000 and derives *every*
modulation vector from it in two steps::

    input_vec   = time_text_embed(1000·t)             # no weights: sinusoids of 1000·t, of a
                                                      # constant guidance 0 and of each modulation
                                                      # index (mod_proj), [B, M, C]
    pooled_temb = distilled_guidance_layer(input_vec) # the approximator MLP: [B, M, D], the
                                                      # shift/scale/gate of every block and norm_out

Chroma has neither FLUX's temb vector nor per-block modulation layers: ``pooled_temb`` is the
modulation itself and the approximator is the only weighted path from t to it. So the time
embedder is emb = distilled_guidance_layer ∘ time_text_embed, and the aux term goes on
``pooled_temb``.

mode "aux"::

    pooled_temb = emb(1000·t) + emb₂(1000·tt)·(1000·t − 1000·tt)/1000

``emb₂`` = ``distilled_guidance_layer_2`` ∘ the stock ``time_text_embed``: a copy of the
approximator (keys ``distilled_guidance_layer_2.*``, mirroring the main ones), fed tt through the
same weightless projection, so it also gets the per-index inputs that make each modulation
vector distinct (278M parameters at Chroma1-HD's size, 3% of the model). The factor uses the
transformer's own values of 1000·t and 1000·tt (tt cast to its dtype, then × 1000, as it treats
t), so tt = t gives exactly 0 in any dtype. No TwinFlow Chroma checkpoint is published.
Initialisation: a copy, as Qwen-Image's published aux embedder and our FLUX's (Chroma's parent)
are: the aux term starts at the base model's own modulation scale. N(0, 0.02) would not start
small here: through the 5120-wide approximator of Chroma1-HD it gives outputs of rms ≈ 4.1
(measured at that config), added to scales and gates directly.

mode "lora"::

    pooled_temb = emb(1000·(t − tt/2))

Hooks: the weightless ``time_text_embed`` sees 1000·t, the approximator only its projection,
from which t cannot be read back exactly. In aux mode ``time_text_embed``'s hook leaves its
output alone and hands (projection of 1000·tt, factor) to the approximator's hook, which adds
the term and consumes them (an approximator call without that hand-over raises). In LoRA mode
only ``time_text_embed`` is hooked (it embeds the label).
"""

from __future__ import annotations

import torch

from ._backbone import Backbone, ids_2x2, pack_2x2, unpack_2x2
from ._common import hook, install, lora_label, patched_mode, scaled_times, uninstall

AUX = "distilled_guidance_layer_2"
#: the weightless projection of the time (hooked to read 1000·t)
TIME_PROJ = "time_text_embed"
#: the transformer embeds timestep · TIME_SCALE
TIME_SCALE = 1000.0
# On a patched transformer between the two hooks of one forward: (projection of 1000·tt, factor)
_HANDOVER = "_twinflow_chroma_tt"

__all__ = ["AUX_PREFIX", "BACKBONE", "patch", "unpatch"]


def _record(transformer, orig, timestep):
    vec = orig(timestep)
    _, tt = scaled_times(transformer, timestep, TIME_SCALE)
    tt_scaled = tt.to(timestep.dtype) * TIME_SCALE  # as the transformer scales t
    factor = (timestep.float() - tt_scaled.float()) / TIME_SCALE
    object.__setattr__(transformer, _HANDOVER, (orig(tt_scaled), factor))
    return vec


def _aux_forward(transformer, orig, input_vec):
    handover = transformer.__dict__.pop(_HANDOVER, None)
    if handover is None:
        raise RuntimeError("chroma: the patched distilled_guidance_layer was called without time_text_embed "
                           "before it (as ChromaTransformer2DModel.forward does): the target time is unknown")
    tt_vec, factor = handover
    out = orig(input_vec)
    aux = transformer._modules[AUX](tt_vec)
    return out + aux * factor.to(aux.dtype)[:, None, None]


def _lora_forward(transformer, orig, timestep):
    t, tt = scaled_times(transformer, timestep, TIME_SCALE)
    return orig((lora_label(t, tt) * TIME_SCALE).to(timestep.dtype))


class Chroma(Backbone):
    name, label = "chroma", "Chroma"
    transformer_class_name, pipeline_class_name = "ChromaTransformer2DModel", "ChromaPipeline"
    # the weighted time embedder (kept unquantized, its adapters are the LoRA time targets)
    embed_name, aux_name, aux_init = "distilled_guidance_layer", AUX, "copy"
    text_keys = ("prompt_embeds", "prompt_attention_mask")
    block_attrs = ("transformer_blocks", "single_transformer_blocks")
    forwards = {"aux": _aux_forward, "lora": _lora_forward}

    def patch(self, transformer, mode="aux"):
        self.check(transformer)
        if mode not in self.forwards:
            raise ValueError(f'mode: expected "aux" or "lora", got {mode!r}')
        if patched_mode(transformer) == mode:
            return transformer
        if mode == "lora":
            return install(transformer, model=self.name, mode=mode, embed_name=TIME_PROJ, aux_name=AUX,
                           forwards={"lora": _lora_forward})
        install(transformer, model=self.name, mode=mode, embed_name=self.embed_name, aux_name=AUX,
                forwards={"aux": _aux_forward}, make_aux=self.make_aux)
        hook(transformer, TIME_PROJ, _record)
        return transformer

    def unpatch(self, transformer):
        self.check(transformer)
        uninstall(transformer, embed_name=TIME_PROJ, aux_name=AUX)
        uninstall(transformer, embed_name=self.embed_name, aux_name=AUX)
        transformer.__dict__.pop(_HANDOVER, None)
        return transformer

    def call(self, transformer, x, t, cond):
        # ChromaPipeline: 2×2-packed latents, timestep σ, the text mask extended by ones over the
        # image tokens (_prepare_attention_mask), in the text embeddings' dtype as it makes it
        embeds, mask = cond
        b = x.shape[0]
        image_ones = torch.ones(b, (x.shape[2] // 2) * (x.shape[3] // 2), device=x.device, dtype=torch.bool)
        out = transformer(hidden_states=pack_2x2(x), encoder_hidden_states=embeds, timestep=t,
                          img_ids=ids_2x2(x.shape, x.device, x.dtype),
                          txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype),
                          attention_mask=torch.cat([mask.to(embeds.dtype), image_ones], dim=1), return_dict=False)[0]
        return unpack_2x2(out, x.shape)

    def encode_text(self, pipe, texts, device):
        # the mask keeps the first padding token (Chroma's rule, ChromaPipeline._get_t5_prompt_embeds)
        embeds, _, mask, *_ = pipe.encode_prompt(prompt=list(texts), device=device, do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask.long()}


BACKBONE = Chroma()
AUX_PREFIX = BACKBONE.aux_prefix
patch, unpatch = BACKBONE.patch, BACKBONE.unpatch
