"""The patched backbones against the published TwinFlow wrappers (inclusionAI/TwinFlow).

1. Time embedding: for every backbone, the embedding the patched transformer computes at its
   pipeline's call site equals an independent float64 transcription of the published
   wrapper's formula (sinusoid, MLP and aux term written out here from the published
   definitions, with the model's weights), at (t, tt) pairs that include tt = 0 and tt = t.
   Z-Image: tt_z = torch.sign(tt)(1 − |tt|), so tt = 0 gives tt_z = 0.
2. Signed times: on the path the trainer feeds (``TwinFlowModel`` → ``Backbone.call`` →
   patched transformer), the fake rows (−τ, −τ) reach the network differently from the real
   rows (τ, τ), for every backbone in both modes (aux and LoRA).
3. Aux initialisation as published: Qwen-Image and Z-Image copy the main embedder, SD3 and
   Sana draw N(0, 0.02) weights with zero biases; trained weights already attached win.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch


from twinflow import diffusers_patch  # noqa: E402
from tiny_pipelines import BACKBONES, VARIANTS, build_transformer, family_inputs, one_thread  # noqa: E402,F401
from twinflow.training.models import TwinFlowModel  # noqa: E402

#: the backbones with a published TwinFlow wrapper (FLUX, Chroma and Lumina-2 have none: their
#: tests/families/test_patch_<name>.py check their formulas; the editing variants share their base
#: family's embedder and hook, checked here on it, and their reference half in tests/families/test_patch_edit.py)
PUBLISHED = tuple(m for m in BACKBONES if m not in ("flux", "chroma", "lumina2") and m not in VARIANTS)
F64 = torch.float64
B = 4
# (t, tt) rows: the one-step jump (1, 0), few-step rows with tt = 0, tt between, and tt = t
PAIRS = [(1.0, 0.0), (0.75, 0.0), (0.6, 0.25), (0.3, 0.3)]


# ----------------------------------------------------------------------------- transcription

def sinusoid(x: torch.Tensor, dim: int = 256, scale: float = 1.0) -> torch.Tensor:
    """[cos, sin] of scale·x·10000^(−k/(dim/2)), k < dim/2 (diffusers' Timesteps with
    flip_sin_to_cos=True, shift 0, and Z-Image's TimestepEmbedder.timestep_embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=F64) / half)
    a = scale * x.to(F64)[:, None] * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)


def linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.detach().to(F64).T + layer.bias.detach().to(F64)


