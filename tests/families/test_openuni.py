"""OpenUni (twinflow.openuni_pipeline, diffusers_patch.openuni) on a tiny random-weight model
(tests/tiny_openuni.py), offline, through the real saving/loading paths:

* the pipeline is diffusers' Sana sampling loop on OpenUni's text embeddings (equal to a stock
  SanaPipeline fed the same embeddings, with and without guidance) and survives
  save_pretrained/from_pretrained;
* text encoding: padding in a batch changes nothing, the connector is the published
  pre-LayerNorm encoder layout (an independent float64 transcription);
* the published .pth loads into the same model as the saved folder; wrong keys give one
  error listing them; a TwinFlow transformer folder replaces the base transformer;
* the aux embedder: published N(0, 0.02) init, trained weights win, and the time embedding equals
  an independent float64 transcription of the published wrapper (tt = 0 included); signed fake
  times reach the network differently from positive ones in both modes;
* ``twinflow generate --model openuni``.
"""

from __future__ import annotations

import json

import pytest
import torch


from checks import expect_error  # noqa: E402
from tiny_openuni import (build_openuni, published_state_dict, pth_components,  # noqa: E402
                          saved_openuni)
from tiny_pipelines import TEST_SIZE, one_thread, saved_pipeline  # noqa: E402,F401

from twinflow import diffusers_patch  # noqa: E402
import twinflow  # noqa: E402
from twinflow.openuni_pipeline import OpenUniPipeline  # noqa: E402

KW = dict(height=TEST_SIZE, width=TEST_SIZE, output_type="latent")


def _latents(pipe, prompt="a red square", steps=2, seed=0, **kw):
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **KW, **kw).images


# ----------------------------------------------------------------------------- pipeline

@pytest.mark.exact
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_pipeline_is_the_sana_loop_on_openuni_embeddings(guidance):
    from diffusers import SanaPipeline

    pipe = build_openuni()
    ours = _latents(pipe, guidance_scale=guidance, negative_prompt="blurry" if guidance > 1 else None)
    pe, _, ne, _ = pipe.encode_prompt("a red square", guidance > 1, "blurry" if guidance > 1 else None)
    sana = SanaPipeline(tokenizer=None, text_encoder=None, vae=pipe.vae, transformer=pipe.transformer,
                        scheduler=pipe.scheduler)
    with torch.no_grad():
        stock = sana(prompt_embeds=pe, prompt_attention_mask=torch.ones(pe.shape[:2], dtype=torch.long),
                     negative_prompt_embeds=ne,
                     negative_prompt_attention_mask=None if ne is None else torch.ones(ne.shape[:2], dtype=torch.long),
                     negative_prompt=None, guidance_scale=guidance, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                     use_resolution_binning=False, complex_human_instruction=None, **KW).images
    torch.testing.assert_close(ours, stock, rtol=0, atol=0)
    if guidance > 1:  # the negative prompt is used: the published unconditional prompt gives other latents
        assert not torch.equal(ours, _latents(pipe, guidance_scale=guidance))


