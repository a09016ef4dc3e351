"""``twinflow train`` for OpenUni on the tiny random-weight model (tests/tiny_openuni.py), CPU:

* the four published configs (configs/openuni_*.yaml) carry docs/algorithm.md §3.7's OpenUni rows;
* 2-step runs through the real command: full fine-tuning on images + captions (text through
  LM + meta-queries + connector + projector), LoRA with the published target modules, and
  image-free training on a prompts-only .txt file; each exported pipeline loads with
  ``twinflow.load_pipeline(..., model="openuni")`` and generates;
* the model call the trainer gives the loss is the network OpenUniPipeline runs;
* image-free training does not read x (the loss is the same for any x), and a prompts-only
  dataset without ``use_image_free`` is refused.
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch


from checks import expect_error  # noqa: E402
from test_train_e2e import WEIGHTS, _config, _images_parquet, _metrics, _train  # noqa: E402
from tiny_openuni import build_openuni, saved_openuni  # noqa: E402
from tiny_pipelines import TEST_SIZE, one_thread  # noqa: E402,F401

from twinflow import diffusers_patch  # noqa: E402
import twinflow  # noqa: E402
from twinflow.training.config import load_config  # noqa: E402

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
# docs/algorithm.md §3.7 OpenUni rows: enr, emd, N, lora, use_image_free
ROWS = {"openuni_full": (0.8, 0.999, 2, False, False), "openuni_full_imgfree": (4.0, 1.0, 2, False, True),
        "openuni_lora_1order": (0.8, 0.0, 1, True, False), "openuni_lora_2order": (0.8, 0.99, 2, True, False)}
FAST = ["training.max_steps=2", "training.checkpoint_every=2", "training.sample_every=2"]


@pytest.mark.parametrize("name", sorted(ROWS))
def test_published_settings(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    enr, emd, order, lora, imgfree = ROWS[name]
    tf, t = cfg.twinflow, cfg.training
    assert cfg.model.name == "openuni" and cfg.lora.enabled is lora
    assert (tf.enhanced_ratio, tf.ema_decay_rate, tf.estimate_order, bool(tf.use_image_free)) == (enr, emd, order,
                                                                                                 imgfree)
    assert (tf.consistc_ratio, tf.dist_match_cof, tf.enhanced_range, tf.loss, tf.barron_alpha) == (
        1.0, 0.75, (0.0, 1.0), "barron", 1.0)
    assert (t.lr, t.adam_betas, t.weight_decay, t.grad_clip, t.batch_size, t.mixed_precision) == (
        1e-4, (0.9, 0.95), 0.0, 1.0, 16, "bf16")
    if lora:
        assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.init) == (64, 64.0, "gaussian")
        assert {"attn1.to_q", "attn2.to_k", "time_embed.linear"} <= set(cfg.lora.target_modules)
    text = (CONFIGS / f"{name}.yaml").read_text()
    assert f"src/configs/openuni_task/{name}.yaml" in text  # the source is named


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train-openuni")
    folder = saved_openuni("stock")
    prompts = tmp / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n\n" for i in range(8)))
    return {"tmp": tmp, "cfg": _config(tmp, "openuni", folder), "data": _images_parquet(tmp / "data.parquet"),
            "prompts": prompts, "folder": folder}


def _check_export(out: pathlib.Path, mode: str):
    pipe = twinflow.load_pipeline(out / "pipeline", model="openuni", mode=mode)
    with torch.no_grad():
        img = pipe("a cat", num_inference_steps=2, height=TEST_SIZE, width=TEST_SIZE, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 3, TEST_SIZE, TEST_SIZE) and torch.isfinite(img).all()
    return pipe


def test_full_training(env):
    out = env["tmp"] / "full"
    assert _train(env["cfg"], env["data"], out, *FAST) == 0
    assert len(_metrics(out)) == 2 and all(m["loss"] == m["loss"] for m in _metrics(out))
    from safetensors.torch import load_file

    w = load_file(str(out / "checkpoints" / "step-000002" / "transformer" / WEIGHTS))
    assert any(k.startswith(diffusers_patch.openuni.AUX_PREFIX) for k in w)
    assert (out / "samples" / "step-000002.png").is_file()
    pipe = _check_export(out, "aux")
    state = pipe.transformer.state_dict()
    assert all(torch.equal(state[k], v) for k, v in w.items())  # the trained aux weights are loaded


def test_lora_training_with_the_published_targets(env):
    targets = load_config(CONFIGS / "openuni_lora_1order.yaml").lora.target_modules
    out = env["tmp"] / "lora"
    sets = ["lora.enabled=true", f"lora.target_modules=[{', '.join(targets)}]", "lora.rank=4", "lora.alpha=4",
            "twinflow.ema_decay_rate=0.0", "twinflow.estimate_order=1"]
    assert _train(env["cfg"], env["data"], out, *FAST, *sets) == 0
    adapter = json.loads((out / "checkpoints" / "step-000002" / "lora" / "adapter_config.json").read_text())
    assert "time_embed.linear" in adapter["target_modules"]
    pipe = _check_export(out, "lora")
    assert not any(k.startswith("time_embed_2.") for k in pipe.transformer.state_dict())


def test_image_free_training_on_prompts_only(env, capsys):
    out = env["tmp"] / "imgfree"
    sets = ["twinflow.use_image_free=true", "twinflow.enhanced_ratio=4.0", "twinflow.ema_decay_rate=1.0"]
    assert _train(env["cfg"], env["prompts"], out, *FAST, *sets) == 0
    assert len(_metrics(out)) == 2
    _check_export(out, "aux")
    import pyarrow as pa
    import pyarrow.parquet as pq

    captions = env["tmp"] / "captions.parquet"  # a parquet with only the caption column works too
    pq.write_table(pa.Table.from_pylist([{"text": f"p {i}"} for i in range(8)]), captions)
    assert _train(env["cfg"], captions, env["tmp"] / "imgfree-parquet", *FAST, *sets) == 0
    capsys.readouterr()
    assert _train(env["cfg"], env["prompts"], env["tmp"] / "refused", *FAST) != 0
    err = capsys.readouterr().err
    assert "prompts only" in err and "use_image_free: true" in err


def test_image_free_loss_does_not_read_x():
    from twinflow import TwinFlowLoss
    from twinflow.diffusers_patch import backbone
    from twinflow.training.models import TwinFlowModel

    pipe = build_openuni()
    diffusers_patch.patch(pipe.transformer, "openuni")
    family = backbone("openuni")
    net = TwinFlowModel(pipe.transformer, family)
    with torch.no_grad():
        emb = family.encode_text(pipe, [f"p {i}" for i in range(4)], torch.device("cpu"))
        null = family.encode_text(pipe, list(family.null_texts), torch.device("cpu"))
    cond = [emb[k] for k in family.text_keys]
    uncond = [null[k].expand(4, *null[k].shape[1:]) for k in family.text_keys]
    losses = {}
    for use_image_free in (True, False):
        for name, x in (("zeros", torch.zeros(4, 4, 4, 4)), ("noise", torch.randn(4, 4, 4, 4))):
            fn = TwinFlowLoss("twinflow", use_image_free=use_image_free, enhanced_ratio=4.0, ema_decay_rate=1.0)
            with torch.no_grad():
                losses[use_image_free, name] = fn(net, x, cond=cond, uncond=uncond,
                                                  generator=torch.Generator().manual_seed(5)).item()
    assert losses[True, "zeros"] == losses[True, "noise"]
    assert losses[False, "zeros"] != losses[False, "noise"]  # the check can fail


def test_model_call_matches_the_pipeline():
    """UnifiedSampler through TwinFlowModel on the trainer's text embeddings = OpenUniPipeline
    with the patched transformer and a TwinFlowScheduler of the same settings (tt = 0 ≠ t)."""
    from twinflow import TwinFlowScheduler, UnifiedSampler
    from twinflow.diffusers_patch import backbone
    from twinflow.training.models import TwinFlowModel

    settings = dict(stochast_ratio=0.0, rfba_gap_steps=(0.001, 0.6), sampling_style="few")
    pipe = build_openuni()
    diffusers_patch.patch(pipe.transformer, "openuni")
    with torch.no_grad():
        for p in pipe.transformer.time_embed_2.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    pipe.scheduler = TwinFlowScheduler(**settings)
    diffusers_patch.set_target_time(pipe.transformer, pipe.scheduler)
    noise = torch.randn(1, 4, TEST_SIZE // 2, TEST_SIZE // 2, generator=torch.Generator().manual_seed(0))
    family = backbone("openuni")
    with torch.no_grad():
        stock = pipe("a tiny picture", num_inference_steps=2, height=TEST_SIZE, width=TEST_SIZE, latents=noise,
                     output_type="latent").images
        emb = family.encode_text(pipe, ["a tiny picture"], torch.device("cpu"))
        ours = UnifiedSampler(sampling_steps=2, **settings).sample(
            TwinFlowModel(pipe.transformer, family), noise, cond=[emb[k] for k in family.text_keys])
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-5)


def test_prompts_file_errors(tmp_path):
    from twinflow.training.config import DataConfig
    from twinflow.training.data import open_dataset

    (tmp_path / "empty.txt").write_text("\n  \n")
    expect_error(ValueError, lambda: open_dataset(tmp_path / "empty.txt", DataConfig()), contains="no prompts")
    (tmp_path / "p.txt").write_text("a\n\n b \n")
    ds = open_dataset(tmp_path / "p.txt", DataConfig())
    assert len(ds) == 2 and ds[1] == {"text": "b"}
