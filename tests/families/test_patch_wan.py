"""diffusers_patch.wan: TwinFlow's target-time embedding on the stock WanTransformer3DModel
(docs/algorithm.md §4 and the module doc), on the tiny transformer of ``twinflow.tiny``.

1. invariant: without a target time, and with tt = t, the patched output equals the stock one,
   with one timestep per row and with per-token timesteps (Wan 2.2 TI2V's ``expand_timesteps``);
2. aux mode: temb = time_embedder(proj(1000·t)) + emb₂(1000·tt)·(t − tt) and timestep_proj =
   time_proj(SiLU(temb)), against a float64 evaluation from the stock embedder and the aux weights;
3. per-token timesteps (all equal in a row, as WanPipeline passes them) give the per-row output,
   so the training call's one timestep per row is the TI2V model too;
4. the state dict gains exactly the copied timestep path's keys; LoRA mode is the stock model at
   t − tt/2; unpatch restores stock outputs and keys;
5. image-to-video transformers and a target time that fits no timestep shape are refused.
Pipelines, generation, training and data: tests/families/test_video.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import WanTransformer3DModel

from checks import expect_error
from tiny_pipelines import one_thread, perturb  # noqa: F401 (autouse fixture)
from twinflow import diffusers_patch
from twinflow.diffusers_patch import wan
from twinflow.tiny import build_transformer

T = torch.tensor([0.8, 0.6])
TT = torch.tensor([0.3, 0.0])
TOKENS = 2 * 2 * 2  # latent frames × (h/2) × (w/2) of X


class Case:
    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.model = build_transformer("wan")
        self.x = torch.randn(2, 16, 2, 4, 4, generator=g)
        self.ctx = torch.randn(2, 5, 32, generator=g)

    @torch.no_grad()
    def out(self, model, t, per_token=False):
        ts = torch.as_tensor(t, dtype=torch.float32) * 1000
        if per_token:  # WanPipeline with expand_timesteps: [B, L], one value per row
            ts = ts[:, None].expand(-1, TOKENS)
        return model(hidden_states=self.x, timestep=ts, encoder_hidden_states=self.ctx, return_dict=False)[0]


@pytest.fixture
def case():
    return Case()


@pytest.mark.parametrize("per_token", [False, True], ids=["per-row", "per-token"])
def test_invariant_tt_none_and_tt_equal_t(case, per_token):
    stock = copy.deepcopy(case.model)
    wan.patch(case.model, mode="aux")
    perturb(case.model.condition_embedder_2)
    for t in ([0.9, 0.9], [0.6, 0.25], [1.0, 0.0], [-0.4, 0.7]):
        ref = case.out(stock, t, per_token)
        diffusers_patch.set_target_time(case.model, None)
        assert torch.equal(case.out(case.model, t, per_token), ref), t
        diffusers_patch.set_target_time(case.model, torch.tensor(t))
        assert torch.equal(case.out(case.model, t, per_token), ref), t


def _float64_embedding(stock_embed, aux, t, tt):
    """(temb, timestep_proj) of the aux formula in float64, from copies of the stock embedder
    and of the aux weights (the sinusoids from the stock Timesteps, in float64)."""
    e, a = copy.deepcopy(stock_embed).double(), copy.deepcopy(aux).double()
    t, tt = t.double(), tt.double()
    temb = e.time_embedder(e.timesteps_proj(t * 1000).double())
    temb = temb + a.timestep_embedder(a.time_proj(tt * 1000).double()) * (t - tt)[:, None]
    return temb, e.time_proj(torch.nn.functional.silu(temb))


@pytest.mark.parametrize("per_token", [False, True], ids=["per-row", "per-token"])
def test_aux_embedding_matches_a_float64_evaluation(case, per_token):
    stock_embed = copy.deepcopy(case.model.condition_embedder)
    wan.patch(case.model)
    perturb(case.model.condition_embedder_2)
    diffusers_patch.set_target_time(case.model, TT)
    ts, seq = (T * 1000, None) if not per_token else ((T * 1000).repeat_interleave(3), 3)
    with torch.no_grad():
        temb, proj, text, _ = case.model.condition_embedder(ts, case.ctx, None, timestep_seq_len=seq)
    want_temb, want_proj = _float64_embedding(stock_embed, case.model.condition_embedder_2, T, TT)
    if per_token:  # every token of a row carries the row's embedding
        want_temb, want_proj = (w[:, None].expand(-1, 3, -1) for w in (want_temb, want_proj))
    torch.testing.assert_close(temb.double(), want_temb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(proj.double(), want_proj, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        stock_temb = stock_embed(ts, case.ctx, None, timestep_seq_len=seq)
    assert torch.equal(text, stock_temb[2])  # the text projection is untouched
    assert not torch.allclose(temb, stock_temb[0], atol=1e-4)


def test_per_token_timesteps_equal_one_timestep_per_row(case):
    wan.patch(case.model)
    perturb(case.model.condition_embedder_2)
    diffusers_patch.set_target_time(case.model, TT)
    torch.testing.assert_close(case.out(case.model, T, per_token=True), case.out(case.model, T), rtol=1e-5, atol=1e-5)
    diffusers_patch.set_target_time(case.model, torch.tensor(0.0))  # a scheduler's one tt for the batch
    torch.testing.assert_close(case.out(case.model, T, per_token=True), case.out(case.model, T), rtol=1e-5, atol=1e-5)


def test_state_dict_gains_the_timestep_path_copy(case):
    before = set(case.model.state_dict())
    wan.patch(case.model)
    sd = case.model.state_dict()
    added = set(sd) - before
    assert added == {f"condition_embedder_2.timestep_embedder.linear_{i}.{w}" for i in (1, 2)
                     for w in ("weight", "bias")}
    assert wan.AUX_PREFIX == "condition_embedder_2."
    for k in added:  # copy-initialised from the main timestep path
        assert torch.equal(sd[k], sd[k.replace("condition_embedder_2.timestep_embedder.",
                                               "condition_embedder.time_embedder.")])


@pytest.mark.parametrize("per_token", [False, True], ids=["per-row", "per-token"])
def test_lora_mode_is_the_stock_model_at_t_minus_tt_over_2(case, per_token):
    stock = copy.deepcopy(case.model)
    wan.patch(case.model, mode="lora")
    assert set(case.model.state_dict()) == set(stock.state_dict())
    diffusers_patch.set_target_time(case.model, TT)
    torch.testing.assert_close(case.out(case.model, T, per_token), case.out(stock, T - TT / 2, per_token),
                               rtol=1e-5, atol=1e-6)


def test_unpatch_restores_the_stock_model(case):
    stock = copy.deepcopy(case.model)
    wan.patch(case.model)
    diffusers_patch.set_target_time(case.model, torch.tensor([0.1, 0.2]))
    wan.unpatch(case.model)
    assert set(case.model.state_dict()) == set(stock.state_dict())
    assert torch.equal(case.out(case.model, [0.7, 0.4]), case.out(stock, [0.7, 0.4]))


def test_refusals(case):
    i2v = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=1, image_dim=8)
    expect_error(ValueError, lambda: wan.patch(i2v), contains=("image-to-video", "WanPipeline"))
    expect_error(TypeError, lambda: wan.patch(torch.nn.Linear(2, 2)), contains=("WanTransformer3DModel", "Linear"))
    wan.patch(case.model)
    diffusers_patch.set_target_time(case.model, torch.tensor([0.1, 0.2, 0.3]))  # 3 rows for a batch of 2
    expect_error(ValueError, lambda: case.out(case.model, T), contains=("target time", "[3]", "[2]"))
