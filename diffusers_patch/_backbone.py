"""``Backbone``: everything that is specific to one backbone, in one object.

Each backbone module (``qwen_image``, ``z_image``, ``sd3``, ``sana``) defines a subclass and
one instance ``BACKBONE``; the registry in ``diffusers_patch/__init__.py`` lists the modules.
Loading (``twinflow.load_pipeline``), generation (``twinflow generate``) and training
(``twinflow train``) ask the registry and use only what is declared here:

* classes: the transformer, the pipeline (a diffusers class name, or override
  ``pipeline_class`` / ``load_pipeline`` for a pipeline of our own) and the VAE;
* the TwinFlow patch (docs/algorithm.md §4): the hooked embedder, the aux embedder's name (its checkpoint
  key prefix) and initialisation, and the hook per mode (``forwards``);
* pipeline call arguments: the classifier-free-guidance keyword, exact-size arguments;
* training glue: the text tensors (``text_keys``, ``encode_text``), the model call
  (``call``: TwinFlow time t → the model's own time convention), latents to and from pixels,
  the attributes holding the transformer blocks (FSDP units);
* editing families (``edit = True``: Qwen-Image-Edit, FLUX Kontext): the model call's cond list
  ends with the reference image's latents, which are conditioning (never noised); the text
  encoding gets the reference images, and generation passes one (``reference_arg``).

Only names are declared at import time: diffusers is imported when a class is asked for.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._common import fresh_copy, install, lora_label, scaled_times, uninstall

__all__ = ["Backbone", "MIN_DIFFUSERS", "TimestepPath", "ids_2x2", "normal_init", "ones_mask", "pack_2x2", "posterior",
           "scaled_timestep_forwards", "unpack_2x2"]


def normal_init(embed: nn.Module, std: float = 0.02) -> nn.Module:
    """A fresh copy of `embed` whose Linear layers have N(0, std²) weights and zero biases (the
    published SD3 and Sana initialisation of the aux embedder). Uses torch's global RNG."""
    aux = fresh_copy(embed)
    with torch.no_grad():
        for m in aux.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
    return aux


def ones_mask(embeds: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The attention mask of `embeds` [B, L, D], all ones when the pipeline gives none."""
    if mask is None:
        return torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return mask


class TimestepPath(nn.Module):
    """An aux embedder emb₂ made of the timestep path of a main embedder: its sinusoidal
    projection (``time_proj``, no weights) and MLP (``timestep_embedder``), applied to tt in the
    embedder's own units; keys ``timestep_embedder.linear_{1,2}.*`` (Qwen-Image as published, FLUX)."""

    def __init__(self, time_proj: nn.Module, timestep_embedder: nn.Module):
        super().__init__()
        self.time_proj = time_proj
        self.timestep_embedder = timestep_embedder

    @classmethod
    def copy_of(cls, embed: nn.Module) -> "TimestepPath":
        """Deep copies of `embed`'s ``time_proj`` and ``timestep_embedder`` (copy initialisation)."""
        import copy

        return cls(copy.deepcopy(embed.time_proj), copy.deepcopy(embed.timestep_embedder))

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(self.time_proj(timestep).to(dtype=dtype))


def scaled_timestep_forwards(aux_name: str, time_scale: float, aux_gets: str = "args") -> Dict[str, Callable]:
    """The two hooks of a family whose time embedder is called as ``embed(timestep, *rest)`` with
    ``timestep = t · time_scale`` and returns one tensor — the whole time mapping of such a family
    is these two numbers (docs/algorithm.md §4):

    * "aux":  ``embed(S·t, *rest) + aux(S·tt, ...)·(t − tt)``, the aux embedder getting the
      embedder's other arguments (``aux_gets="args"``: a full copy of the embedder, SD3) or the
      output dtype (``"dtype"``: a ``TimestepPath``, FLUX);
    * "lora": ``embed(S·(t − tt/2), *rest)``, the stock embedder at the LoRA label, no weights.
    """
    if aux_gets not in ("args", "dtype"):
        raise ValueError(f'aux_gets: expected "args" or "dtype", got {aux_gets!r}')

    def aux_forward(transformer, orig, timestep, *args, **kwargs):
        temb = orig(timestep, *args, **kwargs)
        t, tt = scaled_times(transformer, timestep, time_scale)
        aux_module = transformer._modules[aux_name]
        aux = aux_module(tt * time_scale, *args, **kwargs) if aux_gets == "args" else aux_module(tt * time_scale,
                                                                                                   temb.dtype)
        return temb + aux * (t - tt).to(aux.dtype).unsqueeze(-1)

    def lora_forward(transformer, orig, timestep, *args, **kwargs):
        t, tt = scaled_times(transformer, timestep, time_scale)
        return orig(lora_label(t, tt) * time_scale, *args, **kwargs)

    return {"aux": aux_forward, "lora": lora_forward}


def posterior(dist, generator) -> torch.Tensor:
    """A sample of a VAE's latent distribution, or its mode when `generator` is None (how the
    edit pipelines encode a reference image: ``retrieve_latents(..., sample_mode="argmax")``)."""
    return dist.mode() if generator is None else dist.sample(generator)


def pack_2x2(x: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, h, w] → tokens [B, (h/2)(w/2), 4C]: 2×2 patches, as the Qwen-Image and FLUX
    pipelines pack them (``_pack_latents``)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def ids_2x2(shape, device, dtype, index: float = 0.0) -> torch.Tensor:
    """The rotary position ids [(h/2)(w/2), 3] of the 2×2-packed tokens of latents of `shape`
    [..., h, w] (FLUX's and Chroma's ``_prepare_latent_image_ids``: (index, row, column); FLUX
    Kontext's reference image has index 1)."""
    h, w = shape[-2], shape[-1]
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 0] = index
    ids[..., 1] += torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] += torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(-1, 3).to(dtype)


