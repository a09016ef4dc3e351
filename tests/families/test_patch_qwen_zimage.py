"""diffusers_patch.qwen_image / diffusers_patch.z_image: TwinFlow's target-time embedding on
stock diffusers transformers (docs/algorithm.md §4).

What is checked (CPU, tiny random-weight transformers, a few seconds in all):

* invariance: without a target time, and with tt = t, the patched transformer gives the stock
  output (batch of 2, several timesteps);
* with tt ≠ t the output changes, and only through the aux embedder (zeroing its last layer
  gives the stock output back); the time embedding follows the docs/algorithm.md §4 formula exactly;
* the state dict gains exactly the published aux keys, starting as a copy of the main
  embedder; save_pretrained → stock from_pretrained + patch + aux keys from the safetensors
  file reproduces the outputs;
* the tt tensor is read at call time (in-place updates, as the scheduler does, take effect);
* LoRA mode: the stock model evaluated at the label t − tt/2, no extra keys;
* unpatch restores stock outputs and keys; patch is idempotent; wrong class → TypeError;
* wiring with ``twinflow.TwinFlowScheduler`` (``set_target_time(transformer, scheduler.tt)``),
  directly and through the stock ``QwenImagePipeline`` / ``ZImagePipeline`` (no text encoder,
  no VAE: prompt embeddings are passed in and ``output_type="latent"``).

Times in this file are TwinFlow times t (1 = noise, 0 = data). Qwen-Image is called with
timestep = t; Z-Image with t_z = 1 − t (what the stock pipelines pass).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import diffusers  # noqa: E402
import safetensors.torch as safetensors_torch  # noqa: E402

from diffusers import QwenImageTransformer2DModel, ZImageTransformer2DModel  # noqa: E402

from twinflow import diffusers_patch  # noqa: E402
from twinflow.diffusers_patch import qwen_image, z_image  # noqa: E402

B = 2


# ---------------------------------------------------------------------------- tiny models

def _qwen():
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    ).eval()


def _zimage():
    torch.manual_seed(0)
    return ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6],
        axes_lens=[64, 32, 32],
    ).eval()


class _Case:
    """A model family: the aux embedder at `aux_path` mirrors the main one at `main_path`; its
    parameters (the published aux keys) are those of the linear `layers` below it."""

    aux_path: str
    main_path: str
    layers: tuple[str, ...]

    @property
    def aux_keys(self):
        return {f"{self.aux_path}.{layer}.{p}" for layer in self.layers for p in ("weight", "bias")}

    @property
    def last_layer(self):
        return self.layers[-1]

    @classmethod
    def aux(cls, model):
        return model.get_submodule(cls.aux_path)

    @classmethod
    def main(cls, model):
        return model.get_submodule(cls.main_path)

    @classmethod
    def main_key(cls, aux_key):
        """The main embedder's state-dict key that an aux key starts as a copy of."""
        return cls.main_path + aux_key[len(cls.aux_path):]


class QwenCase(_Case):
    name = "qwen-image"
    mod = qwen_image
    build = staticmethod(_qwen)
    aux_path, main_path = "time_text_embed_2", "time_text_embed"
    layers = ("timestep_embedder.linear_1", "timestep_embedder.linear_2")

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.hs = torch.randn(B, 16, 16, generator=g)
        self.ehs = torch.randn(B, 7, 16, generator=g)
        self.mask = torch.ones(B, 7, dtype=torch.long)
        self.mask[1, 5:] = 0

    def run(self, model, t):
        t = torch.as_tensor(t, dtype=torch.float32).expand(B)
        with torch.no_grad():
            return model(hidden_states=self.hs, encoder_hidden_states=self.ehs,
                         encoder_hidden_states_mask=self.mask, timestep=t,
                         img_shapes=[(1, 4, 4)] * B).sample


class ZCase(_Case):
    name = "z-image"
    mod = z_image
    build = staticmethod(_zimage)
    aux_path, main_path = "t_embedder_2", "t_embedder"
    layers = ("mlp.0", "mlp.2")

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.x = [torch.randn(4, 1, 8, 8, generator=g) for _ in range(B)]
        self.cap = [torch.randn(5, 16, generator=g), torch.randn(9, 16, generator=g)]

    def run(self, model, t):
        t_z = 1.0 - torch.as_tensor(t, dtype=torch.float32).expand(B)
        with torch.no_grad():
            return torch.stack(model(self.x, t_z, self.cap).sample)


