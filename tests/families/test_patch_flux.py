"""diffusers_patch.flux: TwinFlow's target-time embedding on the stock FluxTransformer2DModel
(FLUX.1-dev's guidance-distilled layout and schnell's), docs/algorithm.md §4 and the module doc.

1. invariant: without a target time, and with tt = t, the patched output equals the stock one;
2. aux mode: temb = time_text_embed(1000·t, [1000·g,] pooled) + emb₂(1000·tt)·(t − tt), against
   a float64 evaluation of the same formula from the stock embedder and the aux weights;
3. the state dict gains exactly the timestep path's keys (copy-initialised);
4. LoRA mode equals the stock model at the label t − tt/2;
5. unpatch restores stock outputs and keys.
The pipeline paths (load_pipeline, generate, training, offloading) run on FLUX through the
backbone-parametrised suites (tiny_pipelines.BACKBONES lists it).
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import FluxTransformer2DModel

from tiny_pipelines import one_thread, perturb  # noqa: F401 (autouse fixture)
from twinflow import diffusers_patch
from twinflow.diffusers_patch import flux

TINY = dict(patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))
TIMES = [(0.9, 0.9), (0.6, 0.25), (0.05, 0.5), (1.0, 0.0)]


class Case:
    def __init__(self, guidance: bool):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        self.guidance = guidance
        self.model = FluxTransformer2DModel(**TINY, guidance_embeds=guidance).eval()
        self.x = torch.randn(2, 16, 16, generator=g)  # 4×4 tokens of 16 channels
        self.ctx = torch.randn(2, 5, 32, generator=g)
        self.pooled = torch.randn(2, 32, generator=g)
        ids = torch.zeros(4, 4, 3)
        ids[..., 1] += torch.arange(4)[:, None]
        ids[..., 2] += torch.arange(4)[None, :]
        self.img_ids, self.txt_ids = ids.reshape(-1, 3), torch.zeros(5, 3)
        self.g = torch.full((2,), 3.5) if guidance else None

    @torch.no_grad()
    def out(self, model, t):
        return model(hidden_states=self.x, encoder_hidden_states=self.ctx, pooled_projections=self.pooled,
                     timestep=torch.as_tensor(t, dtype=torch.float32), guidance=self.g, img_ids=self.img_ids,
                     txt_ids=self.txt_ids, return_dict=False)[0]

    @torch.no_grad()
    def embed(self, emb, t, dtype=torch.float32):
        """The embedder as the transformer calls it (its inputs ×1000)."""
        ts = (torch.as_tensor(t, dtype=dtype) * 1000)
        if self.guidance:
            return emb(ts, (self.g * 1000).to(dtype), self.pooled.to(dtype))
        return emb(ts, self.pooled.to(dtype))


@pytest.fixture(params=[True, False], ids=["dev", "schnell"])
def case(request):
    return Case(request.param)


def test_invariant_tt_none_and_tt_equal_t(case):
    stock = copy.deepcopy(case.model)
    flux.patch(case.model, mode="aux")
    perturb(case.model.time_text_embed_2)
    for t in TIMES:
        ref = case.out(stock, t)
        diffusers_patch.set_target_time(case.model, None)
        assert torch.equal(case.out(case.model, t), ref), t
        diffusers_patch.set_target_time(case.model, torch.tensor(t))
        assert torch.equal(case.out(case.model, t), ref), t


def test_aux_term_matches_a_float64_evaluation(case):
    stock_emb = copy.deepcopy(case.model.time_text_embed)
    flux.patch(case.model)
    perturb(case.model.time_text_embed_2)
    t, tt = torch.tensor([0.8, 0.6]), torch.tensor([0.3, 0.0])
    diffusers_patch.set_target_time(case.model, tt)
    got = case.embed(case.model.time_text_embed, t)
    aux64 = copy.deepcopy(case.model.time_text_embed_2).double()
    want = (case.embed(stock_emb.double(), t.double(), torch.float64)
            + aux64(tt.double() * 1000, torch.float64) * (t - tt).double()[:, None])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, case.embed(stock_emb.float(), t))
    assert not torch.allclose(case.out(case.model, t), case.out(_stock_of(case.model), t), atol=1e-5)


def _stock_of(model):
    stock = FluxTransformer2DModel(**model.config).eval()
    stock.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(flux.AUX_PREFIX)})
    return stock


def test_state_dict_gains_the_timestep_path_copy(case):
    before = set(case.model.state_dict())
    flux.patch(case.model)
    sd = case.model.state_dict()
    added = set(sd) - before
    assert added == {f"time_text_embed_2.timestep_embedder.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
    for k in added:  # copy-initialised from the main timestep path
        assert torch.equal(sd[k], sd[k.replace("time_text_embed_2.", "time_text_embed.")])


def test_lora_mode_is_the_stock_model_at_t_minus_tt_over_2(case):
    stock = copy.deepcopy(case.model)
    flux.patch(case.model, mode="lora")
    assert set(case.model.state_dict()) == set(stock.state_dict())
    t, tt = torch.tensor([0.8, 0.6]), torch.tensor([0.3, 0.0])
    diffusers_patch.set_target_time(case.model, tt)
    torch.testing.assert_close(case.out(case.model, t), case.out(stock, t - tt / 2), rtol=1e-6, atol=1e-6)


def test_unpatch_restores_the_stock_model(case):
    stock = copy.deepcopy(case.model)
    flux.patch(case.model)
    diffusers_patch.set_target_time(case.model, torch.tensor([0.1, 0.2]))
    flux.unpatch(case.model)
    assert set(case.model.state_dict()) == set(stock.state_dict())
    assert torch.equal(case.out(case.model, [0.7, 0.4]), case.out(stock, [0.7, 0.4]))
