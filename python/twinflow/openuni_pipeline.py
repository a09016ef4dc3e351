"""OpenUni as a diffusers pipeline: InternVL3's language model + meta-queries → connector →
projector → Sana transformer → DC-AE (docs/algorithm.md §4; facts in ``diffusers_patch.openuni``).

    pipe = OpenUniPipeline.from_pth("openuni_l_internvl3_2b_sana_1_6b_512_hf_blip3o60k.pth",
                                    text_encoder="InternVL3-2B", tokenizer="InternVL3-2B",
                                    vae="dc-ae-f32c32-sana-1.1-diffusers",
                                    transformer_config="Sana_1600M_512px_diffusers/transformer")
    pipe.save_pretrained("openuni")          # then twinflow.load_pipeline("openuni", model="openuni")

Components: ``text_encoder`` (a transformers ``Qwen2Model``, frozen), ``tokenizer``,
``meta_queries`` (:class:`OpenUniMetaQueries`), ``connector`` (:class:`OpenUniConnector`, a
transformers ``SiglipEncoder``), ``projector`` (:class:`OpenUniProjector`, an ``nn.Linear``),
``transformer`` (``SanaTransformer2DModel``), ``vae`` (``AutoencoderDC``), ``scheduler``.
The three small modules are diffusers ``ModelMixin``/``ConfigMixin`` so that
``save_pretrained``/``from_pretrained`` handle them like any component.

Text encoding (the published ``encode_prompt``): each prompt becomes
``INSTRUCTION.format(GENERATION.format(prompt)) + "<img>"``, tokenised with right padding; the
256 meta-queries are appended after the (padded) tokens, the attention mask covers the real
tokens and the queries, position ids count only attended tokens (so padding changes nothing),
and the LM's last 256 hidden states go through the connector and the projector. The
unconditional prompt of classifier-free guidance is the published "Generate an image.".
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from diffusers import DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from .diffusers_patch import openuni as _facts

logger = logging.getLogger(__name__)

__all__ = ["OpenUniMetaQueries", "OpenUniConnector", "OpenUniProjector", "OpenUniPipeline", "split_pth_state_dict",
           "load_openuni_pipeline"]


class OpenUniMetaQueries(ModelMixin, ConfigMixin):
    """The learned query tokens appended to every prompt ([num_queries, hidden_size])."""

    @register_to_config
    def __init__(self, num_queries: int = _facts.NUM_QUERIES, hidden_size: int = 1536):
        super().__init__()
        self.meta_queries = nn.Parameter(torch.zeros(num_queries, hidden_size))
        nn.init.normal_(self.meta_queries, std=1 / math.sqrt(hidden_size))  # the published init

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.meta_queries[None].expand(batch_size, -1, -1)


class OpenUniConnector(ModelMixin, ConfigMixin):
    """The bidirectional pre-LayerNorm encoder between the LM and the projector: transformers'
    ``SiglipEncoder`` (no position embeddings, no final norm; the published layer layout)."""

    @register_to_config
    def __init__(self, hidden_size: int = 1536, intermediate_size: int = 8960, num_hidden_layers: int = 6,
                 num_attention_heads: int = 24, hidden_act: str = "gelu_pytorch_tanh", layer_norm_eps: float = 1e-6):
        super().__init__()
        from transformers import SiglipVisionConfig
        from transformers.models.siglip.modeling_siglip import SiglipEncoder

        cfg = SiglipVisionConfig(hidden_size=hidden_size, intermediate_size=intermediate_size,
                                 num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                                 hidden_act=hidden_act, layer_norm_eps=layer_norm_eps, attention_dropout=0.0)
        cfg._attn_implementation = "sdpa"
        self.encoder = SiglipEncoder(cfg)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.encoder(inputs_embeds=hidden_states).last_hidden_state


class OpenUniProjector(ModelMixin, ConfigMixin):
    """Connector width → the transformer's caption_channels (1536 → 2304 published)."""

    @register_to_config
    def __init__(self, in_features: int = 1536, out_features: int = 2304):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden_states)


#: published .pth key prefix → (component, key prefix inside the component)
PTH_LAYOUT = {"meta_queries": ("meta_queries", "meta_queries"), "connector.": ("connector", "encoder."),
              "projector.": ("projector", "linear."), "transformer.": ("transformer", "")}