CASES = [QwenCase, ZCase]
DYADIC = [1.0, 0.75, 0.5, 0.25]


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request):
    return request.param()


def _pair(case, mode="aux"):
    stock = case.build()
    patched = case.mod.patch(copy.deepcopy(stock), mode=mode)
    return stock, patched


def _perturb_aux(case, model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in case.aux(model).parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------- 1. invariance

def test_no_target_time_is_stock(case):
    stock, patched = _pair(case)
    _perturb_aux(case, patched)  # the aux weights must not matter when tt = t
    for t in DYADIC + [0.3, 0.9]:
        assert torch.equal(case.run(patched, t), case.run(stock, t)), t


def test_tt_equal_t_is_stock(case):
    stock, patched = _pair(case)
    _perturb_aux(case, patched)
    for t in DYADIC:  # exact arithmetic on both sides of the t ↔ t_z conversion
        diffusers_patch.set_target_time(patched, torch.full((B,), t))
        assert torch.equal(case.run(patched, t), case.run(stock, t)), t
    # t_z = 1 − t rounds in float32 (|tt_z − t_z| ≤ 6e-8): equal up to that rounding
    for t in (0.3, 0.9, 0.123):
        diffusers_patch.set_target_time(patched, torch.full((1,), t))
        torch.testing.assert_close(case.run(patched, t), case.run(stock, t), atol=2e-5, rtol=0)
    # per-sample t and tt
    t = torch.tensor([0.75, 0.25])
    diffusers_patch.set_target_time(patched, t.clone())
    assert torch.equal(case.run(patched, t), case.run(stock, t))


# ---------------------------------------------------------------------------- 2. aux term used

def test_tt_changes_output_only_through_aux(case):
    stock, patched = _pair(case)
    tt = torch.tensor([0.25, 0.0])
    diffusers_patch.set_target_time(patched, tt)
    out = case.run(patched, 0.75)
    assert not torch.allclose(out, case.run(stock, 0.75), atol=1e-4)
    _perturb_aux(case, patched)
    out2 = case.run(patched, 0.75)
    assert not torch.allclose(out2, out, atol=1e-4)
    last = case.aux(patched).get_submodule(case.last_layer)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    assert torch.equal(case.run(patched, 0.75), case.run(stock, 0.75))


def test_qwen_time_embedding_formula():
    stock, patched = _pair(QwenCase())
    _perturb_aux(QwenCase, patched)
    t = torch.tensor([0.8, 0.4])
    tt = torch.tensor([0.3, 0.1])
    hs = torch.randn(B, 5, 48)
    diffusers_patch.set_target_time(patched, tt)
    with torch.no_grad():
        got = patched.time_text_embed(t, hs, None)
        aux = patched.time_text_embed_2.timestep_embedder(patched.time_text_embed_2.time_proj(tt))
        want = stock.time_text_embed(t, hs, None) + aux * (t - tt)[:, None]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_zimage_time_embedding_formula():
    stock, patched = _pair(ZCase())
    _perturb_aux(ZCase, patched)
    t = torch.tensor([0.8, 0.4], dtype=torch.float64)
    # signed tt: tt_z = torch.sign(tt)(1 − |tt|) as published, so tt = 0 → tt_z = 0
    tt = torch.tensor([0.0, -0.1], dtype=torch.float64)
    t_z, tt_z = 1 - t, torch.tensor([0.0, -0.9], dtype=torch.float64)
    diffusers_patch.set_target_time(patched, tt)
    with torch.no_grad():
        got = patched.t_embedder((t_z * 1000).float())
        want = (stock.t_embedder((t_z * 1000).float()).double()
                + patched.t_embedder_2(1000 * (tt_z - t_z)).double() * (t_z - tt_z).abs()[:, None])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=1e-6)


