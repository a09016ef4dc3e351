"""diffusers_patch.chroma: TwinFlow's target-time embedding on the stock ChromaTransformer2DModel
(docs/algorithm.md §4 and the module doc).

1. invariant: without a target time, and with tt = t, the patched output equals the stock one
   (float32, and bfloat16 with times that bfloat16 rounds);
2. aux mode: pooled_temb = A(P(1000·t)) + A₂(P(1000·tt))·(t − tt), P the weightless projection
   (time, guidance 0, modulation index), A / A₂ the approximator and its copy, against a float64
   transcription written from that definition (signed times included);
3. the state dict gains exactly the approximator's keys under ``distilled_guidance_layer_2.``,
   copy-initialised;
4. LoRA mode equals the stock model at the label t − tt/2 (no keys added);
5. unpatch restores stock outputs, keys and forwards; the approximator hook refuses a call
   without the time it needs.
The pipeline paths (load_pipeline, generate, training, offloading) run on Chroma through the
backbone-parametrised suites (tiny_pipelines.BACKBONES lists it).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tiny_pipelines import build_transformer, one_thread, perturb  # noqa: F401 (autouse fixture)
from twinflow import diffusers_patch
from twinflow.diffusers_patch import chroma

F64 = torch.float64
# (t, tt): the one-step jump, few-step rows, tt = 0, and a fake (signed) row
T = torch.tensor([1.0, 0.6, 0.05, -0.6])
TT = torch.tensor([0.0, 0.25, 0.5, -0.2])


class Case:
    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.model = build_transformer("chroma")
        self.x = torch.randn(4, 16, 16, generator=g)  # 4×4 tokens of 16 channels
        self.ctx = torch.randn(4, 5, 32, generator=g)
        ids = torch.zeros(4, 4, 3)
        ids[..., 1] += torch.arange(4)[:, None]
        ids[..., 2] += torch.arange(4)[None, :]
        self.img_ids, self.txt_ids = ids.reshape(-1, 3), torch.zeros(5, 3)

    @torch.no_grad()
    def out(self, model, t):
        dtype = next(model.parameters()).dtype
        return model(hidden_states=self.x.to(dtype), encoder_hidden_states=self.ctx.to(dtype),
                     timestep=torch.as_tensor(t, dtype=torch.float32), img_ids=self.img_ids, txt_ids=self.txt_ids,
                     return_dict=False)[0]

    @torch.no_grad()
    def pooled_temb(self, model, t):
        """The time embedding as ChromaTransformer2DModel.forward computes it (both hooks, in order)."""
        ts = t.to(next(model.parameters()).dtype) * 1000
        return model.distilled_guidance_layer(model.time_text_embed(ts))


@pytest.fixture
def case():
    return Case()


# ----------------------------------------------------------------------------- float64 transcription

def sinusoid(x, dim):
    """[cos, sin] of x·10000^(−k/(dim/2)), k < dim/2 (diffusers' Timesteps, flip_sin_to_cos, shift 0)."""
    half = dim // 2
    a = x.to(F64)[:, None] * torch.exp(-math.log(10000.0) * torch.arange(half, dtype=F64) / half)[None]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)


def projection(model, x):
    """[B, M, 4n]: sinusoids of x (n), of guidance 0 (n) and of each modulation index m (2n),
    n = channels/4. The index part is the model's constant buffer: its arguments reach 1000·M
    radians, where float32 and float64 sinusoids differ by ~1e-3."""
    n = model.config.approximator_num_channels // 4
    m = 3 * model.config.num_single_layers + 12 * model.config.num_layers + 2
    time = torch.cat([sinusoid(x, n), sinusoid(torch.zeros_like(x), n)], dim=-1)
    index = model.time_text_embed.mod_proj.to(F64)
    assert index.shape == (m, 2 * n)
    return torch.cat([time[:, None].expand(-1, m, -1), index[None].expand(len(x), -1, -1)], dim=-1)


def approximator(a, x):
    """in_proj; per layer x + linear_2(silu(linear_1(rms_norm(x)))); out_proj."""
    def lin(layer, v):
        return v @ layer.weight.detach().to(F64).T + layer.bias.detach().to(F64)

    x = lin(a.in_proj, x)
    for layer, norm in zip(a.layers, a.norms):
        eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight.detach().to(F64)
        x = x + lin(layer.linear_2, torch.nn.functional.silu(lin(layer.linear_1, h)))
    return lin(a.out_proj, x)


