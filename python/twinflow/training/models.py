"""Per-backbone glue: loading the diffusers components, the TwinFlow model call, latents and
text embeddings.

``TwinFlowModel`` turns TwinFlowLoss's ``model(x_t, t=t, tt=tt, c=cond)`` (t, tt signed, t
units: 1 = noise) into a call of the transformer patched by ``diffusers_patch``: tt goes in
through ``set_target_time``, t in the model's own timestep convention (SPEC §4), and the
output is the velocity z − x. Latents x are [B, C, h, w] for every backbone (Qwen-Image
packs them into tokens inside the call, Z-Image takes them as a list of frames).
"""

from __future__ import annotations

import pathlib
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

import diffusers_patch


def _ones_mask(embeds: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return mask


class Family:
    """One backbone: diffusers classes, text tensors (the cond list order), time convention."""

    name = ""
    transformer_cls = vae_cls = ""
    #: names of the text tensors, in the order of the cond list the model call receives
    text_keys: Sequence[str] = ()
    #: attribute(s) holding the transformer blocks (each block is one FSDP2 unit)
    block_attrs: Sequence[str] = ("transformer_blocks",)

    def call(self, transformer, x: torch.Tensor, t: torch.Tensor, cond: List[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, pipe, texts: List[str], device) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    # Latents as the stock pipelines use them (AutoencoderKL with shift/scaling factors).
    def encode_latents(self, vae, pixels: torch.Tensor, generator) -> torch.Tensor:
        lat = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (lat.float() - shift) * vae.config.scaling_factor

    def decode_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample.float()


class SD3(Family):
    name, transformer_cls, vae_cls = "sd3", "SD3Transformer2DModel", "AutoencoderKL"
    text_keys = ("prompt_embeds", "pooled_prompt_embeds")

    def call(self, transformer, x, t, cond):
        return transformer(hidden_states=x, encoder_hidden_states=cond[0], pooled_projections=cond[1],
                           timestep=t * 1000.0, return_dict=False)[0]

    def encode_text(self, pipe, texts, device):
        pe, _, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None, device=device,
                                              do_classifier_free_guidance=False)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}


class QwenImage(Family):
    name, transformer_cls, vae_cls = "qwen-image", "QwenImageTransformer2DModel", "AutoencoderKLQwenImage"
    text_keys = ("prompt_embeds", "prompt_embeds_mask")

    def call(self, transformer, x, t, cond):
        # QwenImagePipeline._pack_latents / _unpack_latents: 2×2 patches become tokens.
        b, c, h, w = x.shape
        tokens = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        out = transformer(hidden_states=tokens, encoder_hidden_states=cond[0], encoder_hidden_states_mask=cond[1],
                          timestep=t, img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def encode_text(self, pipe, texts, device):
        pe, mask = pipe.encode_prompt(prompt=texts, device=device)
        return {"prompt_embeds": pe, "prompt_embeds_mask": _ones_mask(pe, mask)}

    @staticmethod
    def _stats(vae, latents):
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(shape)
        return mean, std

    def encode_latents(self, vae, pixels, generator):
        lat = vae.encode(pixels[:, :, None].to(vae.dtype)).latent_dist.sample(generator).float()
        mean, std = self._stats(vae, lat)
        return ((lat - mean) / std)[:, :, 0]

    def decode_latents(self, vae, latents):
        lat = latents[:, :, None].float()
        mean, std = self._stats(vae, lat)
        return vae.decode((lat * std + mean).to(vae.dtype)).sample[:, :, 0].float()


class Sana(Family):
    name, transformer_cls, vae_cls = "sana", "SanaTransformer2DModel", "AutoencoderDC"
    text_keys = ("prompt_embeds", "prompt_attention_mask")

    def call(self, transformer, x, t, cond):
        scale = 1000.0 * float(transformer.config.timestep_scale)
        return transformer(hidden_states=x, encoder_hidden_states=cond[0], encoder_attention_mask=cond[1],
                           timestep=t * scale, return_dict=False)[0]

    def encode_text(self, pipe, texts, device):
        import inspect

        # SanaPipeline.__call__ prefixes prompts with its "complex human instruction" by default;
        # train on the embeddings inference will use.
        chi = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
        pe, mask, _, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False, device=device,
                                            complex_human_instruction=chi)
        return {"prompt_embeds": pe, "prompt_attention_mask": _ones_mask(pe, mask)}

    def encode_latents(self, vae, pixels, generator):
        return vae.encode(pixels.to(vae.dtype)).latent.float() * vae.config.scaling_factor

    def decode_latents(self, vae, latents):
        return vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float()