def test_bfloat16(case):
    stock, patched = _pair(case)
    stock.to(torch.bfloat16)
    patched.to(torch.bfloat16)
    if case.name == "qwen-image":
        case.hs, case.ehs = case.hs.bfloat16(), case.ehs.bfloat16()
    else:
        case.x, case.cap = [x.bfloat16() for x in case.x], [c.bfloat16() for c in case.cap]
    for t in (0.75, 0.5):
        diffusers_patch.set_target_time(patched, torch.tensor([t]))
        out = case.run(patched, t)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, case.run(stock, t))
    diffusers_patch.set_target_time(patched, torch.tensor([0.0]))
    assert not torch.equal(case.run(patched, 0.5), case.run(stock, 0.5))


def test_qwen_zero_cond_t_reference_half_untouched():
    """Edit models embed cat([t, 0]): the reference half keeps tt = t = 0 (no aux term)."""
    torch.manual_seed(0)
    stock = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
        num_attention_heads=3, joint_attention_dim=16, axes_dims_rope=(8, 4, 4), zero_cond_t=True).eval()
    patched = qwen_image.patch(copy.deepcopy(stock))
    _perturb_aux(QwenCase, patched)
    hs = torch.randn(B, 5, 48)
    t = torch.tensor([0.8, 0.6])
    timestep = torch.cat([t, t * 0])
    diffusers_patch.set_target_time(patched, torch.tensor([0.2]))
    with torch.no_grad():
        got = patched.time_text_embed(timestep, hs, None)
        want = stock.time_text_embed(timestep, hs, None)
        aux = patched.time_text_embed_2(torch.full((B,), 0.2), hs) * (t - 0.2)[:, None]
    torch.testing.assert_close(got[:B], want[:B] + aux, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[B:], want[B:])
    # the whole model runs (image + one reference image per sample)
    x = torch.randn(B, 16 + 4, 16)
    ehs = torch.randn(B, 7, 16)
    shapes = [[(1, 4, 4), (1, 2, 2)]] * B
    with torch.no_grad():
        out = patched(hidden_states=x, encoder_hidden_states=ehs, timestep=t, img_shapes=shapes).sample
        diffusers_patch.set_target_time(patched, t.clone())
        same = patched(hidden_states=x, encoder_hidden_states=ehs, timestep=t, img_shapes=shapes).sample
        ref = stock(hidden_states=x, encoder_hidden_states=ehs, timestep=t, img_shapes=shapes).sample
    assert torch.equal(same, ref) and not torch.allclose(out, ref, atol=1e-4)


# ---------------------------------------------------------------------------- 3. state dict

def test_state_dict_keys_and_init(case):
    stock, patched = _pair(case)
    s, p = stock.state_dict(), patched.state_dict()
    assert set(p) - set(s) == case.aux_keys
    assert set(s) <= set(p)
    for k in s:
        assert torch.equal(p[k], s[k]), k
    assert case.mod.AUX_PREFIX == case.aux_path + "."
    for k in case.aux_keys:
        assert torch.equal(p[k], s[case.main_key(k)]), k
    # a copy, not shared storage
    aux_w = case.aux(patched).get_submodule(case.last_layer).weight
    main_w = case.main(patched).get_submodule(case.last_layer).weight
    assert aux_w.data_ptr() != main_w.data_ptr()


def test_save_and_reload(case, tmp_path):
    _, patched = _pair(case)
    _perturb_aux(case, patched)
    tt = torch.tensor([0.1])
    diffusers_patch.set_target_time(patched, tt)
    want = case.run(patched, 0.6)
    patched.save_pretrained(tmp_path)
    files = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(files) == 1
    saved = safetensors_torch.load_file(str(tmp_path / files[0]))
    assert {k for k in saved if k.startswith(case.mod.AUX_PREFIX)} == case.aux_keys

    cls = type(patched)
    fresh = cls.from_pretrained(tmp_path).eval()  # stock class: the aux keys are unexpected here
    assert not any(k.startswith(case.mod.AUX_PREFIX) for k in fresh.state_dict())
    case.mod.patch(fresh)
    missing, unexpected = fresh.load_state_dict(
        {k: v for k, v in saved.items() if k.startswith(case.mod.AUX_PREFIX)}, strict=False)
    assert not unexpected and not set(missing) & case.aux_keys
    diffusers_patch.set_target_time(fresh, tt)
    assert torch.equal(case.run(fresh, 0.6), want)


# ---------------------------------------------------------------------------- 4. read at call time