# ----------------------------------------------------------------------------- tests

def test_invariant_tt_none_and_tt_equal_t(case):
    stock = copy.deepcopy(case.model)
    chroma.patch(case.model)
    perturb(case.model.distilled_guidance_layer_2)
    ref = case.out(stock, T)
    diffusers_patch.set_target_time(case.model, None)
    assert torch.equal(case.out(case.model, T), ref)
    diffusers_patch.set_target_time(case.model, T.clone())
    assert torch.equal(case.out(case.model, T), ref)


def test_invariant_in_bfloat16_with_rounded_times(case):
    """The factor is taken from the values the transformer embeds (tt cast and scaled as it does
    t), so tt = t stays exactly stock where bfloat16 rounds 1000·t."""
    t = torch.tensor([0.3, 0.7, 0.123, -0.41])
    stock = copy.deepcopy(case.model).to(torch.bfloat16)
    chroma.patch(case.model)
    perturb(case.model.distilled_guidance_layer_2)
    case.model.to(torch.bfloat16)
    diffusers_patch.set_target_time(case.model, t.clone())
    assert torch.equal(case.out(case.model, t), case.out(stock, t))


def test_aux_term_matches_a_float64_transcription(case):
    chroma.patch(case.model)
    perturb(case.model.distilled_guidance_layer_2)
    diffusers_patch.set_target_time(case.model, TT)
    got = case.pooled_temb(case.model, T)
    m = case.model
    aux = (approximator(m.distilled_guidance_layer_2, projection(m, 1000 * TT.double()))
           * (T.double() - TT.double())[:, None, None])
    want = approximator(m.distilled_guidance_layer, projection(m, 1000 * T.double())) + aux
    # float32 sinusoids of 1000·t (up to 1000 rad) round at ~1e-5; the aux term is O(1)
    assert aux.abs().amax() > 0.3
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    stock = copy.deepcopy(m)
    chroma.unpatch(stock)
    assert not torch.allclose(case.out(m, T), case.out(stock, T), atol=1e-4)  # the term reaches the output


def test_state_dict_gains_the_approximator_copy(case):
    before = set(case.model.state_dict())
    chroma.patch(case.model)
    sd = case.model.state_dict()
    added = set(sd) - before
    assert added == {chroma.AUX_PREFIX + k for k in case.model.distilled_guidance_layer.state_dict()}
    for k in added:  # copy-initialised
        assert torch.equal(sd[k], sd[k.replace("distilled_guidance_layer_2.", "distilled_guidance_layer.")]), k
    assert diffusers_patch.backbone("chroma").aux_init == "copy"


def test_lora_mode_is_the_stock_model_at_t_minus_tt_over_2(case):
    stock = copy.deepcopy(case.model)
    chroma.patch(case.model, mode="lora")
    assert set(case.model.state_dict()) == set(stock.state_dict())
    diffusers_patch.set_target_time(case.model, TT)
    torch.testing.assert_close(case.out(case.model, T), case.out(stock, T - TT / 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["aux", "lora"])
def test_unpatch_restores_the_stock_model(case, mode):
    stock = copy.deepcopy(case.model)
    chroma.patch(case.model, mode=mode)
    chroma.patch(case.model, mode=mode)  # idempotent
    with pytest.raises(ValueError, match="already patched"):
        chroma.patch(case.model, mode="lora" if mode == "aux" else "aux")
    diffusers_patch.set_target_time(case.model, TT)
    case.out(case.model, T)
    chroma.unpatch(case.model)
    assert set(case.model.state_dict()) == set(stock.state_dict())
    for name in ("time_text_embed", "distilled_guidance_layer"):
        assert "forward" not in vars(getattr(case.model, name)), name
    assert torch.equal(case.out(case.model, T), case.out(stock, T))


def test_the_approximator_hook_needs_the_time_from_its_projection(case):
    chroma.patch(case.model)
    vec = case.model.time_text_embed(T * 1000)
    case.model.distilled_guidance_layer(vec)  # consumes what time_text_embed handed over
    with pytest.raises(RuntimeError, match="without time_text_embed"):
        case.model.distilled_guidance_layer(vec)
    with pytest.raises(ValueError, match="mode"):
        chroma.patch(build_transformer("chroma"), mode="both")
    with pytest.raises(TypeError, match="ChromaTransformer2DModel"):
        chroma.patch(build_transformer("flux"))
