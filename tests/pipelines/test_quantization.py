"""Quantized loading (``load_pipeline(quantization_config=...)``, ``twinflow.quantization``):
every backbone's TwinFlow checkpoint loads with torchao int8 / float8 weight-only on the CPU,
its aux target-time embedder present, unquantized and equal to the checkpoint's tensors, its
stock time embedder unquantized too, the other linear layers and the text encoders quantized,
and its images close to the unquantized pipeline's (the stated tolerance); diffusers' own
config forms pass through; bad input gets a clear error."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

import tiny_pipelines
from checks import expect_error
from tiny_pipelines import one_thread  # noqa: F401 (autouse fixture)
from twinflow import load_pipeline, quantization
from twinflow.diffusers_patch import backbone

pytest.importorskip("torchao")

MODELS = tiny_pipelines.TRANSFORMER_FAMILIES
#: relative L2 error of a 2-step tiny-model image, quantized vs float32 (measured: int8
#: up to 9e-3, float8 up to 7e-2 over the four backbones: e4m3 keeps 3 mantissa bits); a broken
#: path is O(1)
REL_TOL = {"int8": 0.03, "fp8": 0.15}


generate = tiny_pipelines.generate_images


def checkpoint_aux(model):
    folder = tiny_pipelines.saved_pipeline(model, "aux") / "transformer"
    prefix = backbone(model).aux_prefix
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


_REFERENCE = {}


def reference(model):
    if model not in _REFERENCE:
        _REFERENCE[model] = generate(load_pipeline(tiny_pipelines.saved_pipeline(model, "aux"), model), model)
    return _REFERENCE[model]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def check_embedders(pipe, model):
    bb = backbone(model)
    tr = pipe.transformer
    aux = getattr(tr, bb.aux_name)
    assert quantization.quantized_modules(aux) == []
    assert quantization.quantized_modules(getattr(tr, bb.embed_name)) == []
    want = checkpoint_aux(model)
    got = aux.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == torch.float32
        assert torch.equal(got[k], v), k
    assert len(quantization.quantized_modules(tr)) > 0  # the rest is quantized


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_named_modes_every_backbone(model, name):
    pipe = load_pipeline(tiny_pipelines.saved_pipeline(model, "aux"), model, quantization_config=name)
    check_embedders(pipe, model)
    assert quantization.quantized_modules(pipe.text_encoder)  # the text encoders too
    err = rel_err(generate(pipe, model), reference(model))
    assert 0 < err < REL_TOL[name], err


def test_diffusers_config_forms_pass_through():
    import diffusers
    from torchao.quantization import Int8WeightOnlyConfig

    model = "qwen-image"
    folder = tiny_pipelines.saved_pipeline(model, "aux")
    forms = {
        "PipelineQuantizationConfig(mapping)": diffusers.PipelineQuantizationConfig(
            quant_mapping={"transformer": diffusers.TorchAoConfig(Int8WeightOnlyConfig())}),
        "dict": {"transformer": diffusers.TorchAoConfig(Int8WeightOnlyConfig())},
        "one config": diffusers.TorchAoConfig(Int8WeightOnlyConfig()),
    }
    for label, qc in forms.items():
        pipe = load_pipeline(folder, model, quantization_config=qc)
        check_embedders(pipe, model)
        assert quantization.quantized_modules(pipe.text_encoder) == [], label  # only the transformer asked for
        assert 0 < rel_err(generate(pipe, model), reference(model)) < REL_TOL["int8"], label


def test_a_mapping_with_text_encoders_quantizes_them_too():
    import diffusers
    import transformers
    from torchao.quantization import Int8WeightOnlyConfig

    texts = ("text_encoder", "text_encoder_2", "text_encoder_3")
    qc = diffusers.PipelineQuantizationConfig(quant_mapping={
        "transformer": diffusers.TorchAoConfig(Int8WeightOnlyConfig()),
        **{n: transformers.TorchAoConfig(Int8WeightOnlyConfig()) for n in texts}})
    pipe = load_pipeline(tiny_pipelines.saved_pipeline("sd3", "aux"), "sd3", quantization_config=qc)
    check_embedders(pipe, "sd3")
    for name in texts:
        assert quantization.quantized_modules(getattr(pipe, name)), name


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes not installed (not in CI: diffusers runs it on CUDA/XPU only)")
def test_a_backend_wide_pipeline_config_is_split_without_touching_the_user_config():
    """The backend form (quant_backend + quant_kwargs): the transformer's part gets the embedders
    in its skip list, the rest keeps the user's components (all: the text encoders, by name)."""
    import diffusers

    kw = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    for components, rest_want in ((None, ["text_encoder", "text_encoder_2"]),
                                  (["transformer", "text_encoder"], ["text_encoder"]), (["transformer"], None)):
        qc = diffusers.PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit", quant_kwargs=kw,
                                                  components_to_quantize=components)
        tcfg, rest = quantization.pipeline_quantization(
            qc, transformer_skip=["time_text_embed", "time_text_embed_2"],
            text_encoders=["text_encoder", "text_encoder_2"], dtype=None, device=None)
        assert isinstance(tcfg, diffusers.BitsAndBytesConfig) and tcfg.load_in_4bit
        assert tcfg.llm_int8_skip_modules == ["time_text_embed", "time_text_embed_2"]
        assert (None if rest is None else rest.components_to_quantize) == rest_want
        assert qc.components_to_quantize == components  # the caller's object is not changed