def test_tt_read_at_call_time(case):
    _, patched = _pair(case)
    ref = case.mod.patch(copy.deepcopy(patched))
    tt = torch.zeros(1)
    diffusers_patch.set_target_time(patched, tt)
    out0 = case.run(patched, 0.75)
    tt.fill_(0.5)
    out1 = case.run(patched, 0.75)
    assert not torch.allclose(out0, out1, atol=1e-4)
    diffusers_patch.set_target_time(ref, torch.tensor([0.5]))
    assert torch.equal(out1, case.run(ref, 0.75))
    tt.fill_(0.75)  # tt = t again: stock output
    diffusers_patch.set_target_time(ref, None)
    assert torch.equal(case.run(patched, 0.75), case.run(ref, 0.75))


# ---------------------------------------------------------------------------- 5. LoRA mode

def test_lora_mode_label(case):
    stock, patched = _pair(case, mode="lora")
    assert set(patched.state_dict()) == set(stock.state_dict())
    assert not hasattr(patched, case.mod.AUX_PREFIX[:-1])
    for t, tt in [(1.0, 0.0), (0.75, 0.5), (0.5, 0.25), (0.625, 0.125)]:
        diffusers_patch.set_target_time(patched, torch.tensor([tt]))
        torch.testing.assert_close(case.run(patched, t), case.run(stock, t - tt / 2), atol=1e-6, rtol=0)
    # per-sample tt
    diffusers_patch.set_target_time(patched, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(case.run(patched, 0.75), case.run(stock, torch.tensor([0.5, 0.75])),
                               atol=1e-6, rtol=0)
    # no target time: tt = t, so the label is t/2 (docs/algorithm.md §4: the LoRA label is always t − tt/2)
    diffusers_patch.set_target_time(patched, None)
    torch.testing.assert_close(case.run(patched, 0.75), case.run(stock, 0.375), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- 6. unpatch etc.

def test_unpatch_idempotent_and_errors(case):
    stock, patched = _pair(case)
    assert diffusers_patch.is_patched(patched)
    keys = list(patched.state_dict())
    assert case.mod.patch(patched) is patched  # idempotent
    assert list(patched.state_dict()) == keys
    diffusers_patch.set_target_time(patched, torch.tensor([0.2]))
    out = case.run(patched, 0.6)
    case.mod.patch(patched)
    assert torch.equal(case.run(patched, 0.6), out)
    with pytest.raises(ValueError):
        case.mod.patch(patched, mode="lora")  # other mode: unpatch first
    with pytest.raises(ValueError):
        case.mod.patch(case.build(), mode="bogus")

    assert case.mod.unpatch(patched) is patched
    assert not diffusers_patch.is_patched(patched)
    assert list(patched.state_dict()) == list(stock.state_dict())
    hooked = patched.time_text_embed if case.name == "qwen-image" else patched.t_embedder
    assert "forward" not in hooked.__dict__
    for t in (0.9, 0.4):
        assert torch.equal(case.run(patched, t), case.run(stock, t))
    with pytest.raises(ValueError):
        diffusers_patch.set_target_time(patched, torch.zeros(1))
    case.mod.unpatch(patched)  # no-op on a stock model

    # LoRA → unpatch → aux works again
    case.mod.patch(patched, mode="lora")
    case.mod.unpatch(patched)
    assert torch.equal(case.run(patched, 0.4), case.run(stock, 0.4))

    # the generic entry point
    assert diffusers_patch.patch(patched, case.name) is patched
    assert diffusers_patch.is_patched(patched)


def test_wrong_class():
    q, z = _qwen(), _zimage()
    with pytest.raises(TypeError):
        qwen_image.patch(z)
    with pytest.raises(TypeError):
        z_image.patch(q)
    with pytest.raises(TypeError):
        qwen_image.unpatch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError):
        diffusers_patch.patch(torch.nn.Linear(2, 2), "z-image")


def test_deepcopy_of_patched_model(case):
    _, patched = _pair(case)
    _perturb_aux(case, patched)
    diffusers_patch.set_target_time(patched, torch.tensor([0.2]))
    clone = copy.deepcopy(patched)
    with torch.no_grad():  # the clone's hook must use the clone's aux weights
        for p in case.aux(patched).parameters():
            p.zero_()
    out = case.run(clone, 0.7)
    diffusers_patch.set_target_time(clone, None)
    assert not torch.allclose(out, case.run(clone, 0.7), atol=1e-4)


# ---------------------------------------------------------------------------- 7. scheduler wiring

twinflow = pytest.importorskip("twinflow")


def _z(tt: float) -> float:
    """Z-Image's tt_z of a TwinFlow tt ≥ 0, published: torch.sign(tt)(1 − tt), so tt = 0 → 0."""
    return 0.0 if tt == 0 else 1.0 - tt


def _record_aux_inputs(case, model):
    seen = []
    case.aux(model).register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen


def test_scheduler_wiring(case):
    stock, patched = _pair(case)
    sched = twinflow.TwinFlowScheduler(sampling_style="any")
    diffusers_patch.set_target_time(patched, sched.tt)
    sched.set_timesteps(3)
    seen = _record_aux_inputs(case, patched)
    ref = case.mod.patch(copy.deepcopy(stock))
    x = torch.randn(case.run(stock, 1.0).shape, generator=torch.Generator().manual_seed(5))
    for k, ts in enumerate(sched.timesteps):
        t = float(ts) / 1000
        tt_now = float(sched.tt)
        assert tt_now < t
        out = case.run(patched, t)
        diffusers_patch.set_target_time(ref, torch.tensor([tt_now]))
        assert torch.equal(out, case.run(ref, t))
        assert not torch.allclose(out, case.run(stock, t), atol=1e-4)
        if case.name == "qwen-image":
            torch.testing.assert_close(seen[-1], torch.full((B,), tt_now))
        else:  # emb₂ gets t_scale·(tt_z − t_z)
            torch.testing.assert_close(seen[-1], torch.full((B,), 1000 * (_z(tt_now) - (1 - t)), dtype=torch.float64),
                                       atol=1e-3, rtol=0)
        x = sched.step(out, ts, x).prev_sample
    assert len(seen) == 3


# ---------------------------------------------------------------------------- pipelines

def _pipeline_run(case, transformer, sched, steps=2):
    from diffusers import QwenImagePipeline, ZImagePipeline

    g = torch.Generator().manual_seed(0)
    if case.name == "qwen-image":
        pipe = QwenImagePipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None,
                                 transformer=transformer)
        pe = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(7))
        return pipe(prompt_embeds=pe, prompt_embeds_mask=torch.ones(1, 6, dtype=torch.long),
                    height=64, width=64, num_inference_steps=steps, output_type="latent",
                    generator=g).images
    pipe = ZImagePipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None,
                          transformer=transformer)
    pe = [torch.randn(6, 16, generator=torch.Generator().manual_seed(7))]
    return pipe(prompt_embeds=pe, height=128, width=128, num_inference_steps=steps,
                guidance_scale=0.0, output_type="latent", generator=g).images