def mlp(first: torch.nn.Linear, second: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(second, torch.nn.functional.silu(linear(first, x)))


def z_time(t: torch.Tensor) -> torch.Tensor:
    """The published Z-Image wrapper: sign(t)·(1 − |t|) with sign(0) = 0."""
    return torch.tensor([0.0 if v == 0 else math.copysign(1.0 - abs(v), v) for v in t.tolist()], dtype=F64)


def published_qwen(m, t, tt, hs):
    def emb(e, x):
        return mlp(e.timestep_embedder.linear_1, e.timestep_embedder.linear_2, sinusoid(x, scale=1000.0))
    return emb(m.time_text_embed, t) + emb(m.time_text_embed_2, tt) * (t - tt)[:, None]


def published_sd3(m, t, tt, pooled):
    def emb(e, x):
        return (mlp(e.timestep_embedder.linear_1, e.timestep_embedder.linear_2, sinusoid(x))
                + mlp(e.text_embedder.linear_1, e.text_embedder.linear_2, pooled.to(F64)))
    return emb(m.time_text_embed, 1000 * t) + emb(m.time_text_embed_2, 1000 * tt) * ((1000 * t - 1000 * tt) / 1000)[:, None]


def published_sana(m, t, tt):
    def ada(e, x):
        embedded = mlp(e.emb.timestep_embedder.linear_1, e.emb.timestep_embedder.linear_2, sinusoid(x))
        return linear(e.linear, torch.nn.functional.silu(embedded)), embedded
    (mod, emb), (mod2, emb2) = ada(m.time_embed, 1000 * t), ada(m.time_embed_2, 1000 * tt)
    scale = ((1000 * t - 1000 * tt) / 1000)[:, None]
    return mod + mod2 * scale, emb + emb2 * scale


def published_z(m, t, tt):
    t_z, tt_z = z_time(t), z_time(tt)

    def emb(e, x):
        return mlp(e.mlp[0], e.mlp[2], sinusoid(x, dim=e.frequency_embedding_size))
    return emb(m.t_embedder, 1000 * t_z.abs()) + emb(m.t_embedder_2, 1000 * (tt_z - t_z)) * (t_z - tt_z).abs()[:, None]


def _patched(model, mode="aux"):
    transformer = diffusers_patch.patch(build_transformer(model), model, mode=mode)
    if mode == "aux":  # trained-looking aux weights: the aux term must be the published one
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in getattr(transformer, diffusers_patch.backbone(model).aux_name).parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return transformer


@pytest.mark.parametrize("model", PUBLISHED)
def test_time_embedding_matches_the_published_formula(model):
    m = _patched(model)
    t = torch.tensor([p[0] for p in PAIRS])
    tt = torch.tensor([p[1] for p in PAIRS])
    diffusers_patch.set_target_time(m, tt)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # ours: the hooked embedder called as the stock transformer calls it
        if model == "qwen-image":  # QwenImagePipeline passes σ = t
            hs = torch.randn(B, 3, 48, generator=g)
            got, want = m.time_text_embed(t, hs), published_qwen(m, t.to(F64), tt.to(F64), hs)
        elif model == "sd3":  # StableDiffusion3Pipeline passes 1000·t
            pooled = torch.randn(B, m.config.pooled_projection_dim, generator=g)
            got, want = m.time_text_embed(1000 * t, pooled), published_sd3(m, t.to(F64), tt.to(F64), pooled)
        elif model == "sana":  # SanaPipeline passes 1000·t·timestep_scale (= 1 here, as OpenUni's wrapper)
            assert m.config.timestep_scale == 1.0
            got = m.time_embed(1000 * t, batch_size=B, hidden_dtype=torch.float32)
            want = published_sana(m, t.to(F64), tt.to(F64))
        else:  # ZImagePipeline passes t_z = 1 − σ
            got, want = m.t_embedder(1000 * (1 - t)), published_z(m, t.to(F64), tt.to(F64))
    for g_, w_ in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert g_.dtype == torch.float32
        torch.testing.assert_close(g_.double(), w_, rtol=1e-5, atol=1e-5)
    # and tt = 0 matters: the rows with tt = 0 differ from the stock embedding (tt = t)
    diffusers_patch.set_target_time(m, None)
    with torch.no_grad():
        stock = (m.time_text_embed(t, hs) if model == "qwen-image" else m.time_text_embed(1000 * t, pooled)
                 if model == "sd3" else m.time_embed(1000 * t, batch_size=B, hidden_dtype=torch.float32)[1]
                 if model == "sana" else m.t_embedder(1000 * (1 - t)))
    ours = got[1] if isinstance(got, tuple) else got
    assert not torch.allclose(ours[:2], stock[:2], atol=1e-4)
    torch.testing.assert_close(ours[3], stock[3], rtol=0, atol=1e-5)  # tt = t: the stock embedding


def test_z_image_target_time_zero_is_the_noise_end():
    """The published quirk kept on purpose: tt = 0 → tt_z = 0, not Z-Image's data end 1."""
    from twinflow.diffusers_patch.z_image import from_model_time, to_model_time

    t = torch.tensor([0.0, 0.25, 1.0, -0.25, -1.0], dtype=F64)
    assert to_model_time(t).tolist() == [0.0, 0.75, 0.0, -0.75, -0.0]
    assert from_model_time(to_model_time(t[1:])).tolist() == [0.25, 1.0, -0.25, -1.0]


# ----------------------------------------------------------------------------- signed times

def _inputs(model, transformer):
    """Latents [B, C, 8, 8] and the cond list of the backbone's text_keys (and reference latents)."""
    return family_inputs(model, transformer, B)


@pytest.mark.parametrize("mode", ["aux", "lora"])
@pytest.mark.parametrize("model", BACKBONES)
def test_fake_rows_reach_the_network_differently(model, mode):
    transformer = _patched(model, mode)
    net = TwinFlowModel(transformer, diffusers_patch.backbone(model))
    x, cond = _inputs(model, transformer)
    tau = torch.tensor([0.9, 0.6, 0.35, 0.1])
    with torch.no_grad():
        real = net(x, tau, tau, c=cond)
        fake = net(x, -tau, -tau, c=cond)
        again = net(x, tau, tau, c=cond)
    assert torch.isfinite(fake).all() and torch.equal(real, again)
    per_row = (fake - real).flatten(1).abs().amax(dim=1)
    assert (per_row > 1e-3 * real.abs().amax()).all(), f"{model}/{mode}: (−τ, −τ) embeds as (τ, τ): {per_row}"


def test_z_image_training_call_feeds_the_published_model_time():
    """Z-Image through the trainer's call: the stock transformer at t_z = sign(t)(1 − |t|) in
    aux mode with tt = t, and at the signed label l_z = sign(l)(1 − |l|), l = t − tt/2, in LoRA
    mode (the published LoRA path feeds the stock transformer the signed t_z)."""
    stock = build_transformer("z-image")
    x, cond = _inputs("z-image", stock)
    caps = [e[m.bool()] for e, m in zip(*cond)]

    def stock_at(t_z):
        with torch.no_grad():
            return -torch.stack(stock(list(x[:, :, None]), t_z, caps, return_dict=False)[0])[:, :, 0]

    t = torch.tensor([0.9, -0.6, -0.35, 0.1])
    tt = torch.tensor([0.9, -0.6, 0.0, 0.05])
    aux = TwinFlowModel(_patched("z-image", "aux"), diffusers_patch.backbone("z-image"))
    lora = TwinFlowModel(_patched("z-image", "lora"), diffusers_patch.backbone("z-image"))
    with torch.no_grad():
        torch.testing.assert_close(aux(x, t, t, c=cond), stock_at(z_time(t).float()), rtol=0, atol=1e-5)
        label = t - tt / 2
        torch.testing.assert_close(lora(x, t, tt, c=cond), stock_at(z_time(label).float()), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- aux initialisation

@pytest.mark.parametrize("model", PUBLISHED)
def test_aux_embedder_initialisation_is_the_published_one(model):
    bb = diffusers_patch.backbone(model)
    torch.manual_seed(123)
    m = diffusers_patch.patch(build_transformer(model), model)
    aux = dict(getattr(m, bb.aux_name).named_parameters())
    main = getattr(m, bb.embed_name)
    if model in ("qwen-image", "z-image"):
        assert bb.aux_init == "copy"
        main_params = dict(main.named_parameters()) if model == "z-image" else dict(
            ("timestep_embedder." + k, v) for k, v in main.timestep_embedder.named_parameters())
        assert set(aux) == set(main_params)
        for k, v in aux.items():
            assert torch.equal(v, main_params[k]) and v.data_ptr() != main_params[k].data_ptr(), k
    else:
        assert bb.aux_init == "normal"
        assert set(aux) == {k for k, _ in main.named_parameters()}
        weights = torch.cat([v.detach().flatten() for k, v in aux.items() if k.endswith("weight")])
        assert all(not v.any() for k, v in aux.items() if k.endswith("bias"))
        assert abs(float(weights.mean())) < 2e-3 and abs(float(weights.std()) - 0.02) < 1e-3
    # trained weights attached before patching win over the initialisation (load_pipeline's
    # checkpoint case: test_load_pipeline.py::test_aux_weights_from_single_and_sharded_safetensors)
    trained = copy.deepcopy(getattr(m, bb.aux_name))
    with torch.no_grad():
        for v in trained.parameters():
            v.fill_(0.5)
    fresh = build_transformer(model)
    fresh.add_module(bb.aux_name, trained)
    bb.patch(fresh)
    assert getattr(fresh, bb.aux_name) is trained
    assert all(bool((v == 0.5).all()) for v in trained.parameters())