class ZImage(Family):
    name, transformer_cls, vae_cls = "z-image", "ZImageTransformer2DModel", "AutoencoderKL"
    text_keys = ("prompt_embeds", "prompt_embeds_mask")
    block_attrs = ("noise_refiner", "context_refiner", "layers")

    def call(self, transformer, x, t, cond):
        from diffusers_patch.z_image import to_model_time

        # ZImagePipeline: frames [C, 1, h, w], captions unpadded, time t_z, output negated.
        caps = [e[m.bool()] for e, m in zip(cond[0], cond[1])]
        out = transformer(list(x[:, :, None]), to_model_time(t), caps, return_dict=False)[0]
        return -torch.stack(out)[:, :, 0]

    def encode_text(self, pipe, texts, device):
        from .data import pad_stack

        embeds, _ = pipe.encode_prompt(texts, device=device, do_classifier_free_guidance=False)
        mask = pad_stack([torch.ones(e.shape[0], dtype=torch.long, device=e.device) for e in embeds])
        return {"prompt_embeds": pad_stack(list(embeds)), "prompt_embeds_mask": mask}


FAMILIES = {f.name: f for f in (SD3(), QwenImage(), Sana(), ZImage())}


class TwinFlowModel(nn.Module):
    """The patched transformer as TwinFlowLoss / UnifiedSampler call it:
    ``model(x_t, t=t, tt=tt, c=cond)`` (``cond=`` also accepted, as the sampler passes it)."""

    def __init__(self, transformer: nn.Module, family: Family):
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


def _diffusers_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def load_transformer(cfg, family: Family, *, lora: bool, frozen_dtype: torch.dtype) -> nn.Module:
    """The pretrained transformer (float32 master weights; the LoRA base in model.frozen_dtype),
    patched as a TwinFlow backbone: aux embedder (full) or the single t − tt/2 label (LoRA)."""
    root = pathlib.Path(cfg.model.pretrained_model_name_or_path)
    if not (root / "transformer").is_dir():
        raise ValueError(f"model.pretrained_model_name_or_path: {root} has no transformer/ folder "
                         "(expected a diffusers pipeline folder; no hub downloads at run time)")
    dtype = frozen_dtype if lora else torch.float32
    transformer = _diffusers_class(family.transformer_cls).from_pretrained(root / "transformer", torch_dtype=dtype)
    diffusers_patch.patch(transformer, family.name, mode="lora" if lora else "aux")
    if not lora:  # a TwinFlow checkpoint's trained aux embedder (from_pretrained skips those keys)
        from twinflow.pipelines import load_aux_weights, read_aux_weights

        prefix = diffusers_patch.module_for(family.name).AUX_PREFIX
        load_aux_weights(transformer, family.name, read_aux_weights(root / "transformer", prefix),
                         str(root / "transformer"))
    return transformer


def load_vae(cfg, family: Family, device, dtype: torch.dtype) -> Optional[nn.Module]:
    root = pathlib.Path(cfg.model.pretrained_model_name_or_path) / "vae"
    if not root.is_dir():
        return None
    vae = _diffusers_class(family.vae_cls).from_pretrained(root, torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


class TextEncoder:
    """The pipeline's own ``encode_prompt`` (its text encoders and tokenizers), frozen."""

    def __init__(self, cfg, family: Family, device, dtype: torch.dtype):
        from diffusers import DiffusionPipeline

        root = cfg.model.pretrained_model_name_or_path
        self.pipe = DiffusionPipeline.from_pretrained(root, transformer=None, vae=None,
                                                      torch_dtype=dtype)
        for name, comp in self.pipe.components.items():
            if isinstance(comp, nn.Module):
                comp.to(device).eval().requires_grad_(False)
        self.family, self.device = family, device

    @torch.no_grad()
    def __call__(self, texts: List[str]) -> Dict[str, torch.Tensor]:
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
