"""twinflow.training.models: the per-backbone model call and text encoding against the stock
diffusers pipelines (tiny random weights, CPU).

The TwinFlow model call the trainer gives TwinFlowLoss (``TwinFlowModel``, docs/algorithm.md §4 time
conventions, Qwen-Image token packing, Z-Image's negated output) must be the network the
pipeline runs: for every backbone, sampling ``UnifiedSampler`` (2 steps, deterministic, one-step
style so tt = 0 ≠ t and the aux embedder is live) through ``TwinFlowModel`` on the trainer's
text embeddings equals the stock pipeline's latents with the patched transformer and a
``TwinFlowScheduler`` of the same settings. One training step per backbone not covered by test_train_e2e also runs.
"""

from __future__ import annotations


import pytest
import torch


from tiny_pipelines import BACKBONES as IMAGE_BACKBONES, TEST_SIZE, build, tiny_threads  # noqa: E402

from twinflow import diffusers_patch  # noqa: E402
from twinflow import TwinFlowLoss, TwinFlowScheduler, UnifiedSampler  # noqa: E402
from twinflow.diffusers_patch import backbone  # noqa: E402
from twinflow.training.models import TwinFlowModel  # noqa: E402

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a busy 2-core machine: OpenMP oversubscription costs more than it gives."""
    n = torch.get_num_threads()
    torch.set_num_threads(tiny_threads())
    yield
    torch.set_num_threads(n)


SETTINGS = dict(stochast_ratio=0.0, rfba_gap_steps=(0.001, 0.6), sampling_style="few")
# Guidance off (Z-Image's pipeline guides for any scale > 0; Qwen-Image only with a negative prompt).
NO_CFG = {"sd3": dict(guidance_scale=1.0), "sana": dict(guidance_scale=1.0), "z-image": dict(guidance_scale=0.0),
          "qwen-image": {}, "flux": dict(true_cfg_scale=1.0),  # FLUX: guidance_scale is the distilled embedding
          "chroma": dict(guidance_scale=1.0), "lumina2": dict(guidance_scale=1.0)}
PACKED = ("flux", "chroma")  # 2×2-packed tokens, FluxPipeline's layout


def _latent_shape(pipe, model):
    if model in PACKED:  # FluxPipeline.prepare_latents: 2·(size // (2·vae_scale_factor)), 2×2-packed channels
        side = 2 * (TEST_SIZE // (2 * pipe.vae_scale_factor))
        return (1, pipe.transformer.config.in_channels // 4, side, side)
    if model == "qwen-image":
        return (1, pipe.transformer.config.in_channels // 4, 1, TEST_SIZE // pipe.vae_scale_factor,
                TEST_SIZE // pipe.vae_scale_factor)
    f = getattr(pipe, "vae_scale_factor", 8)
    return (1, pipe.transformer.config.in_channels, TEST_SIZE // f, TEST_SIZE // f)


def _pipeline_latents(pipe, model, noise):
    """What the stock pipeline passes as `latents` (packed for Qwen-Image) → our [B, C, h, w]."""
    if model in ("qwen-image",) + PACKED:
        b, c, h, w = noise.shape
        return pipe._pack_latents(noise, b, c, h, w)
    return noise


# the image families (OpenUni: test_train_openuni.py; Wan, a video family: test_video.py; the
# editing families, a reference image too: test_edit_pipelines.py)
@pytest.mark.parametrize("model", sorted(m for m in IMAGE_BACKBONES if not backbone(m).edit))
def test_model_call_matches_stock_pipeline(model):
    family = backbone(model)
    pipe = build(model)
    diffusers_patch.patch(pipe.transformer, model)
    with torch.no_grad():  # a trained-looking aux embedder, so that tt = 0 matters
        g = torch.Generator().manual_seed(3)
        for n, p in pipe.transformer.named_parameters():
            if n.startswith(diffusers_patch.module_for(model).AUX_PREFIX):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    pipe.scheduler = TwinFlowScheduler(**SETTINGS)
    diffusers_patch.set_target_time(pipe.transformer, pipe.scheduler)
    shape = _latent_shape(pipe, model)
    noise = torch.randn(shape[:2] + shape[-2:], generator=torch.Generator().manual_seed(0))
    prompt = "a tiny test picture"
    with torch.no_grad():
        stock = pipe(prompt, num_inference_steps=2, height=TEST_SIZE, width=TEST_SIZE, output_type="latent",
                     latents=_pipeline_latents(pipe, model, noise), **NO_CFG[model]).images
        embeds = family.encode_text(pipe, [prompt], torch.device("cpu"))
        net = TwinFlowModel(pipe.transformer, family)
        ours = UnifiedSampler(sampling_steps=2, **SETTINGS).sample(
            net, noise, cond=[embeds[k] for k in family.text_keys])
    ours = _pipeline_latents(pipe, model, ours)
    torch.testing.assert_close(ours, stock.reshape(ours.shape), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", ["sana", "z-image", "flux", "chroma", "lumina2"])  # SD3, Qwen-Image: test_train_e2e
def test_one_training_step(model):
    family = backbone(model)
    pipe = build(model)
    diffusers_patch.patch(pipe.transformer, model)
    net = TwinFlowModel(pipe.transformer, family).train()
    with torch.no_grad():
        embeds = family.encode_text(pipe, [f"picture {i}" for i in range(4)], torch.device("cpu"))
        null = family.encode_text(pipe, [""], torch.device("cpu"))
        pixels = torch.rand(4, 3, TEST_SIZE, TEST_SIZE) * 2 - 1
        x = family.encode_latents(pipe.vae, pixels, torch.Generator().manual_seed(0))
    cond = [embeds[k] for k in family.text_keys]
    uncond = [null[k].expand(4, *null[k].shape[1:]) for k in family.text_keys]
    loss_fn = TwinFlowLoss("twinflow", ema_decay_rate=0.0)
    loss = loss_fn(net, x, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(1))
    loss.backward()
    # 8 calls, two independent pairs batched; the guidance pair only when cond and uncond join
    joins = all(c.shape[1:] == u.shape[1:] and c.dtype == u.dtype for c, u in zip(cond, uncond))
    assert torch.isfinite(loss) and loss_fn.last_stats["model_calls"] == (6 if joins else 7)
    aux = [p for n, p in pipe.transformer.named_parameters()
           if n.startswith(diffusers_patch.module_for(model).AUX_PREFIX)]
    assert aux and all(p.grad is not None for p in aux)
    with torch.no_grad():
        img = family.decode_latents(pipe.vae, x)
    assert img.shape == (4, 3, TEST_SIZE, TEST_SIZE)


CONFIG = {"sd3": "sd35", "qwen-image": "qwen_image", "z-image": "z_image", "sana": "sana", "flux": "flux",
          "chroma": "chroma", "lumina2": "lumina2"}


@pytest.mark.parametrize("model", sorted(CONFIG))  # OpenUni: test_train_openuni.py (LoRA through twinflow train)
def test_one_lora_training_step_with_the_published_targets(model):
    """LoRA mode (label t − tt/2, no aux embedder) with the adapter of configs/<model>_lora_1order.yaml:
    its published target modules exist in the backbone (the time embedder, ``embed_name``, among them),
    the TwinFlow step is finite and only the adapter gets gradients."""
    import pathlib

    from twinflow.training.config import load_config
    from twinflow.training.models import add_lora

    family = backbone(model)
    cfg = load_config(pathlib.Path(__file__).resolve().parents[2] / "configs" / f"{CONFIG[model]}_lora_1order.yaml",
                      ["lora.rank=4", "lora.alpha=4"])
    pipe = build(model)
    family.patch(pipe.transformer, mode="lora")
    pipe.transformer.requires_grad_(False)
    add_lora(pipe.transformer, cfg.lora, "online")
    adapted = {n.split(".lora_A")[0] for n, _ in pipe.transformer.named_parameters() if ".lora_A." in n}
    assert any(n.startswith(family.embed_name + ".") for n in adapted), sorted(adapted)  # the time embedder is adapted
    net = TwinFlowModel(pipe.transformer, family).train()
    with torch.no_grad():
        embeds = family.encode_text(pipe, [f"picture {i}" for i in range(4)], torch.device("cpu"))
        null = family.encode_text(pipe, [""], torch.device("cpu"))
        x = family.encode_latents(pipe.vae, torch.rand(4, 3, TEST_SIZE, TEST_SIZE) * 2 - 1,
                                  torch.Generator().manual_seed(0))
    cond = [embeds[k] for k in family.text_keys]
    uncond = [null[k].expand(4, *null[k].shape[1:]) for k in family.text_keys]
    loss_fn = TwinFlowLoss("twinflow", **cfg.twinflow.settings())
    loss = loss_fn(net, x, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in pipe.transformer.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)  # the base stays frozen
    # the time embedder's adapter learns (layers whose output the last block drops may get none)
    emb = {n: g for n, g in grads.items() if n.startswith(family.embed_name + ".") and ".lora_B." in n}
    assert emb and all(g is not None and g.abs().sum() > 0 for g in emb.values()), emb.keys()
