"""diffusers_patch.lumina2: TwinFlow's target-time embedding on the stock Lumina2Transformer2DModel
(docs/algorithm.md §4 and the module doc).

1. the time convention, read off the stock Lumina2Pipeline: it feeds the transformer 1 − σ
   (reversed) and TwinFlow times map to t_L = copysign(1 − |t|, t): t = 0 → 1 (the data end),
   signs kept (fake times t < 0 → t_L < 0, −0 too);
2. invariant: without a target time, and with tt = t, the patched output equals the stock one;
3. aux mode: temb = emb(t_L) + emb₂(tt_L)·(t − tt) against a float64 transcription (sinusoids and
   MLPs written out; signed and tt = 0 rows), the caption embedding untouched;
4. the state dict gains exactly the timestep path's keys, copy-initialised;
5. LoRA mode equals the stock model at the label t − tt/2 (mapped like t);
6. unpatch; the unconditional text is the pipeline's negative prompt (no system prompt).
The pipeline paths run on Lumina-2 through the backbone-parametrised suites.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tiny_pipelines import build, build_transformer, one_thread, perturb  # noqa: F401 (autouse fixture)
from twinflow import diffusers_patch
from twinflow.diffusers_patch import lumina2

F64 = torch.float64
# (t, tt): the one-step jump (tt = 0: the data end), few-step rows, and fake (signed) rows
T = torch.tensor([1.0, 0.6, -0.3, -0.75])
TT = torch.tensor([0.0, 0.25, -0.3, -0.5])


class Case:
    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.model = build_transformer("lumina2")
        self.x = torch.randn(4, 4, 8, 8, generator=g)
        self.ctx = torch.randn(4, 5, 8, generator=g)
        self.mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])

    @torch.no_grad()
    def out(self, model, t_l):
        return model(hidden_states=self.x, timestep=t_l, encoder_hidden_states=self.ctx,
                     encoder_attention_mask=self.mask, return_dict=False)[0]

    @torch.no_grad()
    def embed(self, model, t_l):
        return model.time_caption_embed(self.x, t_l, self.ctx)


@pytest.fixture
def case():
    return Case()


def lumina_time(t):
    """copysign(1 − |t|, t) in float64, value by value."""
    return torch.tensor([math.copysign(1.0 - abs(v), v) for v in t.tolist()], dtype=F64)


def timestep_mlp(e, x):
    """Timesteps(256, flip_sin_to_cos, shift 0, scale 1) then linear_1 → SiLU → linear_2."""
    half = 128
    a = x.to(F64)[:, None] * torch.exp(-math.log(10000.0) * torch.arange(half, dtype=F64) / half)[None]
    h = torch.cat([torch.cos(a), torch.sin(a)], dim=-1)
    for i, layer in enumerate((e.timestep_embedder.linear_1, e.timestep_embedder.linear_2)):
        h = h @ layer.weight.detach().to(F64).T + layer.bias.detach().to(F64)
        h = torch.nn.functional.silu(h) if i == 0 else h
    return h


def test_the_pipeline_feeds_one_minus_sigma_and_the_mapping_keeps_signs():
    pipe = build("lumina2")
    pipe.set_progress_bar_config(disable=True)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].clone()), with_kwargs=True)
    sigmas = [1.0, 0.625]
    with torch.no_grad():
        pipe(prompt="a cat", height=32, width=32, sigmas=sigmas, num_inference_steps=2, guidance_scale=1.0,
             output_type="latent")
    want = [lumina2.to_model_time(torch.tensor([s])) for s in pipe.scheduler.sigmas[:2].tolist()]
    assert [float(s) for s in pipe.scheduler.sigmas[:2]] == sigmas  # unshifted at this size
    assert [float(v) for v in torch.cat(seen)] == [float(w) for w in torch.cat(want)] == [0.0, 0.375]
    t = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.25, -0.25])
    t_l = lumina2.to_model_time(t)
    assert t_l.tolist() == [1.0, -1.0, 0.0, -0.0, 0.75, -0.75]
    assert torch.signbit(t_l).tolist() == torch.signbit(t).tolist()
    back = lumina2.from_model_time(t_l)
    assert torch.equal(back, t) and torch.signbit(back).tolist() == torch.signbit(t).tolist()


def test_invariant_tt_none_and_tt_equal_t(case):
    stock = copy.deepcopy(case.model)
    lumina2.patch(case.model)
    perturb(case.model.time_caption_embed_2)
    t = torch.tensor([0.3, 0.7, 0.123, -0.41])  # not dyadic: the read-back must still give tt = t
    ref = case.out(stock, lumina2.to_model_time(t))
    diffusers_patch.set_target_time(case.model, None)
    assert torch.equal(case.out(case.model, lumina2.to_model_time(t)), ref)
    diffusers_patch.set_target_time(case.model, t.clone())
    assert torch.equal(case.out(case.model, lumina2.to_model_time(t)), ref)


def test_aux_term_matches_a_float64_transcription(case):
    stock = copy.deepcopy(case.model)
    lumina2.patch(case.model)
    perturb(case.model.time_caption_embed_2)
    diffusers_patch.set_target_time(case.model, TT)
    temb, caption = case.embed(case.model, lumina2.to_model_time(T))
    m = case.model
    aux = timestep_mlp(m.time_caption_embed_2, lumina_time(TT)) * (T.double() - TT.double())[:, None]
    want = timestep_mlp(m.time_caption_embed, lumina_time(T)) + aux
    assert aux.abs().amax() > 0.3  # rows 0, 1 and 3 carry an O(1) aux term; row 2 (tt = t) none
    torch.testing.assert_close(temb.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(caption, case.embed(stock, lumina2.to_model_time(T))[1])
    assert not torch.allclose(case.out(m, lumina2.to_model_time(T)), case.out(stock, lumina2.to_model_time(T)),
                              atol=1e-4)


def test_state_dict_gains_the_timestep_path_copy(case):
    before = set(case.model.state_dict())
    lumina2.patch(case.model)
    sd = case.model.state_dict()
    added = set(sd) - before
    assert added == {f"time_caption_embed_2.timestep_embedder.linear_{i}.{w}" for i in (1, 2)
                     for w in ("weight", "bias")}
    for k in added:
        assert torch.equal(sd[k], sd[k.replace("time_caption_embed_2.", "time_caption_embed.")]), k


def test_lora_mode_is_the_stock_model_at_t_minus_tt_over_2(case):
    stock = copy.deepcopy(case.model)
    lumina2.patch(case.model, mode="lora")
    assert set(case.model.state_dict()) == set(stock.state_dict())
    diffusers_patch.set_target_time(case.model, TT)
    torch.testing.assert_close(case.out(case.model, lumina2.to_model_time(T)),
                               case.out(stock, lumina2.to_model_time(T - TT / 2)), rtol=1e-5, atol=1e-6)


def test_unpatch_restores_the_stock_model(case):
    stock = copy.deepcopy(case.model)
    lumina2.patch(case.model)
    diffusers_patch.set_target_time(case.model, TT)
    lumina2.unpatch(case.model)
    assert set(case.model.state_dict()) == set(stock.state_dict())
    t_l = lumina2.to_model_time(T)
    assert torch.equal(case.out(case.model, t_l), case.out(stock, t_l))


def test_the_unconditional_text_is_the_pipelines_negative_prompt():
    pipe = build("lumina2")
    bb = diffusers_patch.backbone("lumina2")
    null = bb.encode_text(pipe, list(bb.null_texts), torch.device("cpu"))
    _, _, neg, neg_mask = pipe.encode_prompt(["x"], do_classifier_free_guidance=True, negative_prompt=[""],
                                             device=torch.device("cpu"))
    assert torch.equal(null["prompt_embeds"], neg) and torch.equal(null["prompt_attention_mask"], neg_mask)
    empty = bb.encode_text(pipe, [""], torch.device("cpu"))  # a caption "": with the system prompt
    assert empty["prompt_attention_mask"].sum() > neg_mask.sum()
    with pytest.raises(ValueError, match="mixes None"):
        bb.encode_text(pipe, [None, "a cat"], torch.device("cpu"))