def test_stock_pipeline_end_to_end(case):
    stock, patched = _pair(case)
    sched = twinflow.TwinFlowScheduler(sampling_style="any")
    diffusers_patch.set_target_time(patched, sched.tt)
    calls = []  # (t the pipeline passed, scheduler tt at that time)
    patched.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(
            (kwargs["timestep"] if "timestep" in kwargs else args[1], float(sched.tt))),
        with_kwargs=True)
    seen = _record_aux_inputs(case, patched)
    out = _pipeline_run(case, patched, sched)
    assert torch.isfinite(out).all()
    assert len(calls) == len(seen) == 2
    for (t_in, tt), aux_in in zip(calls, seen):
        t = t_in if case.name == "qwen-image" else 1 - t_in  # back to t units
        if case.name == "qwen-image":
            torch.testing.assert_close(aux_in, torch.full_like(aux_in, tt))
        else:
            torch.testing.assert_close(aux_in, (1000 * (_z(tt) - (1 - t.double()))), atol=1e-3, rtol=0)
    assert [c[1] for c in calls] == pytest.approx([0.5, 0.0])
    # the same run on the stock transformer differs (tt ≠ t at every call)
    out_stock = _pipeline_run(case, stock, twinflow.TwinFlowScheduler(sampling_style="any"))
    assert not torch.allclose(out, out_stock, atol=1e-4)