#: published .pth prefixes of components taken from their own folders (their copies are skipped)
PTH_SKIPPED = ("lmm.", "vae.")


class OpenUniPipeline(DiffusionPipeline):
    """Text-to-image with OpenUni (see the module doc). Works with any flow-matching scheduler
    (``retrieve_timesteps``), including :class:`twinflow.TwinFlowScheduler`; load TwinFlow
    checkpoints with ``twinflow.load_pipeline(..., model="openuni")``."""

    model_cpu_offload_seq = "text_encoder->meta_queries->connector->projector->transformer->vae"

    def __init__(self, text_encoder, tokenizer, meta_queries: OpenUniMetaQueries, connector: OpenUniConnector,
                 projector: OpenUniProjector, transformer, vae, scheduler):
        super().__init__()
        self.register_modules(text_encoder=text_encoder, tokenizer=tokenizer, meta_queries=meta_queries,
                              connector=connector, projector=projector, transformer=transformer, vae=vae,
                              scheduler=scheduler)
        from diffusers.image_processor import PixArtImageProcessor

        self.vae_scale_factor = (2 ** (len(vae.config.encoder_block_out_channels) - 1)
                                 if getattr(self, "vae", None) is not None else 32)
        self.image_processor = PixArtImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "OpenUniPipeline":
        """diffusers' ``from_pretrained``, then every loaded tensor in torch-allocated memory: the
        folder's file layout must not change the images (``twinflow._alignment``)."""
        from .pipelines import align_pipeline

        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        align_pipeline(pipe)
        return pipe

    # ------------------------------------------------------------------ text

    @torch.no_grad()
    def encode_texts(self, prompts: List[Optional[str]], device=None) -> torch.Tensor:
        """[B, num_queries, caption_channels] prompt embeddings; a None prompt is the published
        unconditional one."""
        device = device or self._execution_device
        texts = [_facts.chat_prompt(p) for p in prompts]
        if len(texts) > 1 and self.tokenizer.pad_token is None:
            raise ValueError("tokenizer: no pad token, needed to encode several prompts at once")
        tok = self.tokenizer(texts, add_special_tokens=True, padding=True, padding_side="right", return_tensors="pt")
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device).bool()
        lm = self.text_encoder
        embeds = lm.get_input_embeddings()(ids)
        queries = self.meta_queries(len(texts)).to(device=device, dtype=embeds.dtype)
        n = queries.shape[1]
        mask = torch.cat([mask, mask.new_ones(len(texts), n)], dim=1)
        position_ids = (torch.cumsum(mask, dim=1) - 1).clamp_(min=0)
        hidden = lm(inputs_embeds=torch.cat([embeds, queries], dim=1), attention_mask=mask.long(),
                    position_ids=position_ids).last_hidden_state[:, -n:]
        hidden = self.connector(hidden.to(self.connector.dtype))
        return self.projector(hidden.to(self.projector.dtype))

    def encode_prompt(self, prompt, do_classifier_free_guidance: bool = True, negative_prompt=None,
                      num_images_per_prompt: int = 1, device=None):
        """(prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask)
        as SanaPipeline returns them; the masks are all ones (the queries are always attended)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt: expected a string or a non-empty list of strings, got {prompt!r}")
        embeds = self.encode_texts(prompts, device).repeat_interleave(num_images_per_prompt, dim=0)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        if not do_classifier_free_guidance:
            return embeds, mask, None, None
        if negative_prompt is None:
            negs: List[Optional[str]] = [None] * len(prompts)
        else:
            negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negs) != len(prompts) or not all(isinstance(p, str) for p in negs):
                raise ValueError(f"negative_prompt: expected a string or {len(prompts)} strings, got {negative_prompt!r}")
        neg = self.encode_texts(negs, device).repeat_interleave(num_images_per_prompt, dim=0)
        return embeds, mask, neg, mask.clone()

    # ------------------------------------------------------------------ sampling

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str], None] = None, negative_prompt: Union[str, List[str], None] = None,
                 num_inference_steps: int = 2, timesteps: Optional[List[int]] = None,
                 sigmas: Optional[List[float]] = None, guidance_scale: float = 1.0, num_images_per_prompt: int = 1,
                 height: int = 512, width: int = 512, generator=None, latents: Optional[torch.Tensor] = None,
                 prompt_embeds: Optional[torch.Tensor] = None, negative_prompt_embeds: Optional[torch.Tensor] = None,
                 output_type: str = "pil", return_dict: bool = True):
        """Generate images. ``guidance_scale`` > 1 turns on classifier-free guidance against
        `negative_prompt` (default: the published unconditional prompt). TwinFlow models run
        without guidance (1.0, the default) at 1, 2 or 4 steps."""
        from diffusers.pipelines.sana.pipeline_sana import retrieve_timesteps
        from diffusers.utils.torch_utils import randn_tensor

        multiple = self.vae_scale_factor * self.transformer.config.patch_size
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v < multiple or v % multiple:
                raise ValueError(f"{name}: must be a positive multiple of {multiple}, got {v!r}")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt and prompt_embeds")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f'output_type: expected "pil", "np", "pt" or "latent", got {output_type!r}')
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt: must be an int >= 1, got {num_images_per_prompt!r}")
        self._guidance_scale = float(guidance_scale)
        device = self._execution_device
        cfg = self.do_classifier_free_guidance
        if prompt_embeds is None:
            prompt_embeds, _, negative_prompt_embeds, _ = self.encode_prompt(
                prompt, cfg, negative_prompt, num_images_per_prompt, device)
        elif cfg and negative_prompt_embeds is None:
            raise ValueError("guidance_scale > 1 with prompt_embeds needs negative_prompt_embeds")
        embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if cfg else prompt_embeds
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
        batch = prompt_embeds.shape[0]

        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device,
                                                            timesteps, sigmas)
        channels = self.transformer.config.in_channels
        shape = (batch, channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=torch.float32)

        dtype = self.transformer.dtype
        with self.progress_bar(total=len(timesteps)) as bar:
            for t in timesteps:
                inp = torch.cat([latents] * 2) if cfg else latents
                timestep = t.expand(inp.shape[0]) * self.transformer.config.timestep_scale
                pred = self.transformer(inp.to(dtype), encoder_hidden_states=embeds.to(dtype),
                                        encoder_attention_mask=mask, timestep=timestep, return_dict=False)[0].float()
                if cfg:
                    uncond, cond = pred.chunk(2)
                    pred = uncond + self._guidance_scale * (cond - uncond)
                latents = self.scheduler.step(pred, t, latents, generator=generator, return_dict=False)[0]
                bar.update()

        if output_type == "latent":
            image = latents
        else:
            image = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor,
                                    return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    # ------------------------------------------------------------------ the published .pth

    @classmethod
    def from_pth(cls, pth: Union[str, os.PathLike], *, text_encoder, tokenizer, vae, transformer_config,
                 scheduler=None, connector_config: Optional[dict] = None, dtype=None,
                 torch_dtype=None) -> "OpenUniPipeline":
        """Build the pipeline from the published base weights (one ``.pth``: meta-queries,
        connector, projector, Sana) and the components it does not hold.

        Args:
            pth: the state dict file (read with ``torch.load(weights_only=True)``).
            text_encoder: a ``Qwen2Model`` or a folder holding one (transformers format), or an
                InternVL3 chat-model folder (its ``language_model.model.*`` weights are used).
            tokenizer: a tokenizer or its folder.
            vae: an ``AutoencoderDC`` or its folder.
            transformer_config: the Sana transformer's ``config.json`` (a dict, the file, or its folder).
            scheduler: default a ``FlowMatchEulerDiscreteScheduler`` (``load_pipeline`` installs TwinFlow's).
            connector_config: default the published one (``diffusers_patch.openuni.CONNECTOR_CONFIG``).
            dtype: cast the pipeline to it (``torch_dtype``: its older name).
        """
        from .pipelines import resolve_dtype_args

        dtype = resolve_dtype_args(dtype, torch_dtype)
        from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
        from transformers import AutoTokenizer

        parts = split_pth_state_dict(_read_pth(pth), str(pth))
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
        if isinstance(vae, (str, os.PathLike)):
            vae = AutoencoderDC.from_pretrained(str(vae), local_files_only=True)
        text_encoder = load_language_model(text_encoder)
        queries = parts["meta_queries"]["meta_queries"]
        meta = OpenUniMetaQueries(num_queries=queries.shape[0], hidden_size=queries.shape[1])
        connector = OpenUniConnector(**_connector_config(parts["connector"], connector_config))
        w = parts["projector"].get("linear.weight")
        projector = OpenUniProjector(*(reversed(tuple(w.shape)) if w is not None else (1536, 2304)))
        transformer = SanaTransformer2DModel.from_config(_read_config(transformer_config))
        modules = {"meta_queries": meta, "connector": connector, "projector": projector, "transformer": transformer}
        _load_parts(modules, parts, str(pth))
        widths = {"the language model's hidden_size": text_encoder.config.hidden_size,
                  "the meta-queries' width": meta.config.hidden_size,
                  "the connector's hidden_size": connector.config.hidden_size,
                  "the projector's input": projector.config.in_features}
        if len(set(widths.values())) != 1 or projector.config.out_features != transformer.config.caption_channels:
            raise ValueError(f"{pth}: the components do not fit together: {widths}, projector output "
                             f"{projector.config.out_features} vs the transformer's caption_channels "
                             f"{transformer.config.caption_channels}")
        pipe = cls(text_encoder=text_encoder, tokenizer=tokenizer, meta_queries=meta, connector=connector,
                   projector=projector, transformer=transformer, vae=vae,
                   scheduler=scheduler if scheduler is not None else FlowMatchEulerDiscreteScheduler())
        if dtype is not None:
            pipe.to(dtype)
        return pipe


# ----------------------------------------------------------------------------- .pth helpers

def _read_pth(path) -> Dict[str, torch.Tensor]:
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such OpenUni weights file")
    try:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError (not plain tensors), RuntimeError (not a torch file)
        raise ValueError(f"{p}: not a state dict of tensors readable with torch.load(weights_only=True) ({e})") from e
    for wrapper in ("state_dict", "module"):  # checkpoint dicts that nest the state dict
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict) and "meta_queries" not in sd:
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{p}: expected a state dict (key → tensor)")
    return sd


def split_pth_state_dict(sd: Dict[str, torch.Tensor], source: str = "<state dict>") -> Dict[str, Dict[str, torch.Tensor]]:
    """The published state dict split per component, keys renamed to the components' own
    (``PTH_LAYOUT``); copies of the LM/VAE (``PTH_SKIPPED``) are dropped with a log line; any
    other key is an error."""
    parts: Dict[str, Dict[str, torch.Tensor]] = {c: {} for c, _ in PTH_LAYOUT.values()}
    unexpected, skipped = [], 0
    for key, value in sd.items():
        for prefix, (component, inner) in PTH_LAYOUT.items():
            if key == prefix or (prefix.endswith(".") and key.startswith(prefix)):
                parts[component][inner + key[len(prefix):]] = value
                break
        else:
            if key.startswith(PTH_SKIPPED):
                skipped += 1
            else:
                unexpected.append(key)
    if skipped:
        logger.info("%s: skipped %d language-model/VAE tensors (those components come from their own folders)",
                    source, skipped)
    if unexpected or "meta_queries" not in parts["meta_queries"]:
        missing = [] if "meta_queries" in parts["meta_queries"] else ["meta_queries"]
        raise ValueError(f"{source}: not an OpenUni state dict: missing {missing}, unexpected {sorted(unexpected)[:20]}"
                         f"{' …' if len(unexpected) > 20 else ''} (expected keys meta_queries, connector.*, "
                         "projector.*, transformer.*)")
    return parts


def _connector_config(sd: Dict[str, torch.Tensor], given: Optional[dict]) -> dict:
    """The published connector settings with the sizes read off its weights (the head count
    cannot be: published 24 unless `given`)."""
    cfg = dict(_facts.CONNECTOR_CONFIG)
    if "encoder.layers.0.mlp.fc1.weight" in sd:
        inter, hidden = sd["encoder.layers.0.mlp.fc1.weight"].shape
        layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})
        cfg.update(hidden_size=int(hidden), intermediate_size=int(inter), num_hidden_layers=layers)
    cfg.update(given or {})
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError(f"connector_config: num_attention_heads {cfg['num_attention_heads']} does not divide "
                         f"hidden_size {cfg['hidden_size']}")
    return cfg


def _load_parts(modules: Dict[str, nn.Module], parts: Dict[str, Dict[str, torch.Tensor]], source: str) -> None:
    """Strict load of every component; one ValueError listing every missing/unexpected key
    (published names) and every shape mismatch."""
    inverse = {c: (prefix, inner) for prefix, (c, inner) in PTH_LAYOUT.items()}
    missing, unexpected, shapes = [], [], []
    for name, module in modules.items():
        prefix, inner = inverse[name]
        state = module.state_dict()
        published = (lambda k: prefix if k == inner and not prefix.endswith(".") else prefix + k[len(inner):])
        given = parts[name]
        missing += [published(k) for k in state if k not in given]
        unexpected += [published(k) for k in given if k not in state]
        shapes += [f"{published(k)} {tuple(v.shape)} ≠ {tuple(state[k].shape)}" for k, v in given.items()
                   if k in state and tuple(v.shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"{source}: the OpenUni weights do not match the components: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}, wrong shapes {shapes}")
    for name, module in modules.items():
        module.load_state_dict(parts[name], strict=True)


def _read_config(config) -> dict:
    import json

    if isinstance(config, dict):
        return dict(config)
    p = pathlib.Path(config)
    if p.is_dir():
        p = p / "config.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"transformer_config: cannot read {p} ({e})") from e


def load_language_model(source):
    """A transformers ``Qwen2Model``: given, from a transformers folder, or the language model
    of an InternVL3 chat-model folder (``config.json`` with ``llm_config``; weights
    ``language_model.model.*`` in its safetensors)."""
    from transformers import Qwen2Config, Qwen2Model

    if isinstance(source, nn.Module):
        return source
    root = pathlib.Path(source)
    config = _read_config(root)
    if "llm_config" not in config:
        return Qwen2Model.from_pretrained(str(root), local_files_only=True)
    from safetensors import safe_open

    llm = {k: v for k, v in config["llm_config"].items() if not k.startswith("_") and k != "architectures"}
    model = Qwen2Model(Qwen2Config(**llm))
    prefix, sd = "language_model.model.", {}
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{root}: an InternVL chat-model folder without safetensors weights")
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                if k.startswith(prefix):
                    sd[k[len(prefix):]] = h.get_tensor(k)
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{root}: the language model weights do not match its llm_config: missing "
                         f"{result.missing_keys[:20]}, unexpected {result.unexpected_keys[:20]}")
    return model.to(getattr(torch, str(llm.get("torch_dtype") or llm.get("dtype") or "float32"), torch.float32))


# ----------------------------------------------------------------------------- load_pipeline

def load_openuni_pipeline(path, *, dtype=None, torch_dtype=None, transformer: Optional[nn.Module] = None,
                          **pth_components) -> OpenUniPipeline:
    """``twinflow.load_pipeline(pth, model="openuni", ...)``'s reading step for the published
    ``.pth``: ``text_encoder``, ``tokenizer``, ``vae`` and ``transformer_config`` are required (see
    :meth:`OpenUniPipeline.from_pth`); `transformer` (a loaded SanaTransformer2DModel, e.g. a
    TwinFlow one) replaces the base transformer. `torch_dtype` is `dtype`'s older name.
    Returns the unpatched pipeline."""
    from .pipelines import resolve_dtype_args

    dtype = resolve_dtype_args(dtype, torch_dtype)
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such OpenUni weights file")
    needed = ("text_encoder", "tokenizer", "vae", "transformer_config")
    absent = [k for k in needed if pth_components.get(k) is None]
    if absent:
        raise ValueError(f"{p}: loading the published OpenUni .pth also needs {absent} (folders or objects)")
    unknown = sorted(set(pth_components) - set(needed) - {"connector_config"})
    if unknown:
        raise ValueError(f"unknown arguments for an OpenUni .pth: {unknown}")
    pipe = OpenUniPipeline.from_pth(p, **pth_components)
    if transformer is not None:
        pipe.register_modules(transformer=transformer)
    if dtype is not None:
        pipe.to(dtype)
    return pipe
