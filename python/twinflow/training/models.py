"""Loading a backbone's components for training and the TwinFlow model call.

What differs per backbone (text encoding, the model call in its own time convention, latents)
lives in the backbone's module under ``diffusers_patch``; this module asks the registry.

``TwinFlowModel`` turns TwinFlowLoss's ``model(x_t, t=t, tt=tt, c=cond)`` (t, tt signed, t
units: 1 = noise) into a call of the transformer patched by ``diffusers_patch``: tt goes in
through ``set_target_time``, t in the model's own timestep convention (docs/algorithm.md §4), and the
output is the velocity z − x. Latents x are [B, C, h, w] for every backbone (Qwen-Image
packs them into tokens inside the call, Z-Image takes them as a list of frames).
"""

from __future__ import annotations

import pathlib
import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

from .. import diffusers_patch
from .._alignment import align_module
from ..diffusers_patch import Backbone



class TwinFlowModel(nn.Module):
    """The patched transformer as TwinFlowLoss / UnifiedSampler call it:
    ``model(x_t, t=t, tt=tt, c=cond)`` (``cond=`` also accepted, as the sampler passes it)."""

    def __init__(self, transformer: nn.Module, family: Backbone):
        super().__init__()
        self.transformer = transformer
        self.family = family

    def forward(self, x_t, t, tt, c=None, cond=None):
        c = c if c is not None else cond
        diffusers_patch.set_target_time(self.transformer, tt)
        try:
            return self.family.call(self.transformer, x_t, t, list(c))
        finally:
            diffusers_patch.set_target_time(self.transformer, None)


def load_transformer(cfg, family: Backbone, *, lora: bool, frozen_dtype: torch.dtype,
                     resuming: bool = False, device=None) -> nn.Module:
    """The pretrained transformer (float32 master weights; the LoRA base in model.frozen_dtype),
    patched as a TwinFlow backbone: aux embedder (full) or the single t − tt/2 label (LoRA).
    `resuming`: a checkpoint's trained weights replace these next, so a base without aux weights
    is not worth the "initialised them" warning."""
    root = pathlib.Path(cfg.model.pretrained_model_name_or_path)
    if not (root / "transformer").is_dir():
        raise ValueError(f"model.pretrained_model_name_or_path: {root} has no transformer/ folder "
                         "(expected a diffusers pipeline folder; no hub downloads at run time)")
    from twinflow.pipelines import dtype_kwargs
    from twinflow.saved_format import KEY, make_record

    dtype = frozen_dtype if lora else torch.float32
    qcfg = None
    if getattr(cfg.model, "quantization", None):  # QLoRA: the frozen base quantized, time embedders not
        from twinflow.quantization import pipeline_quantization

        qcfg, _ = pipeline_quantization(cfg.model.quantization, transformer_skip=[family.embed_name, family.aux_name],
                                        text_encoders=[], dtype=dtype, device=device)
    transformer = family.transformer_class().from_pretrained(root / "transformer", **dtype_kwargs(dtype),
                                                              **({} if qcfg is None else {"quantization_config": qcfg}))
    align_module(transformer)  # the file layout must not change a step's bits (twinflow._alignment)
    family.patch(transformer, mode="lora" if lora else "aux")
    # every transformer/ this run saves records what it is
    transformer.register_to_config(**{KEY: make_record(family.name, "lora" if lora else "aux")})
    if not lora:  # a TwinFlow checkpoint's trained aux embedder (from_pretrained skips those keys)
        from twinflow.pipelines import load_aux_weights, read_aux_weights

        with warnings.catch_warnings():
            if resuming:
                warnings.filterwarnings("ignore", message=".*no aux target-time weights")
            load_aux_weights(transformer, family.name, read_aux_weights(root / "transformer", family.aux_prefix),
                             str(root / "transformer"))
    return transformer


def load_vae(cfg, family: Backbone, device, dtype: torch.dtype) -> Optional[nn.Module]:
    root = pathlib.Path(cfg.model.pretrained_model_name_or_path) / "vae"
    if not root.is_dir():
        return None
    from twinflow.pipelines import dtype_kwargs

    vae = family.vae_class().from_pretrained(root, **dtype_kwargs(dtype))
    align_module(vae)
    return vae.to(device).eval().requires_grad_(False)


class TextEncoder:
    """The pipeline's own ``encode_prompt`` (its text encoders and tokenizers), frozen."""

    def __init__(self, cfg, family: Backbone, device, dtype: torch.dtype):
        from twinflow.pipelines import _quantization, align_pipeline, component_overrides, dtype_kwargs

        family.check_environment()
        root = cfg.model.pretrained_model_name_or_path
        left_out = component_overrides(family, pathlib.Path(root), {})  # e.g. SD3 saved without T5
        quant = getattr(cfg.model, "quantization", None)
        _, rest = _quantization(family, pathlib.Path(root), quant, left_out, dtype, device) if quant else (None, None)
        self.pipe = family.pipeline_class().from_pretrained(root, **{**left_out, "transformer": None, "vae": None},
                                                            **dtype_kwargs(dtype),
                                                            **({} if rest is None else {"quantization_config": rest}))
        align_pipeline(self.pipe)
        for name, comp in self.pipe.components.items():
            if isinstance(comp, nn.Module):
                comp.to(device).eval().requires_grad_(False)
        self.family, self.device = family, device

    @torch.no_grad()
    def __call__(self, texts: List[str], references=None) -> Dict[str, torch.Tensor]:
        """The text tensors of `texts`; an editing family's also read `references` (one image each)."""
        if self.family.edit:
            return self.family.encode_text(self.pipe, list(texts), self.device, references=references)
        return self.family.encode_text(self.pipe, list(texts), self.device)


def add_lora(transformer: nn.Module, lcfg, adapter_name: str) -> None:
    """A peft LoRA adapter (r, α, init and target modules from the config), via diffusers'
    PeftAdapterMixin so the model keeps its class and save/load paths."""
    from peft import LoraConfig

    init = "gaussian" if lcfg.init == "gaussian" else True
    transformer.add_adapter(LoraConfig(r=lcfg.rank, lora_alpha=lcfg.alpha, init_lora_weights=init,
                                       target_modules=list(lcfg.target_modules)), adapter_name=adapter_name)
    adapter_to_float32(transformer, adapter_name)


def adapter_to_float32(transformer: nn.Module, adapter_name: str) -> None:
    """Adapter weights in float32 whatever the (frozen, maybe bf16) base dtype: they are the
    trained master weights (or their EMA)."""
    tag = f".{adapter_name}."
    for n, p in transformer.named_parameters():
        if "lora_" in n and tag in n:
            p.data = p.data.float()