@pytest.mark.exact
def test_pipeline_round_trip_and_arguments(tmp_path):
    pipe = build_openuni()
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["connector"] == ["twinflow.openuni_pipeline", "OpenUniConnector"]
    loaded = OpenUniPipeline.from_pretrained(tmp_path / "p", local_files_only=True)
    for name in ("text_encoder", "meta_queries", "connector", "projector", "transformer", "vae"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    torch.testing.assert_close(_latents(loaded), _latents(pipe), rtol=0, atol=0)
    img = pipe("x", num_inference_steps=1, height=TEST_SIZE, width=2 * TEST_SIZE, output_type="np",
               num_images_per_prompt=2).images
    assert img.shape == (2, TEST_SIZE, 2 * TEST_SIZE, 3)
    expect_error(ValueError, lambda: pipe("x", height=33, width=32), contains="height")
    expect_error(ValueError, lambda: pipe(None), contains="prompt")
    expect_error(ValueError, lambda: pipe("x", output_type="gif", **{k: v for k, v in KW.items() if k != "output_type"}),
                 contains="output_type")
    expect_error(ValueError, lambda: pipe("x", negative_prompt=["a", "b"], guidance_scale=2.0, **KW),
                 contains="negative_prompt")


def test_text_encoding_ignores_padding_and_connector_is_the_published_layout():
    pipe = build_openuni()
    short, long = "cat", "a much longer prompt about a cat"
    with torch.no_grad():
        both = pipe.encode_texts([short, long])
        alone = torch.cat([pipe.encode_texts([short]), pipe.encode_texts([long])])
    torch.testing.assert_close(both, alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(both[0], both[1])
    # Connector: pre-LN bidirectional layers, no position embeddings, no final norm (float64).
    c = pipe.connector.double()
    x = torch.randn(2, 5, c.config.hidden_size, dtype=torch.float64)
    h, heads = x.clone(), c.config.num_attention_heads
    for layer in c.encoder.layers:
        a = torch.nn.functional.layer_norm(h, h.shape[-1:], layer.layer_norm1.weight, layer.layer_norm1.bias,
                                           c.config.layer_norm_eps)
        q, k, v = (lin(a).unflatten(-1, (heads, -1)).transpose(1, 2) for lin in
                   (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj))
        w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        h = h + layer.self_attn.out_proj((w @ v).transpose(1, 2).flatten(2))
        m = torch.nn.functional.layer_norm(h, h.shape[-1:], layer.layer_norm2.weight, layer.layer_norm2.bias,
                                           c.config.layer_norm_eps)
        h = h + layer.mlp.fc2(torch.nn.functional.gelu(layer.mlp.fc1(m), approximate="tanh"))
    with torch.no_grad():
        torch.testing.assert_close(c(x), h.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(c(x.flip(1)), h.detach().flip(1), rtol=1e-10, atol=1e-10)  # no positions


# ----------------------------------------------------------------------------- loading

@pytest.mark.exact
def test_published_pth_loads_the_same_model_as_the_folder():
    root = saved_openuni("pth")
    from_pth = twinflow.load_pipeline(root / "openuni.pth", model="openuni", **pth_components(root))
    with pytest.warns(UserWarning, match="no aux target-time weights"):
        from_folder = twinflow.load_pipeline(saved_openuni("stock"), model="openuni")
    a, b = from_pth.transformer.state_dict(), from_folder.transformer.state_dict()
    base = [k for k in a if not k.startswith(diffusers_patch.openuni.AUX_PREFIX)]
    assert all(torch.equal(a[k], b[k]) for k in base)
    for m in (from_pth, from_folder):  # the fresh aux embedder is not part of the comparison
        m.transformer.load_state_dict({k: v for k, v in a.items() if k not in base}, strict=False)
    torch.testing.assert_close(_latents(from_pth), _latents(from_folder), rtol=0, atol=0)
    assert isinstance(from_pth.scheduler, twinflow.TwinFlowPresetScheduler)


def test_published_pth_errors(tmp_path):
    root = saved_openuni("pth")
    sd = torch.load(root / "openuni.pth", weights_only=True)
    bad = dict(sd)
    del bad["connector.layers.0.mlp.fc1.bias"]
    bad["connector.extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    e = expect_error(ValueError, lambda: twinflow.load_pipeline(tmp_path / "bad.pth", model="openuni",
                                                                **pth_components(root)),
                     contains=("missing ['connector.layers.0.mlp.fc1.bias']", "connector.extra.weight"))
    assert str(e).count("\n") == 0
    torch.save({"lmm.x": torch.zeros(1), **sd}, tmp_path / "with_lm.pth")  # a copy of the LM is skipped
    twinflow.load_pipeline(tmp_path / "with_lm.pth", model="openuni", **pth_components(root))
    torch.save({"weird": torch.zeros(1)}, tmp_path / "other.pth")
    expect_error(ValueError, lambda: twinflow.load_pipeline(tmp_path / "other.pth", model="openuni",
                                                            **pth_components(root)),
                 contains=("not an OpenUni state dict", "missing ['meta_queries']", "weird"))
    torch.save({"meta_queries": sd["meta_queries"], "note": "a string"}, tmp_path / "obj.pth")
    expect_error(ValueError, lambda: twinflow.load_pipeline(tmp_path / "obj.pth", model="openuni",
                                                            **pth_components(root)), contains="state dict")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    expect_error(ValueError, lambda: twinflow.load_pipeline(tmp_path / "junk.pth", model="openuni",
                                                            **pth_components(root)), contains="weights_only")
    expect_error(ValueError, lambda: twinflow.load_pipeline(root / "openuni.pth", model="openuni"),
                 contains=("text_encoder", "tokenizer", "vae", "transformer_config"))
    expect_error(FileNotFoundError, lambda: twinflow.load_pipeline(tmp_path, model="openuni"),
                 contains="model_index.json")
    expect_error(ValueError, lambda: twinflow.load_pipeline(saved_openuni("stock"), model="sana"),
                 contains=("OpenUniPipeline folder (the openuni family)", "load it with model='openuni'"))
    expect_error(ValueError, lambda: twinflow.load_pipeline(saved_pipeline("sana", "stock"), model="sana",
                                                            text_encoder="x"),
                 contains=("text_encoder", "a loaded component", "or None, got the path 'x'"))
    expect_error(ValueError, lambda: twinflow.load_pipeline(saved_openuni("stock"), model="openuni",
                                                            transformer_config={}),
                 contains=("transformer_config: not a component of OpenUniPipeline", "meta_queries"))
    expect_error(ValueError, lambda: twinflow.load_pipeline(root / "openuni.pth", model="openuni", revision="main",
                                                            **pth_components(root)), contains="revision")
    expect_error(ValueError, lambda: twinflow.load_pipeline(root / "openuni.pth", model="sana"),
                 contains=("model='sana'", "a weights file", "only for ['openuni']"))


def test_twinflow_transformer_folder_and_trained_aux_weights_win():
    root, aux = saved_openuni("pth"), saved_openuni("aux")
    from safetensors.torch import load_file

    saved = load_file(str(aux / "transformer" / "diffusion_pytorch_model.safetensors"))
    for pipe in (twinflow.load_pipeline(root / "openuni.pth", model="openuni", transformer=aux / "transformer",
                                        **pth_components(root)),
                 twinflow.load_pipeline(aux, model="openuni")):
        state = pipe.transformer.state_dict()
        assert all(torch.equal(state[k], v) for k, v in saved.items())
        assert any(k.startswith("time_embed_2.") for k in saved)
    lora = twinflow.load_pipeline(aux, model="openuni", mode="lora")
    assert not any(k.startswith("time_embed_2.") for k in lora.transformer.state_dict())


# ----------------------------------------------------------------------------- time embedding

def test_fresh_aux_embedder_has_the_published_init():
    t = build_openuni().transformer
    t.time_embed.linear.weight.data.fill_(1.0)  # not copied from the main embedder
    diffusers_patch.patch(t, "openuni")
    linears = [m for m in t.time_embed_2.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3
    w = torch.cat([m.weight.flatten() for m in linears])
    assert abs(w.std().item() - 0.02) < 0.004 and abs(w.mean().item()) < 0.004
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)


def _published_time_embed(transformer, t, tt):
    """The published wrapper in float64: (mod, emb)(1000·t) + (mod₂, emb₂)(1000·tt)·(t − tt),
    AdaLayerNormSingle = Linear(SiLU(MLP(sinusoid(·)))), sinusoid flip_sin_to_cos, 256 channels
    (computed in float32, as diffusers' get_timestep_embedding always does)."""
    import math

    def ada(m, timestep):
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        arg = timestep.float()[:, None] * freqs[None]
        proj = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1).double()
        te = m.emb.timestep_embedder
        d = {k: v.double() for k, v in te.state_dict().items()}
        h = torch.nn.functional.silu(proj @ d["linear_1.weight"].T + d["linear_1.bias"])
        emb = h @ d["linear_2.weight"].T + d["linear_2.bias"]
        mod = torch.nn.functional.silu(emb) @ m.linear.weight.double().T + m.linear.bias.double()
        return mod, emb

    mod, emb = ada(transformer.time_embed, 1000 * t)
    mod2, emb2 = ada(transformer.time_embed_2, 1000 * tt)
    s = (t - tt)[:, None]
    return mod + mod2 * s, emb + emb2 * s


def test_time_embedding_matches_the_published_wrapper_in_float64():
    t_model = build_openuni().transformer
    diffusers_patch.patch(t_model, "openuni")
    with torch.no_grad():
        for p in t_model.time_embed_2.parameters():  # trained-looking: biases too
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    t_model.double()
    t = torch.tensor([1.0, 0.7, 0.4, 0.999, 0.3], dtype=torch.float64)
    tt = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.0], dtype=torch.float64)  # tt = 0 and tt = t included
    diffusers_patch.set_target_time(t_model, tt)
    with torch.no_grad():
        mod, emb = t_model.time_embed(1000 * t, batch_size=5, hidden_dtype=torch.float64)
    ref_mod, ref_emb = _published_time_embed(t_model, t, tt)
    torch.testing.assert_close(mod, ref_mod, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(emb, ref_emb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["aux", "lora"])
def test_signed_fake_times_reach_the_network(mode):
    from twinflow.diffusers_patch import backbone
    from twinflow.training.models import TwinFlowModel

    pipe = build_openuni()
    diffusers_patch.patch(pipe.transformer, "openuni", mode=mode)
    family = backbone("openuni")
    net = TwinFlowModel(pipe.transformer, family).eval()
    with torch.no_grad():
        emb = family.encode_text(pipe, ["a cat", "a dog"], torch.device("cpu"))
        cond = [emb[k] for k in family.text_keys]
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        tau = torch.tensor([0.6, 0.3])
        pos = net(x, t=tau, tt=tau, c=cond)
        neg = net(x, t=-tau, tt=-tau, c=cond)
        one_step = net(x, t=tau, tt=torch.zeros(2), c=cond)
    assert (pos - neg).abs().amax() > 1e-3
    assert (pos - one_step).abs().amax() > 1e-3


# ----------------------------------------------------------------------------- CLI

def test_generate_cli(tmp_path):
    from twinflow.cli import main

    rc = main(["generate", "--model", "openuni", "--model-path", str(saved_openuni("aux")), "--prompt", "a cat",
               "--steps", "2", "--height", str(TEST_SIZE), "--width", str(TEST_SIZE), "--device", "cpu",
               "--output-dir", str(tmp_path)])
    assert rc == 0
    record = json.loads((tmp_path / "000-00.json").read_text())
    assert record["model"] == "openuni" and record["scheduler"]["class"] == "TwinFlowPresetScheduler"
    from PIL import Image

    assert Image.open(tmp_path / "000-00.png").size == (TEST_SIZE, TEST_SIZE)


def test_language_model_from_an_internvl_chat_folder(tmp_path):
    """InternVL3's own folder layout: config.json with llm_config, weights language_model.model.*
    beside the vision tower's and the LM head's (those are not used)."""
    from safetensors.torch import save_file

    from twinflow.openuni_pipeline import load_language_model

    lm = build_openuni().text_encoder
    weights = {"language_model.model." + k: v.contiguous() for k, v in lm.state_dict().items()}
    weights["vision_model.embeddings.patch_embedding.weight"] = torch.zeros(2, 2)
    weights["language_model.lm_head.weight"] = torch.zeros(320, 16)
    save_file(weights, str(tmp_path / "model.safetensors"))
    llm_config = {**lm.config.to_dict(), "architectures": ["Qwen2ForCausalLM"], "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"],
                                                      "llm_config": llm_config, "vision_config": {}}))
    loaded = load_language_model(tmp_path)
    a, b = lm.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    del weights["language_model.model.norm.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    expect_error(ValueError, lambda: load_language_model(tmp_path), contains=("missing", "norm.weight"))


def test_damaged_openuni_folder(tmp_path):
    import shutil

    folder = tmp_path / "openuni"
    shutil.copytree(saved_openuni("stock"), folder)
    shutil.rmtree(folder / "meta_queries")
    expect_error(FileNotFoundError, lambda: twinflow.load_pipeline(folder, model="openuni"),
                 contains="meta_queries")
    shutil.copytree(saved_openuni("stock") / "meta_queries", folder / "meta_queries")
    (folder / "connector" / "diffusion_pytorch_model.safetensors").unlink()
    expect_error(ValueError, lambda: twinflow.load_pipeline(folder, model="openuni"),
                 contains=("could not load it as a OpenUniPipeline", "connector"))