@pytest.mark.skipif(importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None,
                    reason="optimum-quanto not installed")
def test_quanto_embedder_is_dequantized_after_loading(caplog):
    """optimum-quanto matches only leaf names, so the embedder comes back quantized: twinflow
    replaces it by plain layers holding the dequantized weights (and says so)."""
    import logging

    import diffusers

    with pytest.warns(FutureWarning):  # diffusers deprecates optimum-quanto
        qc = diffusers.QuantoConfig("int8")
    with caplog.at_level(logging.INFO, logger="twinflow.pipelines"):
        pipe = load_pipeline(tiny_pipelines.saved_pipeline("qwen-image", "aux"), "qwen-image", quantization_config=qc)
    assert "dequantized the time embedder" in caplog.text
    check_embedders(pipe, "qwen-image")
    assert 0 < rel_err(generate(pipe, "qwen-image"), reference("qwen-image")) < REL_TOL["int8"]


def test_plain_linears_holds_the_dequantized_weights():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.SiLU(), torch.nn.Linear(64, 16))
    quantize_(seq, Int8WeightOnlyConfig())
    assert quantization.quantized_modules(seq) == ["0", "2"]
    x = torch.randn(4, 32)
    with torch.no_grad():
        want = seq(x)
        deq = [seq[0].weight.dequantize(), seq[2].weight.dequantize()]
    assert quantization.plain_linears(seq) == ["0", "2"]
    assert quantization.quantized_modules(seq) == []
    assert type(seq[0]) is torch.nn.Linear and torch.equal(seq[0].weight, deq[0]) and torch.equal(seq[2].weight, deq[1])
    with torch.no_grad():
        torch.testing.assert_close(seq(x), want, rtol=1e-5, atol=1e-5)


def test_bad_quantization_input_is_a_clear_error(monkeypatch):
    folder = tiny_pipelines.saved_pipeline("sd3", "aux")
    expect_error(ValueError, lambda: load_pipeline(folder, "sd3", quantization_config="int3"),
                 contains=("unknown name 'int3'", "int8", "nf4"))
    expect_error(TypeError, lambda: load_pipeline(folder, "sd3", quantization_config=8),
                 contains="quantization_config")
    expect_error(ValueError, lambda: load_pipeline(folder, "sd3", quantization_config="nf4", device="cpu"),
                 contains=("runs on cuda or xpu only", "not on cpu"))
    transformer = load_pipeline(folder, "sd3").transformer
    expect_error(ValueError, lambda: load_pipeline(tiny_pipelines.saved_pipeline("sd3"), "sd3",
                                                   transformer=transformer, quantization_config="int8"),
                 contains="already loaded module")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    expect_error(ImportError, lambda: load_pipeline(folder, "sd3", quantization_config="int8"),
                 contains="pip install torchao")


def test_describe_and_choices():
    assert quantization.QUANTIZE_CHOICES[0] == "none"
    for name in quantization.QUANTIZE_CHOICES:
        assert quantization.describe(name)
    assert load_pipeline(tiny_pipelines.saved_pipeline("sd3", "aux"), "sd3", quantization_config="none") is not None
