"""Tiny random-weight diffusers pipelines (Qwen-Image, Z-Image, SD3, Sana, FLUX.1, Chroma, Lumina-2,
Wan and the editing families Qwen-Image-Edit, Qwen-Image-Edit-Plus, FLUX.1 Kontext): a smoke test of
``twinflow train`` / ``load_pipeline`` / ``twinflow generate`` on a CPU in seconds, and the
models the test suite runs everything on.

    twinflow tiny-pipeline --model sd3 --output-dir runs/tiny-sd3

Sizes follow diffusers' own fast tests: 1-2 layer transformers, tiny VAEs and text encoders
built from configs, weights seeded (``torch.manual_seed(0)``), so the same call gives the same
pipeline. The tokenizers are built offline (a byte-level BPE with no merges, one token per
byte; Qwen2.5-VL's processor adds a tiny image processor), so nothing touches the network. The
images such a pipeline makes are noise: it checks that a path runs, not what it learns.

Example:
    >>> from twinflow.tiny import build
    >>> pipe = build("sd3")  # a StableDiffusion3Pipeline, about 0.1M parameters
    >>> type(pipe).__name__
    'StableDiffusion3Pipeline'
"""

from __future__ import annotations

import torch

__all__ = ["BACKBONES", "TEST_SIZE", "VIDEO_BACKBONES", "WAN_VARIANTS", "build", "build_transformer", "build_wan",
           "tiny_dc_ae"]

#: the image backbones a tiny pipeline is built for (the backbone-parametrised suites run on each)
BACKBONES = ("qwen-image", "z-image", "sd3", "sana", "flux", "chroma", "lumina2", "qwen-image-edit",
             "qwen-image-edit-plus", "flux-kontext")
#: the video backbones a tiny pipeline is built for (the family contract runs on them too;
#: tests/families/test_video.py runs their pipeline paths)
VIDEO_BACKBONES = ("wan",)
#: an image size (pixels) every tiny pipeline accepts
TEST_SIZE = 32


# ----------------------------------------------------------------------------- tokenizers

def _byte_alphabet():
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


#: Qwen2.5-VL's vision tokens, after the byte alphabet and the chat tokens (ids 259-262)
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def _qwen_tokenizer(chat_template: bool = False, vision: bool = False):
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + (list(VISION_TOKENS) if vision else [])
    vocab = {c: i for i, c in enumerate(_byte_alphabet())}
    for s in specials:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    if chat_template:  # ZImagePipeline formats prompts with apply_chat_template
        tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = _byte_alphabet()
    for c in alphabet + [c + "</w>" for c in alphabet]:  # CLIP marks a word's last symbol
        vocab[c] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    return T5Tokenizer(vocab=pieces + [(chr(i), -2.0) for i in range(33, 127)], extra_ids=0)


def _gemma_tokenizer():
    from transformers import GemmaTokenizer

    vocab = {s: i for i, s in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    for b in range(256):  # byte fallback
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in "▁" + "".join(chr(i) for i in range(33, 127)):
        vocab[c] = len(vocab)
    return GemmaTokenizer(vocab=vocab, merges=[])


# ----------------------------------------------------------------------------- transformers

def _qwen_image_transformer():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))


def _z_image_transformer():
    from diffusers import ZImageTransformer2DModel

    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
    with torch.no_grad():  # created with torch.empty: fix them (as diffusers' tests do)
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    return transformer


def _sd3_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4)


def _sana_transformer():
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=32)


def _flux_transformer():
    from diffusers import FluxTransformer2DModel

    # guidance_embeds: FLUX.1-dev's guidance-distilled layout (schnell has none)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8))


def _wan_transformer(in_channels: int = 16):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels,
        out_channels=in_channels, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, rope_max_seq_len=32)


def _chroma_transformer():
    from diffusers import ChromaTransformer2DModel

    # approximator_*: the time embedder (an MLP over 16 sinusoid channels), 2 residual layers
    return ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=16, approximator_hidden_dim=32,
        approximator_layers=2)


def _lumina2_transformer():
    from diffusers import Lumina2Transformer2DModel

    return Lumina2Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, hidden_size=32, num_layers=1, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=2, multiple_of=16, axes_dim_rope=(8, 4, 4), cap_feat_dim=8)


def _qwen_image_edit_transformer():
    from diffusers import QwenImageTransformer2DModel

    # zero_cond_t: Qwen-Image-Edit-2511's layout (the reference tokens modulated by the embedding at 0)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4), zero_cond_t=True)


