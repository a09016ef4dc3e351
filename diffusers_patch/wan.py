"""TwinFlow patch for diffusers' ``WanTransformer3DModel``: Wan 2.1 and Wan 2.2 text-to-video
(``WanPipeline``), docs/algorithm.md §4. A video family: latents are [B, C, F, h, w].

Time convention: ``WanPipeline`` passes the scheduler's timesteps, 1000·σ (its
FlowMatchEuler / UniPC flow schedulers and ``TwinFlowScheduler`` alike), and the transformer
hands them unchanged to ``temb, timestep_proj, text, image = condition_embedder(timestep, …)``,
where ``temb = time_embedder(timesteps_proj(timestep))`` (output norm) and ``timestep_proj =
time_proj(SiLU(temb))`` (every block's modulation). That call is hooked: t = timestep / 1000.
Wan 2.2 TI2V 5B (``expand_timesteps=True``) passes one timestep per token, flattened to
[B·L] with ``timestep_seq_len = L``; tt (one per row) is repeated over the row's tokens.

mode "aux"::

    temb = time_embedder(proj(1000·t)) + emb₂(1000·tt)·(t − tt);   timestep_proj = time_proj(SiLU(temb))

``emb₂`` (``condition_embedder_2``) is a copy of the timestep path (``timesteps_proj``,
``time_embedder``) as FLUX's (``TimestepPath``; keys ``condition_embedder_2.timestep_embedder.
linear_{1,2}.*``). The aux term enters temb before ``time_proj``, so it reaches the blocks and
the output norm, as Qwen-Image's and FLUX's reach every use of temb. No TwinFlow Wan checkpoint
is published: this is our design.

mode "lora"::

    condition_embedder(1000·(t − tt/2), …)

Wan 2.2 A14B has two experts: ``transformer`` (high noise, t ≥ ``boundary_ratio``) and
``transformer_2`` (low noise). TwinFlow trains one network over every (t, tt), and its 1-NFE
call is at t = 1, in the high-noise expert's range: the TwinFlow model is ``transformer``
alone, trained over the whole time range. Loading drops ``transformer_2`` and the boundary
(``unused_components``) so every step runs that model; a pipeline that would still route
steps by ``boundary_ratio`` is refused (``check_pipeline``), as is passing ``transformer_2``.
Image-to-video transformers (an image embedder: ``image_dim`` / ``added_kv_proj_dim``) are not
supported.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import torch

from ._backbone import Backbone, TimestepPath
from ._common import lora_label, scaled_times

EMBED, AUX = "condition_embedder", "condition_embedder_2"
#: the transformer embeds timestep = t · TIME_SCALE
TIME_SCALE = 1000.0
#: pixel frames per latent frame after the first (``scale_factor_temporal`` of every Wan VAE)
FRAME_STEP = 4

__all__ = ["AUX_PREFIX", "BACKBONE", "patch", "unpatch"]


def _times(transformer, timestep, seq_len):
    """(t, tt) per timestep entry: [B], or [B·L] for per-token timesteps (tt repeated per row)."""
    t, tt = scaled_times(transformer, timestep, TIME_SCALE)
    if tt.shape != t.shape:
        if seq_len is None or tt.numel() * seq_len != t.numel():
            raise ValueError(f"wan: target time of shape {list(tt.shape)} does not fit timesteps of shape "
                             f"{list(t.shape)}")
        tt = tt.repeat_interleave(seq_len)
    return t, tt


def _aux_forward(transformer, orig, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
                 timestep_seq_len=None):
    temb, _, text, image = orig(timestep, encoder_hidden_states, encoder_hidden_states_image,
                                timestep_seq_len=timestep_seq_len)
    t, tt = _times(transformer, timestep, timestep_seq_len)
    aux = transformer._modules[AUX]
    dtype = next(aux.parameters()).dtype  # as the stock embedder casts for its own MLP
    term = aux(tt * TIME_SCALE, dtype) * (t - tt).to(dtype).unsqueeze(-1)
    if timestep_seq_len is not None:
        term = term.unflatten(0, (-1, timestep_seq_len))
    temb = temb + term.to(temb.dtype)  # + 0 exactly when tt = t: the stock temb
    # the stock modulation from the new temb (the stock one, computed by orig, is discarded)
    embed = transformer._modules[EMBED]
    return temb, embed.time_proj(embed.act_fn(temb)), text, image


def _lora_forward(transformer, orig, timestep, *args, timestep_seq_len=None, **kwargs):
    t, tt = _times(transformer, timestep, timestep_seq_len)
    return orig(lora_label(t, tt) * TIME_SCALE, *args, timestep_seq_len=timestep_seq_len, **kwargs)


def _listed(entry) -> bool:
    """A model_index.json component entry naming a class (not [null, null])."""
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


class Wan(Backbone):
    name, label = "wan", "Wan 2.1 / 2.2"
    transformer_class_name, pipeline_class_name, vae_class_name = ("WanTransformer3DModel", "WanPipeline",
                                                                   "AutoencoderKLWan")
    embed_name, aux_name, aux_init = EMBED, AUX, "copy"
    text_keys = ("prompt_embeds",)
    block_attrs = ("blocks",)
    forwards = {"aux": _aux_forward, "lora": _lora_forward}
    video, default_num_frames, default_fps, default_size = True, 81, 16, (480, 832)  # WanPipeline's, Wan 2.1's fps

    def make_aux(self, embed):
        return TimestepPath(copy.deepcopy(embed.timesteps_proj), copy.deepcopy(embed.time_embedder))

    def check_config(self, transformer):
        cfg = transformer.config
        if cfg.get("image_dim") is not None or cfg.get("added_kv_proj_dim") is not None:
            raise ValueError("wan: an image-to-video WanTransformer3DModel (it has an image embedder); only "
                             "text-to-video Wan (WanPipeline) is supported")

    def check_num_frames(self, num_frames, what="num_frames"):
        if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % FRAME_STEP:
            raise ValueError(f"{what}: Wan clips have {FRAME_STEP}k + 1 frames (1, 5, 9, …, 81), got {num_frames!r}")

    def unused_components(self, model_index):
        if _listed(model_index.get("transformer_2")) or model_index.get("boundary_ratio") is not None:
            warnings.warn("wan: Wan 2.2 A14B's TwinFlow model is the high-noise expert `transformer` alone (trained "
                          "over every time); transformer_2 and boundary_ratio are not used (docs/algorithm.md §4)",
                          stacklevel=4)
            return {"transformer_2": None, "boundary_ratio": None}
        return {}

    def check_pipeline(self, pipe):
        boundary = getattr(pipe, "config", {}).get("boundary_ratio")
        if boundary is not None:
            raise ValueError(f"wan: the pipeline routes steps below boundary_ratio={boundary} to transformer_2; the "
                             "TwinFlow Wan model is `transformer` alone (docs/algorithm.md §4): load it with "
                             "twinflow.load_pipeline, or build the pipeline with boundary_ratio=None")

    def call(self, transformer, x, t, cond):
        cfg = transformer.config
        if x.dim() != 5:
            raise ValueError(f"wan: latents must be [B, C, F, h, w] (video), got shape {list(x.shape)}")
        if x.shape[1] != cfg.in_channels or any(n % p for n, p in zip(x.shape[2:], cfg.patch_size)):
            raise ValueError(f"wan: latents of shape {list(x.shape)} do not fit the transformer ({cfg.in_channels} "
                             f"channels; F, h, w multiples of the patch size {tuple(cfg.patch_size)}: the pixel "
                             "size a multiple of 16)")
        # one timestep per row: what WanPipeline's per-token timesteps (Wan 2.2 TI2V) are for text-to-video
        return transformer(hidden_states=x, timestep=t * TIME_SCALE, encoder_hidden_states=cond[0],
                           return_dict=False)[0]

    def encode_text(self, pipe, texts, device):
        # padded (with zeros) to the length WanPipeline.__call__ pads to, which its transformer attends over
        length = inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default
        pe, _ = pipe.encode_prompt(prompt=texts, do_classifier_free_guidance=False, max_sequence_length=length,
                                   device=device)
        return {"prompt_embeds": pe}

    @staticmethod
    def _stats(vae, like):
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=torch.float32).view(shape)
        std = torch.tensor(vae.config.latents_std, device=like.device, dtype=torch.float32).view(shape)
        return mean, std

    def encode_latents(self, vae, pixels, generator):
        """Clips [B, 3, F, H, W] in [-1, 1] (images [B, 3, H, W]: 1-frame clips) → normalised
        latents (x − latents_mean) / latents_std, as WanPipeline decodes them. The posterior
        mean, as Wan's own training encodes (`generator` is unused)."""
        if pixels.dim() == 4:
            pixels = pixels.unsqueeze(2)
        if pixels.dim() != 5:
            raise ValueError(f"wan: pixels must be [B, 3, F, H, W] or [B, 3, H, W], got shape {list(pixels.shape)}")
        step = vae.config.scale_factor_temporal
        if (pixels.shape[2] - 1) % step:  # the VAE would silently drop the frames past the last 4k + 1
            raise ValueError(f"wan: clips need {step}k + 1 frames, got {pixels.shape[2]}")
        lat = vae.encode(pixels.to(vae.dtype)).latent_dist.mode().float()
        mean, std = self._stats(vae, lat)
        return (lat - mean) / std

    def decode_latents(self, vae, latents):
        """Normalised latents [B, C, F, h, w] → frames [B, 3, 4(F − 1) + 1, H, W] in [-1, 1]."""
        mean, std = self._stats(vae, latents)
        return vae.decode((latents.float() * std + mean).to(vae.dtype)).sample.float()


BACKBONE = Wan()
AUX_PREFIX = BACKBONE.aux_prefix
patch, unpatch = BACKBONE.patch, BACKBONE.unpatch