def unpack_2x2(tokens: torch.Tensor, shape) -> torch.Tensor:
    """The inverse of ``pack_2x2`` for latents of `shape` [B, C, h, w] (``_unpack_latents``)."""
    b, c, h, w = shape
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


#: The oldest diffusers twinflow supports (pyproject.toml's floor). ``ZImagePipeline`` came in
#: 0.36.0, but there Qwen-Image's transformer still requires ``txt_seq_lens``, which the training
#: glue does not pass; 0.37.0 is the first release on which every backbone's tests pass.
MIN_DIFFUSERS = "0.37.0"


def _diffusers_class(name: str):
    import diffusers
    from packaging.version import Version

    fix = f'twinflow needs diffusers>={MIN_DIFFUSERS} (pip install -U "diffusers>={MIN_DIFFUSERS}")'
    if Version(diffusers.__version__) < Version(MIN_DIFFUSERS):
        raise ImportError(f"diffusers {diffusers.__version__} is too old for {name}: {fix}")
    try:
        return getattr(diffusers, name)
    except AttributeError:
        raise ImportError(f"diffusers {diffusers.__version__} has no {name}: {fix}") from None


class Backbone:
    """One TwinFlow backbone. Subclasses set the class attributes and implement ``call`` and
    ``encode_text``; the defaults cover diffusers pipelines with an ``AutoencoderKL``."""

    #: registry name ("sd3", ...) and the name used in documentation
    name: str = ""
    label: str = ""
    #: diffusers class names
    transformer_class_name: str = ""
    pipeline_class_name: str = ""
    vae_class_name: str = "AutoencoderKL"
    #: the time embedder the patch hooks, and the aux embedder's attribute (= key prefix)
    embed_name: str = ""
    aux_name: str = ""
    #: "copy" (a copy of the main embedder) or "normal" (N(0, 0.02) weights, zero biases)
    aux_init: str = "copy"
    #: the pipeline argument that turns on classifier-free guidance (> 1)
    cfg_kwarg: str = "guidance_scale"
    #: a video family: latents [B, C, F, h, w] (F latent frames), pipelines called with ``num_frames`` and
    #: ``num_videos_per_prompt``, returning ``.frames``; image families: latents [B, C, h, w], ``.images``
    video: bool = False
    #: video families: the pipeline's default frame count and the frame rate a written video plays at
    default_num_frames: Optional[int] = None
    default_fps: Optional[int] = None
    #: (height, width) ``twinflow generate`` renders when not told
    default_size: Tuple[int, int] = (1024, 1024)
    #: pipeline arguments needed to render exactly height × width (``exact_size_kwargs``)
    exact_size: Tuple[Tuple[str, object], ...] = ()
    #: an editing family: its cond list ends with the reference latents [B, C, h', w'] (``call``),
    #: ``encode_text`` takes ``references=``, and the training data must hold reference images
    edit: bool = False
    #: names of the text tensors, in the order of the cond list the model call receives
    text_keys: Sequence[str] = ()
    #: the prompts whose embeddings are the unconditional branch (guidance-enhanced target)
    null_texts: Sequence[Optional[str]] = ("",)
    #: attribute(s) holding the transformer blocks (each block is one FSDP2 unit)
    block_attrs: Sequence[str] = ("transformer_blocks",)
    #: mode → hook ``f(transformer, original_forward, *args, **kwargs)`` of the main embedder
    forwards: Dict[str, Callable] = {}

    @property
    def aux_prefix(self) -> str:
        return self.aux_name + "."

    def __repr__(self) -> str:
        return f"<backbone {self.name}>"

    # ------------------------------------------------------------------ classes

    def transformer_class(self):
        return _diffusers_class(self.transformer_class_name)

    def pipeline_class(self):
        return _diffusers_class(self.pipeline_class_name)

    def vae_class(self):
        return _diffusers_class(self.vae_class_name)

    def check_environment(self) -> None:
        """ImportError naming what is missing when this environment cannot build the family's
        pipeline (checked before loading one)."""

    def load_pipeline(self, root, *, transformer: nn.Module, scheduler, **load_kw):
        """The pipeline of folder `root` around an already loaded `transformer`."""
        return self.pipeline_class().from_pretrained(root, transformer=transformer, scheduler=scheduler, **load_kw)

    # ------------------------------------------------------------------ patch (docs/algorithm.md §4)

    def check(self, transformer: nn.Module) -> None:
        """TypeError unless `transformer` is this backbone's transformer."""
        cls = self.transformer_class()
        if not isinstance(transformer, cls):
            raise TypeError(f"{self.name}: expected a {cls.__name__}, got {type(transformer).__name__}")

    def check_config(self, transformer: nn.Module) -> None:
        """ValueError for a transformer configuration the patch does not support."""

    def check_num_frames(self, num_frames: int, what: str = "num_frames") -> None:
        """ValueError unless `num_frames` pixel frames are a clip this family makes and encodes
        (`what` names the argument in the message). Image families: 1 frame only."""
        if num_frames != 1:
            raise ValueError(f"{what}: {self.name} is an image family (one frame); frame counts apply to video "
                             f"families, got {num_frames}")

    def unused_components(self, model_index: dict) -> Dict[str, object]:
        """{pipeline argument: value} that loading passes to ``from_pretrained`` so that parts of
        a base folder TwinFlow does not use are not loaded (`model_index`: its model_index.json).
        None of those may be given by the caller with another value."""
        return {}

    def check_pipeline(self, pipe) -> None:
        """ValueError for a pipeline layout in which the patched transformer would not run as
        TwinFlow assumes (checked when a transformer is wired to a pipeline)."""

    @property
    def aux_init_text(self) -> str:
        """How ``make_aux`` initialises the aux embedder, for messages."""
        return ("N(0, 0.02) weights and zero biases" if self.aux_init == "normal"
                else "a copy of the main timestep embedder")

    def make_aux(self, embed: nn.Module) -> nn.Module:
        """The aux embedder before any trained weights are loaded (published initialisation)."""
        return normal_init(embed) if self.aux_init == "normal" else fresh_copy(embed)

    def patch(self, transformer: nn.Module, mode: str = "aux") -> nn.Module:
        """Patch `transformer` in place (idempotent per mode); returns it. An aux embedder
        already attached (e.g. trained weights) is kept. Wire tt with
        ``diffusers_patch.set_target_time(transformer, scheduler)``."""
        self.check(transformer)
        self.check_config(transformer)
        return install(transformer, model=self.name, mode=mode, embed_name=self.embed_name,
                       aux_name=self.aux_name, forwards=self.forwards, make_aux=self.make_aux)

    def unpatch(self, transformer: nn.Module) -> nn.Module:
        """Restore the stock behaviour and keys (drops the aux embedder and the tt wiring)."""
        self.check(transformer)
        return uninstall(transformer, embed_name=self.embed_name, aux_name=self.aux_name)

    # ------------------------------------------------------------------ pipeline call arguments

    def exact_size_kwargs(self, height: int, width: int) -> Dict[str, object]:
        """The pipeline arguments that make it render exactly height × width."""
        return dict(self.exact_size)

    def reference_arg(self, pipe, image, prompts: int):
        """The pipeline's ``image`` argument when each of `prompts` prompts edits `image` (a PIL
        image) in one call of `pipe`; editing families only."""
        raise ValueError(f"{self.name} does not edit an input image (its pipeline takes no reference image)")

    # ------------------------------------------------------------------ training glue

    def call(self, transformer: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: List[torch.Tensor]
             ) -> torch.Tensor:
        """The velocity z − x of latents x [B, C, h, w] (video families: [B, C, F, h, w]) at signed
        TwinFlow time t [B] (tt is already wired with ``set_target_time``). `cond`: the text
        tensors in ``text_keys`` order, then (editing families) the reference latents [B, C, h', w']."""
        raise NotImplementedError

    def encode_text(self, pipe, texts: List[str], device) -> Dict[str, torch.Tensor]:
        """{name in text_keys: batch-first tensor} as the pipeline encodes `texts` (editing
        families also take ``references=``: one reference image per text)."""
        raise NotImplementedError

    def encode_latents(self, vae, pixels: torch.Tensor, generator) -> torch.Tensor:
        """Latents as the stock pipelines use them (AutoencoderKL with shift/scaling factors);
        `generator` None: the posterior mode (a reference image, as the edit pipelines encode it)."""
        lat = posterior(vae.encode(pixels.to(vae.dtype)).latent_dist, generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (lat.float() - shift) * vae.config.scaling_factor

    def decode_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample.float()