TRANSFORMERS = {"qwen-image": _qwen_image_transformer, "z-image": _z_image_transformer, "sd3": _sd3_transformer,
                "sana": _sana_transformer, "flux": _flux_transformer, "chroma": _chroma_transformer,
                "lumina2": _lumina2_transformer, "wan": _wan_transformer,
                "qwen-image-edit": _qwen_image_edit_transformer, "qwen-image-edit-plus": _qwen_image_edit_transformer,
                "flux-kontext": _flux_transformer}


def build_transformer(model: str):
    """The tiny pipeline's transformer alone (the same weights as ``build(model).transformer``)."""
    torch.manual_seed(0)
    return TRANSFORMERS[model]().eval()


# ----------------------------------------------------------------------------- pipelines

def _qwen_vl(**token_ids):
    """A tiny Qwen2.5-VL (diffusers' fast-test sizes); `token_ids` its vision token ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=320, rope_theta=1000000.0,
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        hidden_size=16, vocab_size=320, **token_ids)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_qwen_image():
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    torch.manual_seed(0)
    transformer = _qwen_image_transformer()
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    text_encoder = _qwen_vl(vision_end_token_id=301, vision_start_token_id=300, vision_token_id=302,
                            image_token_id=303, video_token_id=304)
    return QwenImagePipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                             text_encoder=text_encoder, tokenizer=_qwen_tokenizer())


def _qwen_processor(tokenizer):
    """Qwen2.5-VL's processor around `tokenizer`, its image processor at most 112² pixels (4 × 4
    merged vision tokens): the pipelines hand it a reference of about 1 MP."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    small = dict(min_pixels=56 * 56, max_pixels=112 * 112)
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**small), tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(**small))


def build_qwen_image_edit(plus: bool = False):
    """QwenImageEditPipeline (Edit-Plus: ``plus=True``). The VAE downsamples ×8 as the real one
    does (base width 4): the pipeline encodes every reference at about 1 MP."""
    from twinflow import diffusers_patch

    family = diffusers_patch.backbone("qwen-image-edit-plus" if plus else "qwen-image-edit")
    family.check_environment()
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    transformer = _qwen_image_edit_transformer()
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4)
    tokenizer = _qwen_tokenizer(vision=True)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    text_encoder = _qwen_vl(vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                            vision_token_id=ids["<|image_pad|>"], image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"])
    return family.pipeline_class()(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                                   text_encoder=text_encoder, tokenizer=tokenizer, processor=_qwen_processor(tokenizer))


def build_qwen_image_edit_plus():
    return build_qwen_image_edit(plus=True)


def build_z_image():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    transformer = _z_image_transformer()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1,
                        latent_channels=16, norm_num_groups=32, sample_size=32, scaling_factor=0.3611,
                        shift_factor=0.1159)
    text_encoder = Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, vocab_size=320,
                                          max_position_embeddings=512)).eval()
    return ZImagePipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                          text_encoder=text_encoder, tokenizer=_qwen_tokenizer(chat_template=True))


def _tiny_kl_vae():
    """SD3's, FLUX's and Chroma's tiny AutoencoderKL (4 latent channels, no downsampling; their shift/scale)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=0.0609, scaling_factor=1.5035)


def _tiny_clip_config(**kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2, vocab_size=520, hidden_act="gelu", **kw)


def _tiny_t5(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=100, d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8)).eval()


def build_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    transformer = _sd3_transformer()
    vae = _tiny_kl_vae()
    # Two CLIP encoders (pooled 2 × 32 = pooled_projection_dim) and a T5 of width joint_attention_dim.
    clip = _tiny_clip_config(projection_dim=32)
    te1 = CLIPTextModelWithProjection(clip).eval()
    te2 = CLIPTextModelWithProjection(clip).eval()
    te3 = _tiny_t5(d_model=64)
    return StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    text_encoder=te1, tokenizer=_clip_tokenizer(), text_encoder_2=te2,
                                    tokenizer_2=_clip_tokenizer(), text_encoder_3=te3, tokenizer_3=_t5_tokenizer())


def build_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    transformer = _flux_transformer()
    vae = _tiny_kl_vae()
    # CLIP gives the pooled text (pooled_projection_dim), T5 the sequence (joint_attention_dim).
    clip = _tiny_clip_config()
    te1 = CLIPTextModel(clip).eval()
    te2 = _tiny_t5()
    return FluxPipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                        text_encoder=te1, tokenizer=_clip_tokenizer(), text_encoder_2=te2, tokenizer_2=_t5_tokenizer())


def build_chroma():
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    transformer = _chroma_transformer()
    vae = _tiny_kl_vae()
    # one T5 (no pooled text), of width joint_attention_dim
    return ChromaPipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                          text_encoder=_tiny_t5(), tokenizer=_t5_tokenizer())


def _tiny_gemma2(num_hidden_layers: int = 1):
    from transformers import Gemma2Config, Gemma2Model

    return Gemma2Model(Gemma2Config(
        head_dim=16, hidden_size=8, intermediate_size=64, max_position_embeddings=8192, num_attention_heads=2,
        num_hidden_layers=num_hidden_layers, num_key_value_heads=2, vocab_size=360,
        attn_implementation="eager")).eval()


def build_lumina2():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline

    torch.manual_seed(0)
    transformer = _lumina2_transformer()
    # Lumina2Pipeline assumes an 8× VAE (vae_scale_factor = 8, not read from the VAE): four blocks
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.1159, scaling_factor=0.3611)
    # the pipeline reads the second-to-last hidden state: two layers
    return Lumina2Pipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                           text_encoder=_tiny_gemma2(num_hidden_layers=2), tokenizer=_gemma_tokenizer())


def build_flux_kontext():
    """FluxKontextPipeline: FLUX's tiny transformer and text encoders, a VAE downsampling ×8 (the
    pipeline resizes a reference to about 1 MP unless told ``_auto_resize=False``)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    flux = build_flux()
    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 4, 4, 4),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, latent_channels=4, norm_num_groups=1, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    return FluxKontextPipeline(**{**flux.components, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler()})


