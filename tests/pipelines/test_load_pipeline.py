"""twinflow.load_pipeline: TwinFlow checkpoint folders through the stock diffusers pipelines.

What is checked (CPU, the tiny random-weight pipelines of ``tiny_pipelines``, saved with
``save_pretrained`` and loaded back, for Qwen-Image, Z-Image, SD3 and Sana):

* the installed scheduler applies the 1/2/4-NFE preset of each call's step count, and the
  transformer runs once per step (2n − 1 times for order 2), seeing tt = 0 (few style);
* the same generator seed gives the same image (stochastic steps included), another seed
  another image;
* aux weights: read from the transformer's safetensors (single file and sharded), they change
  the output against the fresh-init case (which warns); they round-trip through
  save_pretrained → load_pipeline; LoRA mode has none;
* with tt = t (style "mul") and the pipeline's own sigmas, the loaded (patched) pipeline
  reproduces the stock pipeline with FlowMatchEulerDiscreteScheduler;
* bad folders and arguments raise FileNotFoundError / ValueError naming the problem.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch


pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import diffusers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from twinflow import diffusers_patch  # noqa: E402
import tiny_pipelines  # noqa: E402
from tiny_pipelines import one_thread  # noqa: E402,F401 (autouse fixture)
from checks import expect_error  # noqa: E402
from twinflow.diffusers_patch._common import TT_ATTR  # noqa: E402
from twinflow import (TwinFlowPresetScheduler, TwinFlowScheduler, UnifiedSampler, load_pipeline,  # noqa: E402
                      preset_for_steps, scheduler_for_steps)
from twinflow.diffusers_patch import backbone  # noqa: E402

ALL = tiny_pipelines.PIPELINES
SIZE = tiny_pipelines.TEST_SIZE


def load(model, layout="aux", **kw):
    """load_pipeline on a saved tiny folder, expecting no warning unless the layout has no aux keys."""
    with tiny_pipelines.strict_warnings(ignore_all=layout == "stock" or kw.get("mode") == "lora"):
        pipe = load_pipeline(tiny_pipelines.saved_pipeline(model, layout), model, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, model, steps, seed=0, **kw):
    """One image as a [1, 3, H, W] tensor, no classifier-free guidance (one transformer row)."""
    extra = {backbone(model).cfg_kwarg: 1.0, **backbone(model).exact_size_kwargs(SIZE, SIZE),
             **tiny_pipelines.edit_kwargs(model)}
    if model == "sana":
        extra["complex_human_instruction"] = None  # a 2k-character preamble: slow and irrelevant here
    with torch.no_grad():
        return pipe(prompt="a cat dancing", height=SIZE, width=SIZE, num_inference_steps=steps, output_type="pt",
                    generator=torch.Generator().manual_seed(seed), **extra, **kw).images


class Calls:
    """Records the (t, tt) of every call of a patched transformer, in t units."""

    def __init__(self, pipe):
        self.pipe, self.seen = pipe, []
        self.handle = pipe.transformer.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        sched = self.pipe.scheduler
        self.seen.append(float(sched.tt))

    def __len__(self):
        return len(self.seen)


def aux_state(transformer, model):
    prefix = diffusers_patch.module_for(model).AUX_PREFIX
    return {k: v for k, v in transformer.state_dict().items() if k.startswith(prefix)}


def saved_aux(folder, model):
    prefix = diffusers_patch.module_for(model).AUX_PREFIX
    out = {}
    for f in sorted((folder / "transformer").glob("*.safetensors")):
        out.update({k: v for k, v in load_file(str(f)).items() if k.startswith(prefix)})
    return out


# ----------------------------------------------------------------------------- presets

def test_preset_for_steps_mapping():
    assert [preset_for_steps(n) for n in (1, 2, 3, 4, 8)] == ["1-nfe", "2-nfe", "4-nfe", "4-nfe", "4-nfe"]
    for bad in (0, -1, 2.0, True, "2"):
        expect_error(ValueError, lambda: preset_for_steps(bad), contains="steps")
    s = scheduler_for_steps(4, sampling_order=2)
    want = UnifiedSampler.preset("4-nfe").to_dict()
    assert s.config.stochast_ratio == want["stochast_ratio"] and tuple(s.config.rfba_gap_steps) == want["rfba_gap_steps"]
    assert s.config.sampling_order == 2


@pytest.mark.parametrize("model", ALL)
def test_load_installs_a_wired_preset_scheduler_and_nfe_per_step_count(model):
    pipe = load(model)
    assert type(pipe).__name__ == backbone(model).pipeline_class_name
    assert isinstance(pipe.scheduler, TwinFlowPresetScheduler) and isinstance(pipe.scheduler, TwinFlowScheduler)
    assert diffusers_patch.is_patched(pipe.transformer)
    assert getattr(pipe.transformer, TT_ATTR)() is pipe, "wired (weakly) to the pipeline: its scheduler at call time"
    calls = Calls(pipe)
    for steps in (1, 2, 4, 3):
        calls.seen.clear()
        img = generate(pipe, model, steps)
        assert img.shape == (1, 3, SIZE, SIZE) and torch.isfinite(img).all()
        assert len(calls) == steps, f"{steps} steps: {len(calls)} transformer calls"
        assert calls.seen == [0.0] * steps, "few style: the target time is 0 at every call"
        preset = UnifiedSampler.preset(preset_for_steps(steps)).to_dict()
        assert pipe.scheduler.config.stochast_ratio == preset["stochast_ratio"]
        assert tuple(pipe.scheduler.config.rfba_gap_steps) == preset["rfba_gap_steps"]
        assert pipe.scheduler.num_inference_steps == steps


@pytest.mark.parametrize("model", ALL)
def test_order_2_runs_the_transformer_2n_minus_1_times(model):
    pipe = load(model, scheduler=TwinFlowPresetScheduler(sampling_order=2))
    calls = Calls(pipe)
    for steps, intervals in ((4, 2), (6, 3)):
        calls.seen.clear()
        assert torch.isfinite(generate(pipe, model, steps)).all()
        assert len(calls) == 2 * intervals - 1


# ----------------------------------------------------------------------------- reproducibility

@pytest.mark.exact
@pytest.mark.parametrize("model", ALL)
def test_same_seed_same_image_also_with_stochastic_steps(model):
    pipe = load(model)
    a, b = generate(pipe, model, 2, seed=5), generate(pipe, model, 2, seed=5)  # 2-NFE: stochast_ratio 1
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(pipe, model, 2, seed=6))
    assert torch.equal(generate(load(model), model, 2, seed=5), a), "a freshly loaded pipeline, same image"


# ----------------------------------------------------------------------------- aux weights

@pytest.mark.exact
@pytest.mark.parametrize("model", ALL)
def test_aux_weights_from_single_and_sharded_safetensors(model):
    single, sharded = tiny_pipelines.saved_pipeline(model, "aux"), tiny_pipelines.saved_pipeline(model, "sharded")
    assert (sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list((sharded / "transformer").glob("*.safetensors"))) > 1
    saved = saved_aux(single, model)
    assert saved, "the published layout keeps the aux keys in the transformer's safetensors"
    for layout in ("aux", "sharded"):
        pipe = load(model, layout)
        got = aux_state(pipe.transformer, model)
        assert set(got) == set(saved)
        for k, v in saved.items():
            assert torch.equal(got[k], v), k
    assert torch.equal(generate(load(model, "sharded"), model, 2), generate(load(model, "aux"), model, 2))


@pytest.mark.parametrize("model", ALL)
def test_missing_aux_weights_warn_and_start_as_published(model):
    bb = diffusers_patch.backbone(model)
    with pytest.warns(UserWarning, match="no aux target-time weights.*" + re.escape(bb.aux_init_text)):
        fresh = load_pipeline(tiny_pipelines.saved_pipeline(model, "stock"), model)
    fresh.set_progress_bar_config(disable=True)
    prefix = bb.aux_prefix
    state = fresh.transformer.state_dict()
    aux = aux_state(fresh.transformer, model)
    assert aux
    main = {k: v for k, v in state.items() if not k.startswith(prefix)}
    if bb.aux_init == "copy":  # Qwen-Image, Z-Image: every aux tensor is a copy of a main-embedder tensor
        for k, v in aux.items():
            assert any(v.shape == m.shape and torch.equal(v, m) for m in main.values()), k
    else:  # SD3, Sana: N(0, 0.02) weights, zero biases
        assert model in ("sd3", "sana")
        for k, v in aux.items():
            assert (not v.any()) if k.endswith("bias") else (0 < float(v.std()) < 0.05), k
    # trained aux weights change the image (tt = 0 ≠ t in the few style)
    assert not torch.allclose(generate(fresh, model, 2), generate(load(model, "aux"), model, 2), atol=1e-4)


@pytest.mark.exact
@pytest.mark.parametrize("model", ALL)
def test_aux_keys_round_trip_through_save_pretrained(model, tmp_path):
    pipe = load(model)
    want = generate(pipe, model, 2)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"][1] == "TwinFlowPresetScheduler"
    assert set(saved_aux(tmp_path, model)) == set(saved_aux(tiny_pipelines.saved_pipeline(model, "aux"), model))
    with tiny_pipelines.strict_warnings():
        again = load_pipeline(tmp_path, model)
    again.set_progress_bar_config(disable=True)
    for k, v in aux_state(pipe.transformer, model).items():
        assert torch.equal(aux_state(again.transformer, model)[k], v), k
    assert torch.equal(generate(again, model, 2), want)
    # the saved scheduler loads back as our class; the whole pipeline only through twinflow
    assert type(TwinFlowPresetScheduler.from_pretrained(tmp_path / "scheduler")) is TwinFlowPresetScheduler
    expect_error(ValueError, lambda: diffusers.DiffusionPipeline.from_pretrained(tmp_path),
                 contains="twinflow.load_pipeline")


@pytest.mark.parametrize("model", ALL)
def test_lora_mode_has_no_aux_embedder(model):
    with pytest.warns(UserWarning, match="ignored in LoRA mode"):
        pipe = load_pipeline(tiny_pipelines.saved_pipeline(model, "aux"), model, mode="lora")
    pipe.set_progress_bar_config(disable=True)
    assert not aux_state(pipe.transformer, model)
    assert torch.isfinite(generate(pipe, model, 2)).all()


# ----------------------------------------------------------------------------- tt invariant

@pytest.mark.exact
@pytest.mark.parametrize("model", ALL)
def test_tt_equal_t_reproduces_the_stock_euler_pipeline(model):
    """Style "mul" (tt = t) on the pipeline's sigmas with s = 0: the loaded pipeline, aux
    weights and all, gives the stock pipeline's FlowMatchEuler image."""
    folder = tiny_pipelines.saved_pipeline(model, "aux")
    stock = diffusers.DiffusionPipeline.from_pretrained(folder)  # unpatched, its own FlowMatchEuler
    stock.set_progress_bar_config(disable=True)
    assert type(stock.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    # unshifted, so that both run exactly the sigmas given (Sana's config has shift 7)
    stock.scheduler = type(stock.scheduler).from_config(stock.scheduler.config, shift=1.0, use_dynamic_shifting=False)
    sigmas = [1.0, 0.75, 0.5, 0.25]
    want = generate(stock, model, len(sigmas), sigmas=sigmas)
    pipe = load(model, scheduler=TwinFlowScheduler.from_config(stock.scheduler.config, time_grid="pipeline",
                                                               sampling_style="mul"))
    calls = Calls(pipe)
    got = generate(pipe, model, len(sigmas), sigmas=sigmas)
    assert calls.seen == sigmas
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    # and the aux weights do act when tt ≠ t
    assert not torch.allclose(generate(load(model), model, len(sigmas), sigmas=sigmas), want, atol=1e-3)


# ----------------------------------------------------------------------------- dtype, device

def test_bfloat16_and_device():
    pipe = load("sd3", torch_dtype="bfloat16", device="cpu")
    assert pipe.transformer.dtype == torch.bfloat16
    assert all(v.dtype == torch.bfloat16 for v in aux_state(pipe.transformer, "sd3").values())
    saved = saved_aux(tiny_pipelines.saved_pipeline("sd3", "aux"), "sd3")
    for k, v in aux_state(pipe.transformer, "sd3").items():
        assert torch.equal(v, saved[k].to(torch.bfloat16)), k
    assert torch.isfinite(generate(pipe, "sd3", 2).float()).all()


# ----------------------------------------------------------------------------- errors

@pytest.fixture
def folder(tmp_path):
    """A writable copy of the tiny SD3 folder in the published (aux) layout."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_pipelines.saved_pipeline("sd3", "aux"), dst)
    return dst


def test_errors_name_the_problem(folder, tmp_path):
    expect_error(FileNotFoundError, lambda: load_pipeline(tmp_path / "nope", "sd3"), contains="no such folder")
    expect_error(FileNotFoundError, lambda: load_pipeline(tmp_path, "sd3"), contains="model_index.json")
    expect_error(ValueError, lambda: load_pipeline(folder, "hidream"), contains=("unknown", "hidream"))
    expect_error(ValueError, lambda: load_pipeline(folder, "sana"),
                 contains=("SD3Transformer2DModel", "SanaTransformer2DModel"))
    expect_error(ValueError, lambda: load_pipeline(folder, "sd3", mode="both"), contains="mode")
    expect_error(ValueError, lambda: load_pipeline(folder, "sd3", torch_dtype="float8"), contains="torch_dtype")
    expect_error(ValueError, lambda: load_pipeline(folder, "sd3", device="gpu0"), contains="device")
    expect_error(ValueError, lambda: load_pipeline(folder, "sd3", scheduler=object()), contains="scheduler")
    if not torch.cuda.is_available():
        expect_error(ValueError, lambda: load_pipeline(folder, "sd3", device="cuda"), contains="CUDA")


@pytest.mark.parametrize("damage,exc,contains", [
    ("truncate transformer", ValueError, ("transformer", "corrupt")),
    ("truncate vae", ValueError, ("vae", "corrupt")),
    ("remove vae", FileNotFoundError, ("vae", "missing")),
    ("remove weights", FileNotFoundError, "diffusion_pytorch_model.safetensors"),
    ("bad json", ValueError, ("config.json", "JSON")),
    ("partial aux", ValueError, ("aux", "missing")),
])
def test_damaged_folder(folder, damage, exc, contains):
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    if damage.startswith("truncate"):
        target = weights if "transformer" in damage else next((folder / "vae").glob("*.safetensors"))
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif damage == "remove vae":
        shutil.rmtree(folder / "vae")
    elif damage == "remove weights":
        weights.unlink()
    elif damage == "bad json":
        (folder / "transformer" / "config.json").write_text("{not json")
    elif damage == "partial aux":
        state = load_file(str(weights))
        del state[sorted(k for k in state if k.startswith("time_text_embed_2."))[0]]
        save_file(state, str(weights), metadata={"format": "pt"})
    expect_error(exc, lambda: load_pipeline(folder, "sd3"), contains=contains)


def test_sharded_folder_with_a_missing_shard(tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_pipelines.saved_pipeline("sana", "sharded"), dst)
    next((dst / "transformer").glob("*-00002-of-*.safetensors")).unlink()
    expect_error(FileNotFoundError, lambda: load_pipeline(dst, "sana"), contains=("shard", "missing"))


def test_components_left_out_or_given_as_diffusers_takes_them(tmp_path):
    """SD3 without T5 (a common way to save memory): a folder saved with text_encoder_3=None loads
    (diffusers itself refuses it unless told again), and overrides pass through, None included."""
    pipe = load("sd3")
    pipe.register_modules(text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(tmp_path / "no-t5")
    index = json.loads((tmp_path / "no-t5" / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None]
    again = load_pipeline(tmp_path / "no-t5")
    again.set_progress_bar_config(disable=True)
    assert again.text_encoder_3 is None and torch.isfinite(generate(again, "sd3", 1)).all()
    # the same from the full folder, leaving T5 out by argument: the same image
    given = load("sd3", text_encoder_3=None, tokenizer_3=None)
    assert given.text_encoder_3 is None
    assert torch.equal(generate(given, "sd3", 1), generate(again, "sd3", 1))
    # a loaded component replaces the folder's
    te = again.text_encoder
    assert load("sd3", text_encoder=te).text_encoder is te
    expect_error(ValueError, lambda: load("sd3", text_encoder_4=None),
                 contains=("text_encoder_4: not a component of StableDiffusion3Pipeline", "text_encoder_3"))
    expect_error(ValueError, lambda: load("sd3", vae="some/folder"), contains=("vae", "got the path"))


def test_model_index_is_read_once(monkeypatch):
    """load_pipeline parses model_index.json once and hands the parsed copy to each check."""
    from twinflow import _files

    read, reads = _files.read_json, []

    def counting(path, *a, **kw):  # every JSON read of the package goes through _files.read_json
        reads.extend([path] if str(path).endswith("model_index.json") else [])
        return read(path, *a, **kw)

    tiny_pipelines.saved_pipeline("sd3", "aux")  # built (and saved) before counting
    monkeypatch.setattr(_files, "read_json", counting)
    load("sd3")
    assert len(reads) == 1, reads
