"""Where twinflow meets diffusers' own idioms (issue 13, "silent wrong output"), on the tiny
random-weight pipelines of ``tiny_pipelines``:

* ``pipe.scheduler = TwinFlowScheduler.from_config(pipe.scheduler.config, ...)`` after
  ``load_pipeline``: the transformer follows the pipeline's scheduler at call time (latents
  equal a run built with that scheduler, exactly); a transformer wired to another scheduler
  makes ``step`` raise;
* ``save_pretrained`` writes a folder that records backbone, mode and format;
  ``load_pipeline(folder)`` infers them (contradicting arguments are errors) and gives the
  same latents; plain ``DiffusionPipeline.from_pretrained`` refuses it;
* a TwinFlow LoRA saved in diffusers' layout: ``load_pipeline(base, lora=...)`` and the stock
  ``pipe.load_lora_weights`` both give the trained model's latents exactly;
* ``time_grid="pipeline"`` inside StableDiffusion3Pipeline (no sigmas passed) runs the
  pipeline's own schedule;
* ``dtype=`` (``torch_dtype`` its alias), and no ``torch_dtype`` FutureWarning from our code.
"""

from __future__ import annotations

import gc
import json
import logging
import types
import warnings

import pytest
import torch


pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import diffusers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from twinflow import diffusers_patch  # noqa: E402
import tiny_pipelines  # noqa: E402
from checks import expect_error  # noqa: E402
from twinflow.diffusers_patch._common import target_time  # noqa: E402
from tiny_pipelines import one_thread  # noqa: E402,F401 (autouse fixture)
from twinflow import TwinFlowPresetScheduler, TwinFlowScheduler, load_pipeline  # noqa: E402
from twinflow.diffusers_patch import backbone  # noqa: E402

SIZE = tiny_pipelines.TEST_SIZE
TWO = ("sd3", "sana")  # two backbones with different time embedders (SD3: pooled text; Sana: AdaLN-single)


def load(folder, model=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stock layout has no aux weights: warned, tested elsewhere
        pipe = load_pipeline(folder, model, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe, model, steps=3, seed=0, **kw):
    extra = {backbone(model).cfg_kwarg: 1.0, **dict(backbone(model).exact_size)}
    if model == "sana":
        extra["complex_human_instruction"] = None
    with torch.no_grad():
        return pipe(prompt="a cat dancing", height=SIZE, width=SIZE, num_inference_steps=steps, output_type="latent",
                    generator=torch.Generator().manual_seed(seed), **extra, **kw).images


def seen_tt(pipe):
    """Records the tt the patched transformer uses at each call (t units)."""
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: seen.append(float(target_time(m, torch.zeros(1)))))
    return seen


# ----------------------------------------------------------------------------- scheduler swap

@pytest.mark.exact
@pytest.mark.parametrize("model", TWO)
def test_swapped_scheduler_equals_a_wired_run(model):
    folder = tiny_pipelines.saved_pipeline(model, "aux")
    settings = dict(sampling_style="mul", stochast_ratio=0.0)  # tt = t: differs from the preset's tt = 0
    pipe = load(folder, model)
    pipe.scheduler = TwinFlowScheduler.from_config(pipe.scheduler.config, **settings)
    swapped_tt = seen_tt(pipe)
    got = latents(pipe, model)
    wired = load(folder, model, scheduler=TwinFlowScheduler.from_config(TwinFlowPresetScheduler().config, **settings))
    wired_tt = seen_tt(wired)
    want = latents(wired, model)
    assert torch.equal(got, want)
    assert swapped_tt == wired_tt and len(set(swapped_tt)) == 3, "tt = t: three different target times"
    # back to the stock scheduler: tt = t, the stock model (aux term zero) with the stock sampler
    stock = diffusers.DiffusionPipeline.from_pretrained(folder)
    stock.set_progress_bar_config(disable=True)
    pipe.scheduler = stock.scheduler
    assert torch.equal(latents(pipe, model), latents(stock, model))


