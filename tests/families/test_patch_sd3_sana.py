"""diffusers_patch.sd3 and diffusers_patch.sana: TwinFlow's target-time embedding (docs/algorithm.md §4) on
stock SD3Transformer2DModel and SanaTransformer2DModel.

What is checked (CPU, tiny random-weight transformers, seconds):

1. invariant: without a target time, and with tt = t, the patched output equals the stock one;
2. with tt ≠ t the output changes, by exactly the docs/algorithm.md §4 aux term (checked on the time
   embedding against the stock embedder), and the aux weights are used;
3. state_dict: exactly the aux keys are added, initialised as published: Linear weights from
   N(0, 0.02), zero biases;
   save_pretrained → stock class + patch + the saved safetensors reproduces the outputs;
4. set_target_time follows a 1-element tensor modified in place (as TwinFlowScheduler does);
5. LoRA mode equals the stock model at the label t − tt/2;
6. unpatch restores stock outputs and keys; patch is idempotent; wrong class → TypeError;
   deepcopy of a patched model is wired to the copy;
7. a stock StableDiffusion3Pipeline with TwinFlowScheduler: tt = 0 at both calls of the
   2-NFE preset, and with sampling_style="mul" (tt = t) the patched pipeline equals the stock one.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch


from diffusers import SanaTransformer2DModel, SD3Transformer2DModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tiny_pipelines import perturb  # noqa: E402
from twinflow import diffusers_patch  # noqa: E402
from twinflow.diffusers_patch import sana, sd3  # noqa: E402
from twinflow.diffusers_patch._common import is_patched, patched_mode  # noqa: E402
from checks import expect_error  # noqa: E402

TINY_SD3 = dict(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                pooled_projection_dim=64, out_channels=4)
TINY_SANA = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                 num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                 caption_channels=32, sample_size=8, patch_size=1)


class Case:
    """A tiny transformer of one backbone, its inputs and its time scale S (timestep = S·t)."""

    def __init__(self, name):
        self.name = name
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        if name == "sd3":
            self.mod, self.cls, self.scale = sd3, SD3Transformer2DModel, 1000.0
            self.model = SD3Transformer2DModel(**TINY_SD3).eval()
            self.x = torch.randn(2, 4, 16, 16, generator=g)
            self.ctx = torch.randn(2, 7, 32, generator=g)
            self.pooled = torch.randn(2, 64, generator=g)
        else:
            ts = 2.0 if name == "sana-ts2" else 1.0
            self.mod, self.cls, self.scale = sana, SanaTransformer2DModel, 1000.0 * ts
            self.model = SanaTransformer2DModel(**TINY_SANA, timestep_scale=ts).eval()
            self.x = torch.randn(2, 4, 8, 8, generator=g)
            self.ctx = torch.randn(2, 5, 32, generator=g)
        self.main = self.model.time_text_embed if name == "sd3" else self.model.time_embed

    def timestep(self, t):
        """The timestep a pipeline passes for t (t units), shape [2]."""
        return (torch.as_tensor(t, dtype=torch.float32) * self.scale).expand(2).contiguous()

    @torch.no_grad()
    def out(self, model, timestep):
        if self.name == "sd3":
            return model(hidden_states=self.x, encoder_hidden_states=self.ctx, pooled_projections=self.pooled,
                         timestep=timestep).sample
        return model(self.x, self.ctx, timestep).sample

    @torch.no_grad()
    def embed(self, emb, timestep):
        """The time embedding as the transformer calls it (SD3: temb; Sana: (modulation, embedded))."""
        if self.name == "sd3":
            return emb(timestep, self.pooled)
        return emb(timestep, batch_size=2, hidden_dtype=torch.float32)

    def aux(self, model):
        return getattr(model, self.mod.AUX_PREFIX[:-1])


CASES = ["sd3", "sana", "sana-ts2"]
TIMES = [(0.9, 0.9), (0.6, 0.25), (0.05, 0.5), (1.0, 0.0)]  # per-row t of the batch of 2


@pytest.fixture(params=CASES)
def case(request):
    return Case(request.param)


def _t2(t):
    return torch.tensor(t, dtype=torch.float32)


def _as_tuple(e):
    return e if isinstance(e, tuple) else (e,)


# ----------------------------------------------------------------------------- 1. invariant

def test_invariant_tt_none_and_tt_equal_t(case):
    stock = copy.deepcopy(case.model)
    case.mod.patch(case.model, mode="aux")
    perturb(case.aux(case.model))  # a trained-looking aux embedder must still vanish at tt = t
    for t in TIMES:
        ts = case.timestep(_t2(t))
        ref = case.out(stock, ts)
        diffusers_patch.set_target_time(case.model, None)
        assert torch.equal(case.out(case.model, ts), ref), f"tt=None, t={t}"
        diffusers_patch.set_target_time(case.model, ts / case.scale)  # tt = t exactly, per row
        assert torch.equal(case.out(case.model, ts), ref), f"tt=t, t={t}"
    # a 1-element tt equal to a shared t
    ts = case.timestep(0.7)
    diffusers_patch.set_target_time(case.model, ts[:1] / case.scale)
    assert torch.equal(case.out(case.model, ts), case.out(stock, ts))


# ----------------------------------------------------------------------------- 2. aux term

def test_aux_term_matches_spec_and_uses_aux_weights(case):
    stock_emb = copy.deepcopy(case.main)
    case.mod.patch(case.model)
    t, tt = _t2((0.8, 0.6)), _t2((0.3, 0.0))
    ts = case.timestep(t)
    diffusers_patch.set_target_time(case.model, tt)
    # docs/algorithm.md §4 with emb₂ fed in the embedder's own units (S·tt)
    got = _as_tuple(case.embed(case.main, ts))
    base, aux = _as_tuple(case.embed(stock_emb, ts)), _as_tuple(case.embed(case.aux(case.model), tt * case.scale))
    assert len(got) == (1 if case.name == "sd3" else 2)  # Sana: modulation and embedded timestep
    for g_, b_, a_ in zip(got, base, aux):
        torch.testing.assert_close(g_, b_ + a_ * (t - tt)[:, None], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(g_, b_)
    stock = case.cls(**case.model.config).eval()
    stock.load_state_dict({k: v for k, v in case.model.state_dict().items()
                           if not k.startswith(case.mod.AUX_PREFIX)})
    o_stock, o1 = case.out(stock, ts), case.out(case.model, ts)
    assert not torch.allclose(o1, o_stock, atol=1e-5), "tt ≠ t must change the output"
    perturb(case.aux(case.model))
    o2 = case.out(case.model, ts)
    assert not torch.allclose(o2, o1, atol=1e-5), "the aux weights must be used"
    diffusers_patch.set_target_time(case.model, ts / case.scale)
    assert torch.equal(case.out(case.model, ts), o_stock)


# ----------------------------------------------------------------------------- 3. keys, save / load

def test_state_dict_keys_and_save_load(case, tmp_path):
    stock_sd = {k: v.clone() for k, v in case.model.state_dict().items()}
    main_sd = case.main.state_dict()
    n_stock, n_main = case.model.num_parameters(), sum(p.numel() for p in case.main.parameters())
    case.mod.patch(case.model)
    sd = case.model.state_dict()
    aux_keys = {case.mod.AUX_PREFIX + k for k in main_sd}
    assert set(sd) - set(stock_sd) == aux_keys and set(stock_sd) <= set(sd)
    for k, v in stock_sd.items():
        assert torch.equal(sd[k], v), k
    for k, v in main_sd.items():  # published init: N(0, 0.02) Linear weights, zero biases
        a = sd[case.mod.AUX_PREFIX + k]
        assert a.shape == v.shape and a.data_ptr() != v.data_ptr(), k
        if k.endswith("bias"):
            assert not a.any(), f"aux {k} must start at zero"
        else:
            assert abs(float(a.mean())) < 0.01 and abs(float(a.std()) - 0.02) < 0.004, f"aux {k}: not N(0, 0.02)"
    assert case.model.num_parameters() == n_stock + n_main

    perturb(case.aux(case.model))
    tt = torch.tensor([0.2])
    diffusers_patch.set_target_time(case.model, tt)
    ts = case.timestep(_t2((0.9, 0.5)))
    ref = case.out(case.model, ts)
    case.model.save_pretrained(tmp_path)
    saved = load_file(os.path.join(tmp_path, "diffusion_pytorch_model.safetensors"))
    assert set(saved) == set(sd)

    fresh = case.cls.from_config(case.model.config).eval()  # stock class, other random weights
    fresh.load_state_dict({k: v for k, v in saved.items() if not k.startswith(case.mod.AUX_PREFIX)})
    case.mod.patch(fresh)
    fresh.load_state_dict(saved, strict=True)  # exactly the saved keys, aux included
    diffusers_patch.set_target_time(fresh, tt)
    assert torch.equal(case.out(fresh, ts), ref)


# ----------------------------------------------------------------------------- 4. tt updated in place

def test_target_time_tensor_updated_in_place(case):
    stock = copy.deepcopy(case.model)
    case.mod.patch(case.model)
    ts = case.timestep(0.75)
    tt = torch.zeros(1)
    diffusers_patch.set_target_time(case.model, tt)
    o0 = case.out(case.model, ts)
    tt.fill_(0.4)  # what the scheduler does between calls
    o1 = case.out(case.model, ts)
    assert not torch.allclose(o0, o1, atol=1e-5)
    diffusers_patch.set_target_time(case.model, torch.tensor([0.4]))
    assert torch.equal(case.out(case.model, ts), o1)
    diffusers_patch.set_target_time(case.model, tt)
    tt.copy_(ts[:1] / case.scale)
    assert torch.equal(case.out(case.model, ts), case.out(stock, ts))
    expect_error(TypeError, lambda: diffusers_patch.set_target_time(case.model, 0.4))


def test_target_time_follows_a_scheduler_that_replaces_its_tt(case):
    """Wired to the scheduler object, the transformer reads scheduler.tt at each call, so it
    follows set_timesteps(device=...), which gives the scheduler a new tt tensor."""
    from twinflow import TwinFlowScheduler

    stock = copy.deepcopy(case.model)
    case.mod.patch(case.model)
    s = TwinFlowScheduler(sampling_style="mul")
    diffusers_patch.set_target_time(case.model, s)
    ts = case.timestep(0.5)
    s.set_timesteps(2, device="meta")
    s.tt = torch.full((1,), 0.5)  # what a move back to a real device does: a new tensor
    assert torch.equal(case.out(case.model, ts), case.out(stock, ts))  # tt = t = 0.5
    s.tt = torch.full((1,), 0.2)
    assert not torch.allclose(case.out(case.model, ts), case.out(stock, ts), atol=1e-5)


# ----------------------------------------------------------------------------- 5. LoRA mode

def test_lora_mode_label(case):
    stock = copy.deepcopy(case.model)
    keys = set(case.model.state_dict())
    diffusers_patch.patch(case.model, "sd3" if case.name == "sd3" else "sana", mode="lora")
    assert patched_mode(case.model) == "lora"
    assert set(case.model.state_dict()) == keys, "LoRA mode has no second embedder"
    t, tt = _t2((0.9, 0.4)), _t2((0.5, 0.0))
    ts = case.timestep(t)
    diffusers_patch.set_target_time(case.model, tt)
    torch.testing.assert_close(case.out(case.model, ts), case.out(stock, (t - tt / 2) * case.scale),
                               rtol=0, atol=1e-6)
    diffusers_patch.set_target_time(case.model, None)  # tt = t
    torch.testing.assert_close(case.out(case.model, ts), case.out(stock, (t / 2) * case.scale), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- 6. unpatch, idempotence, errors

def test_unpatch_idempotent_and_errors(case):
    stock = copy.deepcopy(case.model)
    keys = set(case.model.state_dict())
    ts = case.timestep(_t2((0.6, 0.3)))
    ref = case.out(stock, ts)
    assert case.mod.patch(case.model) is case.model
    aux = case.aux(case.model)
    n = len(case.model.state_dict())
    assert case.mod.patch(case.model) is case.model and case.aux(case.model) is aux
    assert len(case.model.state_dict()) == n
    expect_error(ValueError, lambda: case.mod.patch(case.model, mode="lora"), contains="unpatch")
    expect_error(ValueError, lambda: case.mod.patch(case.model, mode="nope"))
    diffusers_patch.set_target_time(case.model, torch.tensor([0.1]))
    assert not torch.equal(case.out(case.model, ts), ref)

    assert case.mod.unpatch(case.model) is case.model
    assert not is_patched(case.model)
    assert set(case.model.state_dict()) == keys and not hasattr(case.model, case.mod.AUX_PREFIX[:-1])
    assert "forward" not in vars(case.main)
    assert torch.equal(case.out(case.model, ts), ref)
    expect_error(ValueError, lambda: diffusers_patch.set_target_time(case.model, torch.tensor([0.1])))
    case.mod.unpatch(case.model)  # no-op

    case.mod.patch(case.model, mode="lora")  # another mode after unpatch
    assert not torch.equal(case.out(case.model, ts), ref)
    case.mod.unpatch(case.model)
    assert torch.equal(case.out(case.model, ts), ref)

    other = sana if case.mod is sd3 else sd3
    expect_error(TypeError, lambda: other.patch(case.model))
    expect_error(TypeError, lambda: case.mod.patch(torch.nn.Linear(2, 2)))
    expect_error(TypeError, lambda: case.mod.unpatch(torch.nn.Linear(2, 2)))


def test_deepcopy_is_wired_to_the_copy(case):
    case.mod.patch(case.model)
    tt = torch.tensor([0.3])
    diffusers_patch.set_target_time(case.model, tt)
    ts = case.timestep(0.8)
    o = case.out(case.model, ts)
    twin = copy.deepcopy(case.model)
    assert torch.equal(case.out(twin, ts), o)
    perturb(case.aux(twin))
    diffusers_patch.set_target_time(twin, torch.tensor([0.1]))
    assert torch.equal(case.out(case.model, ts), o), "the original must not see the copy's aux or tt"
    assert not torch.allclose(case.out(twin, ts), o, atol=1e-5)


def test_sana_guidance_embeds_rejected():
    m = SanaTransformer2DModel(**TINY_SANA, guidance_embeds=True)
    expect_error(ValueError, lambda: sana.patch(m), contains="guidance_embeds")
    assert not is_patched(m)


# ----------------------------------------------------------------------------- 7. SD3 pipeline + TwinFlowScheduler

TINY_VAE = dict(block_out_channels=(4,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=1, sample_size=32,
                use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


@pytest.fixture(scope="module")
def sd3_pipe_parts():
    pytest.importorskip("transformers")
    twinflow = pytest.importorskip("twinflow")
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(**TINY_SD3).eval()
    vae = AutoencoderKL(**TINY_VAE).eval()
    g = torch.Generator().manual_seed(123)
    emb = dict(prompt_embeds=torch.randn(1, 7, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 64, generator=g))
    return twinflow.TwinFlowScheduler, tr, vae, emb


def _run(parts, transformer, scheduler, steps):
    from diffusers import StableDiffusion3Pipeline

    _, _, vae, emb = parts
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe(**emb, height=32, width=32, guidance_scale=1.0, num_inference_steps=steps, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def test_sd3_pipeline_few_style_sees_tt_zero(sd3_pipe_parts):
    Sched, tr, _, _ = sd3_pipe_parts
    tr = copy.deepcopy(tr)
    sd3.patch(tr)
    scheduler = Sched.preset("2-nfe")
    diffusers_patch.set_target_time(tr, scheduler.tt)
    seen = []  # (t, tt) in t units at every transformer call, tt as the aux embedder receives it
    h1 = tr.register_forward_pre_hook(lambda m, a, kw: seen.append([kw["timestep"].clone() / 1000]),
                                      with_kwargs=True)
    h2 = tr.time_text_embed_2.register_forward_pre_hook(lambda m, a: seen[-1].append(a[0].clone() / 1000))
    try:
        img = _run(sd3_pipe_parts, tr, scheduler, 2)
    finally:
        h1.remove()
        h2.remove()
    assert torch.isfinite(img).all()
    assert len(seen) == 2, "2-NFE preset: two transformer calls"
    for t, tt in seen:
        assert torch.equal(tt, torch.zeros_like(tt)), f"few style: tt must be 0, got {tt}"
        assert (t > 0).all()


@pytest.mark.parametrize("steps,kw", [(2, {}), (3, dict(sampling_order=2))])
def test_sd3_pipeline_mul_style_equals_stock(sd3_pipe_parts, steps, kw):
    Sched, tr, _, _ = sd3_pipe_parts
    stock_img = _run(sd3_pipe_parts, tr, Sched.preset("2-nfe", sampling_style="mul", **kw), steps)
    patched = sd3.patch(copy.deepcopy(tr))
    perturb(patched.time_text_embed_2)
    scheduler = Sched.preset("2-nfe", sampling_style="mul", **kw)
    diffusers_patch.set_target_time(patched, scheduler.tt)
    tts = []
    h = patched.time_text_embed_2.register_forward_pre_hook(lambda m, a: tts.append(a[0].clone()))
    try:
        img = _run(sd3_pipe_parts, patched, scheduler, steps)
    finally:
        h.remove()
    assert tts and all((x > 0).all() for x in tts), "mul style: tt = t, not 0"
    # tt = t up to float32 rounding of timestep/1000 against the scheduler's tt
    torch.testing.assert_close(img, stock_img, rtol=0, atol=1e-5)


def test_torch_compile_fullgraph_follows_tt(case):
    """No graph break, and tt modified in place is read at run time (no recompile, no baked value)."""
    case.mod.patch(case.model)
    tt = torch.tensor([0.3])
    diffusers_patch.set_target_time(case.model, tt)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(case.model, backend=backend, fullgraph=True)
    ts = case.timestep(0.8)
    assert torch.equal(case.out(compiled, ts), case.out(case.model, ts))
    tt.fill_(0.5)
    assert torch.equal(case.out(compiled, ts), case.out(case.model, ts))
    assert len(graphs) == 1
    torch._dynamo.reset()