def tiny_dc_ae():
    """A tiny AutoencoderDC (4 latent channels, ×2 downsampling), also OpenUni's (tests/tiny_openuni.py)."""
    from diffusers import AutoencoderDC

    return AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1], downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407)


def build_sana():
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    torch.manual_seed(0)
    transformer = _sana_transformer()
    vae = tiny_dc_ae()
    text_encoder = _tiny_gemma2()
    return SanaPipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                        text_encoder=text_encoder, tokenizer=_gemma_tokenizer())


#: the layouts ``build_wan`` makes: Wan 2.1 T2V; Wan 2.2 A14B (two experts, boundary_ratio); Wan 2.2
#: TI2V 5B (48-channel residual VAE with ×16 pixels per latent, per-token timesteps)
WAN_VARIANTS = ("2.1", "2.2-a14b", "2.2-ti2v")


def build_wan(variant: str = "2.1"):
    """A tiny WanPipeline (text-to-video) in one of ``WAN_VARIANTS``."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    if variant not in WAN_VARIANTS:
        raise ValueError(f"variant: expected one of {WAN_VARIANTS}, got {variant!r}")
    torch.manual_seed(0)
    ti2v = variant == "2.2-ti2v"
    transformer = _wan_transformer(48 if ti2v else 16)
    extra = {}
    if variant == "2.2-a14b":
        extra = dict(transformer_2=_wan_transformer(), boundary_ratio=0.875)
    elif ti2v:
        extra = dict(expand_timesteps=True)
    vae_kw = (dict(z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2, scale_factor_spatial=16,
                   latents_mean=[0.0] * 48, latents_std=[1.0] * 48) if ti2v else dict(z_dim=16))
    vae = AutoencoderKLWan(base_dim=3, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                           **vae_kw)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=2,
                                               relative_attention_num_buckets=8)).eval()
    return WanPipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       text_encoder=text_encoder, tokenizer=_t5_tokenizer(), **extra)


BUILDERS = {"qwen-image": build_qwen_image, "z-image": build_z_image, "sd3": build_sd3, "sana": build_sana,
            "flux": build_flux, "chroma": build_chroma, "lumina2": build_lumina2, "wan": build_wan,
            "qwen-image-edit": build_qwen_image_edit, "qwen-image-edit-plus": build_qwen_image_edit_plus,
            "flux-kontext": build_flux_kontext}


def build(model: str):
    """A tiny stock pipeline of `model` (random weights, seeded)."""
    return BUILDERS[model]()


# ----------------------------------------------------------------------------- command

def _add_arguments(p) -> None:
    p.add_argument("--model", default="sd3", choices=BACKBONES + VIDEO_BACKBONES,
                   help="the pipeline family (default sd3)")
    p.add_argument("--output-dir", required=True, help="a new or empty folder for the pipeline")
    p.add_argument("--quiet", action="store_true", help="print nothing")


def _run(args) -> int:
    import pathlib

    out = pathlib.Path(args.output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--output-dir: {out} exists and is not an empty folder")
    build(args.model).save_pretrained(out)
    if not args.quiet:
        print(f"wrote a tiny {args.model} pipeline (random weights: for smoke runs, its images are noise) to {out}")
    return 0


def _register() -> None:
    from .cli import COMMANDS, register_command

    if "tiny-pipeline" not in COMMANDS:
        register_command("tiny-pipeline", add_arguments=_add_arguments,
                         help="save a tiny random-weight diffusers pipeline (CPU smoke runs of train/generate)")(_run)


_register()