def test_step_refuses_a_transformer_wired_to_another_scheduler():
    pipe = load(tiny_pipelines.saved_pipeline("sd3", "aux"), "sd3")
    diffusers_patch.set_target_time(pipe.transformer, pipe.scheduler)  # wired to this scheduler object only
    pipe.scheduler = TwinFlowScheduler.from_config(pipe.scheduler.config, sampling_style="mul")
    expect_error(ValueError, lambda: latents(pipe, "sd3"), contains=("another TwinFlowScheduler", "set_target_time"))
    diffusers_patch.set_target_time(pipe.transformer, pipe)
    assert torch.isfinite(latents(pipe, "sd3")).all()


def test_a_transformer_outliving_its_pipeline_says_so():
    transformer = load(tiny_pipelines.saved_pipeline("sd3", "aux"), "sd3").transformer
    gc.collect()
    expect_error(ValueError, lambda: target_time(transformer, torch.ones(1)),
                 contains=("no longer exists", "set_target_time"))


# ----------------------------------------------------------------------------- saved pipelines

@pytest.mark.parametrize("model", TWO)
@pytest.mark.parametrize("mode", ("aux", "lora"))
def test_saved_pipeline_records_what_it_is(model, mode, tmp_path):
    pipe = load(tiny_pipelines.saved_pipeline(model, "aux" if mode == "aux" else "stock"), model, mode=mode)
    want = latents(pipe, model)
    pipe.save_pretrained(tmp_path)
    record = {"format": 1, "backbone": model, "mode": mode}
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_twinflow"] == record
    assert index["transformer"] == ["twinflow.saved_format", backbone(model).transformer_class_name]  # refuses plain loads
    assert json.loads((tmp_path / "transformer" / "config.json").read_text())["_twinflow"] == record
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the record says what to expect
        again = load_pipeline(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert diffusers_patch._common.patched_mode(again.transformer) == mode
    assert torch.equal(latents(again, model), want)
    # plain diffusers refuses it, naming the way to load it
    expect_error(ValueError, lambda: diffusers.DiffusionPipeline.from_pretrained(tmp_path),
                 contains="twinflow.load_pipeline")
    # explicit arguments must agree with the record
    other = "sd3" if model == "sana" else "sana"
    expect_error(ValueError, lambda: load_pipeline(tmp_path, other), contains=(other, model))
    expect_error(ValueError, lambda: load_pipeline(tmp_path, model, mode="lora" if mode == "aux" else "aux"),
                 contains=("mode", mode))
    assert torch.equal(latents(load(tmp_path, model, mode=mode), model), want)


def test_saved_record_must_be_consistent(tmp_path):
    pipe = load(tiny_pipelines.saved_pipeline("sd3", "aux"), "sd3")
    pipe.save_pretrained(tmp_path)
    weights = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    index_path, config_path = tmp_path / "model_index.json", tmp_path / "transformer" / "config.json"
    index, config = json.loads(index_path.read_text()), json.loads(config_path.read_text())
    # a newer format than this twinflow reads
    index_path.write_text(json.dumps({**index, "_twinflow": {**index["_twinflow"], "format": 99}}))
    expect_error(ValueError, lambda: load_pipeline(tmp_path), contains=("format 99", "upgrade"))
    # model_index.json and transformer/config.json disagree
    index_path.write_text(json.dumps({**index, "_twinflow": {**index["_twinflow"], "mode": "lora"}}))
    expect_error(ValueError, lambda: load_pipeline(tmp_path), contains=("model_index.json", "transformer/config.json"))
    index_path.write_text(json.dumps(index))
    # recorded aux, but the aux weights are gone (re-saved by the stock class): an error, not a warning
    state = load_file(str(weights))
    save_file({k: v for k, v in state.items() if not k.startswith("time_text_embed_2.")}, str(weights))
    expect_error(ValueError, lambda: load_pipeline(tmp_path), contains=("recorded", "aux"))
    save_file(state, str(weights))
    config_path.write_text(json.dumps(config))
    assert isinstance(load(tmp_path), diffusers.StableDiffusion3Pipeline)


def test_model_is_required_without_a_record():
    expect_error(ValueError, lambda: load_pipeline(tiny_pipelines.saved_pipeline("sd3", "aux")),
                 contains=("model", "required"))


# ----------------------------------------------------------------------------- LoRA

def _trained_lora(model, folder):
    """A LoRA-mode TwinFlow pipeline with a trained-looking adapter (as the trainer holds it)."""
    from twinflow.training.models import add_lora

    pipe = load(folder, model, mode="lora")
    lcfg = types.SimpleNamespace(rank=4, alpha=8, init="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    add_lora(pipe.transformer, lcfg, "online")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pipe.transformer.named_parameters():
            if ".lora_B." in n:  # gaussian init leaves B = 0 (no change yet)
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return pipe


@pytest.mark.parametrize("model", TWO)
def test_lora_export_loads_with_diffusers_and_twinflow(model, tmp_path):
    pytest.importorskip("peft")
    from twinflow import lora_files

    base = tiny_pipelines.saved_pipeline(model, "stock")
    trained = _trained_lora(model, base)
    want = latents(trained, model)
    lora_files.save(tmp_path / "lora", trained.transformer, "online", model)
    keys = load_file(str(tmp_path / "lora" / lora_files.WEIGHT_NAME)).keys()
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys), "diffusers' layout"
    # twinflow: model and mode from the LoRA's record
    logged = []
    catch = logging.Handler(logging.DEBUG)
    catch.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(catch)  # diffusers' loggers do not propagate to the root
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pipe = load_pipeline(base, lora=tmp_path / "lora")
    finally:
        logging.getLogger("diffusers").removeHandler(catch)
    assert not [m for m in logged if "No LoRA keys" in m], "diffusers' text-encoder notices are not shown"
    pipe.set_progress_bar_config(disable=True)
    assert torch.equal(latents(pipe, model), want)
    # diffusers' own loader onto the LoRA-mode base: the weights do change the output, to the trained one
    plain = load(base, model, mode="lora")
    before = latents(plain, model)
    plain.load_lora_weights(str(tmp_path / "lora"))
    after = latents(plain, model)
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.equal(after, want)
    # the wrong way is an error
    expect_error(ValueError, lambda: load_pipeline(base, lora=tmp_path / "lora", mode="aux"), contains="lora")
    other = "sd3" if model == "sana" else "sana"
    expect_error(ValueError, lambda: load_pipeline(base, other, lora=tmp_path / "lora"), contains=(other, model))


def test_a_pipeline_saved_with_its_lora(tmp_path):
    """Saved with the adapter still loaded, the transformer's weights hold peft layers that the
    stock class would skip (random weights): refused. Fused and unloaded first, it round-trips."""
    pytest.importorskip("peft")
    from twinflow import lora_files

    base = tiny_pipelines.saved_pipeline("sd3", "stock")
    lora_files.save(tmp_path / "lora", _trained_lora("sd3", base).transformer, "online", "sd3")
    pipe = load(base, lora=tmp_path / "lora")
    want = latents(pipe, "sd3")
    pipe.save_pretrained(tmp_path / "unfused")
    expect_error(ValueError, lambda: load_pipeline(tmp_path / "unfused"), contains=("unfused LoRA", "fuse_lora"))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.save_pretrained(tmp_path / "fused")
    again = load(tmp_path / "fused")
    assert diffusers_patch._common.patched_mode(again.transformer) == "lora"
    torch.testing.assert_close(latents(again, "sd3"), want, rtol=0, atol=1e-4)


def test_lora_errors(tmp_path):
    from twinflow import lora_files

    base = tiny_pipelines.saved_pipeline("sd3", "stock")
    expect_error(FileNotFoundError, lambda: load_pipeline(base, "sd3", lora=tmp_path), contains=lora_files.WEIGHT_NAME)
    (tmp_path / lora_files.WEIGHT_NAME).write_bytes(b"not safetensors")
    expect_error(ValueError, lambda: load_pipeline(base, "sd3", lora=tmp_path), contains="safetensors")
    save_file({"transformer.nothing.lora_A.weight": torch.zeros(2, 2)}, str(tmp_path / lora_files.WEIGHT_NAME))
    expect_error(ValueError, lambda: load_pipeline(base, "sd3", lora=tmp_path), contains="LoRA")


# ----------------------------------------------------------------------------- time_grid="pipeline"

def test_pipeline_time_grid_in_sd3_pipeline_without_sigmas():
    folder = tiny_pipelines.saved_pipeline("sd3", "aux")
    stock = diffusers.DiffusionPipeline.from_pretrained(folder)
    stock.set_progress_bar_config(disable=True)
    stock.scheduler = type(stock.scheduler).from_config(stock.scheduler.config, shift=3.0)
    want = latents(stock, "sd3", steps=4)
    # tt = t (style "mul", no noise): the stock model on the stock schedule, patched transformer and all
    pipe = load(folder, "sd3", scheduler=TwinFlowScheduler.from_config(stock.scheduler.config, time_grid="pipeline",
                                                                       sampling_style="mul"))
    tts = seen_tt(pipe)
    got = latents(pipe, "sd3", steps=4)
    assert torch.equal(pipe.scheduler.sigmas, stock.scheduler.sigmas)
    assert tts == pytest.approx(stock.scheduler.sigmas[:-1].tolist())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- dtype

def test_dtype_and_its_torch_dtype_alias():
    folder = tiny_pipelines.saved_pipeline("sd3", "aux")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*torch_dtype.*")
        warnings.filterwarnings("error", category=FutureWarning)
        for kw in ({"dtype": torch.bfloat16}, {"torch_dtype": "bfloat16"},
                   {"dtype": "bf16", "torch_dtype": "bfloat16"}):
            pipe = load_pipeline(folder, "sd3", **kw)
            assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16, kw
    expect_error(ValueError, lambda: load_pipeline(folder, "sd3", dtype="float32", torch_dtype="bfloat16"),
                 contains=("dtype", "torch_dtype"))
    expect_error(ValueError, lambda: load_pipeline(folder, "sd3", dtype="float8"), contains="dtype")


def test_training_loaders_pass_diffusers_the_current_dtype_keyword():
    """``twinflow train`` loads the transformer, VAE and text encoders with a dtype: no
    ``torch_dtype`` FutureWarning from diffusers (0.42 renamed it ``dtype``)."""
    from twinflow.training.models import TextEncoder, load_transformer, load_vae

    cfg = types.SimpleNamespace(model=types.SimpleNamespace(
        pretrained_model_name_or_path=str(tiny_pipelines.saved_pipeline("sd3", "stock"))))
    family = diffusers_patch.backbone("sd3")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*torch_dtype.*")
        transformer = load_transformer(cfg, family, lora=True, frozen_dtype=torch.bfloat16)
        vae = load_vae(cfg, family, torch.device("cpu"), torch.bfloat16)
        text = TextEncoder(cfg, family, torch.device("cpu"), torch.bfloat16)
    assert transformer.dtype == vae.dtype == text.pipe.text_encoder.dtype == torch.bfloat16
    assert transformer.config["_twinflow"] == {"format": 1, "backbone": "sd3", "mode": "lora"}


def test_the_record_follows_the_transformer_into_from_pipe(tmp_path):
    """A pipeline made with diffusers' from_pipe around the TwinFlow transformer saves as a
    TwinFlow pipeline too; unpatched, the transformer saves as the stock class again."""
    pipe = load(tiny_pipelines.saved_pipeline("sd3", "aux"), "sd3")
    other = diffusers.StableDiffusion3Pipeline.from_pipe(pipe)
    other.save_pretrained(tmp_path / "from-pipe")
    expect_error(ValueError, lambda: diffusers.DiffusionPipeline.from_pretrained(tmp_path / "from-pipe"),
                 contains="twinflow.load_pipeline")
    assert isinstance(load(tmp_path / "from-pipe").scheduler, TwinFlowPresetScheduler)
    diffusers_patch.backbone("sd3").unpatch(pipe.transformer)
    pipe.transformer = pipe.transformer  # re-registered: the stock class's entry
    assert pipe.config["transformer"] == ("diffusers", "SD3Transformer2DModel")
