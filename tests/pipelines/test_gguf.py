"""GGUF transformers (``twinflow.gguf_files``): ``export_gguf`` / ``twinflow export-gguf`` write a
TwinFlow transformer that ``load_pipeline(base, transformer="x.gguf")`` and ``twinflow generate
--transformer x.gguf`` read back: the aux embedder equal to the checkpoint's, the linear layers
quantized, images within the type's error of the safetensors checkpoint's; a file without the
aux embedder needs ``aux_weights=`` (never a fresh one); Q4_K blocks decode with gguf's own
decoder; bad input gets a clear error."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("gguf")

import tiny_pipelines  # noqa: E402
from checks import expect_error  # noqa: E402
from hub_cache import lay_out_repo  # noqa: E402
from tiny_pipelines import one_thread  # noqa: E402,F401 (autouse fixture)
from twinflow import gguf_files, load_pipeline, quantization  # noqa: E402
from twinflow.cli import main  # noqa: E402
from twinflow.diffusers_patch import backbone  # noqa: E402

SIZE = tiny_pipelines.TEST_SIZE
MODELS = tiny_pipelines.TRANSFORMER_FAMILIES
#: relative L2 image error vs the float32 safetensors checkpoint, 2 steps (measured on these
#: models: BF16 ≤ 6e-3, Q8_0 ≤ 1.2e-2 and, on the wide model, Q4_K 3.2e-2); a broken path is O(1)
REL_TOL = {"BF16": 0.02, "Q8_0": 0.03, "Q4_K": 0.15}


generate = tiny_pipelines.generate_images


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def aux_tensors(transformer_dir: pathlib.Path, model):
    prefix = backbone(model).aux_prefix
    return {k: v for k, v in load_file(transformer_dir / "diffusion_pytorch_model.safetensors").items()
            if k.startswith(prefix)}


def check_aux(pipe, model, want):
    aux = getattr(pipe.transformer, backbone(model).aux_name)
    assert quantization.quantized_modules(aux) == []
    prefix = backbone(model).aux_prefix
    got = {prefix + k: v for k, v in aux.state_dict().items()}
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v.float()), k


@pytest.fixture(scope="module")
def wide_qwen(tmp_path_factory):
    """A Qwen-Image pipeline whose transformer is 256 wide (2 heads × 128), so its linear
    layers take Q8_0 and Q4_K blocks; trained-looking aux weights."""
    import diffusers

    stock = tiny_pipelines.saved_pipeline("qwen-image", "stock")
    root = tmp_path_factory.mktemp("wide") / "pipe"
    import shutil

    shutil.copytree(stock, root)
    shutil.rmtree(root / "transformer")
    config = json.loads((stock / "transformer" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.update(num_attention_heads=2, attention_head_dim=128, axes_dims_rope=[32, 48, 48])
    torch.manual_seed(0)
    transformer = diffusers.QwenImageTransformer2DModel.from_config(config)
    tiny_pipelines.trained_aux_transformer("qwen-image", transformer).save_pretrained(root / "transformer")
    return root


@pytest.mark.parametrize("model", MODELS)
def test_round_trip_every_backbone(model, tmp_path):
    src = tiny_pipelines.saved_pipeline(model, "aux")
    want = generate(load_pipeline(src, model), model)
    aux = aux_tensors(src / "transformer", model)
    for t in ("BF16", "Q8_0"):
        out = tmp_path / f"{t}.gguf"
        info = gguf_files.export_gguf(src, out, t)
        # the published layout records no mode: neither does the file
        assert info["backbone"] == model and info["mode"] is None and info["bytes"] == out.stat().st_size
        pipe = load_pipeline(tiny_pipelines.saved_pipeline(model, "stock"), model, transformer=out)
        check_aux(pipe, model, aux)
        err = rel_err(generate(pipe, model), want)
        assert err < REL_TOL[t], (t, err)
        if info["quantized"]:
            assert quantization.quantized_modules(pipe.transformer), t


def test_a_gguf_transformer_with_int8_text_encoders(tmp_path):
    """The low-memory combination: the GGUF file quantizes the transformer, quantization_config
    "int8" the text encoders (torchao); the aux embedder stays the checkpoint's."""
    pytest.importorskip("torchao")
    src = tiny_pipelines.saved_pipeline("qwen-image", "aux")
    gguf_files.export_gguf(src, tmp_path / "q.gguf", "Q8_0")
    pipe = load_pipeline(tiny_pipelines.saved_pipeline("qwen-image", "stock"), "qwen-image",
                         transformer=tmp_path / "q.gguf", quantization_config="int8")
    assert quantization.quantized_modules(pipe.text_encoder)
    assert {type(p).__name__ for p in pipe.transformer.parameters()} >= {"GGUFParameter"}
    check_aux(pipe, "qwen-image", aux_tensors(src / "transformer", "qwen-image"))
    assert rel_err(generate(pipe, "qwen-image"), generate(load_pipeline(src, "qwen-image"), "qwen-image")) < 0.05


def test_what_twinflow_saved_keeps_its_record(tmp_path):
    """A folder twinflow saved records backbone and mode; its GGUF file does too, so loading it
    needs no model= (and a contradicting one is refused)."""
    saved = tmp_path / "saved"
    load_pipeline(tiny_pipelines.saved_pipeline("sd3", "aux"), "sd3").save_pretrained(saved)
    info = gguf_files.export_gguf(saved, tmp_path / "s.gguf", "Q8_0")
    assert (info["backbone"], info["mode"]) == ("sd3", "aux")
    pipe = load_pipeline(tiny_pipelines.saved_pipeline("sd3", "stock"), transformer=tmp_path / "s.gguf")
    assert pipe.config["_twinflow"] == {"format": 1, "backbone": "sd3", "mode": "aux"}
    expect_error(ValueError, lambda: load_pipeline(tiny_pipelines.saved_pipeline("sd3", "stock"), "sd3",
                                                   transformer=tmp_path / "s.gguf", mode="lora"),
                 contains="was saved in mode 'aux'")


@pytest.mark.parametrize("gguf_type", ["Q8_0", "Q4_K"])
def test_block_types_on_a_wide_transformer(wide_qwen, tmp_path, gguf_type):
    want = generate(load_pipeline(wide_qwen, "qwen-image"), "qwen-image")
    out = tmp_path / "w.gguf"
    info = gguf_files.export_gguf(wide_qwen / "transformer", out, gguf_type)
    assert info["quantized"] >= 8
    pipe = load_pipeline(wide_qwen, "qwen-image", transformer=out)
    weights = {type(p).__name__ for p in pipe.transformer.transformer_blocks.parameters()}
    assert "GGUFParameter" in weights
    check_aux(pipe, "qwen-image", aux_tensors(wide_qwen / "transformer", "qwen-image"))
    err = rel_err(generate(pipe, "qwen-image"), want)
    assert 0 < err < REL_TOL[gguf_type], err


def test_q4_k_blocks_decode_with_gguf():
    import gguf

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 512)).astype(np.float32) * rng.uniform(0.01, 3, (6, 1)).astype(np.float32)
    x[0, :256] = 0.0        # an all-zero block
    x[1, :256] = 0.25       # a constant positive block
    q = gguf_files.quantize_q4_k(x)
    assert q.dtype == np.uint8 and q.shape == (6, 2 * 144)
    back = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q4_K)
    assert back.shape == x.shape
    assert np.array_equal(back[0, :256], x[0, :256])
    # 4 bits over each 32-value block's range: at most about one step (range/15) off
    blocks, got = x.reshape(-1, 32), back.reshape(-1, 32)
    step = (np.maximum(blocks.max(1), 0) - np.minimum(blocks.min(1), 0)) / 15
    assert np.all(np.abs(got - blocks).max(1) <= 1.1 * step + 1e-6)
    assert np.sqrt(((back - x) ** 2).mean() / (x ** 2).mean()) < 0.12


def test_aux_embedder_from_aux_weights_or_a_clear_error(tmp_path):
    model = "sd3"
    aux_dir = tiny_pipelines.saved_pipeline(model, "aux") / "transformer"
    bare = tmp_path / "bare.gguf"  # what a community converter writes: the transformer without aux
    gguf_files.export_gguf(tiny_pipelines.saved_pipeline(model, "stock"), bare, "Q8_0")
    base = tiny_pipelines.saved_pipeline(model, "stock")
    expect_error(ValueError, lambda: load_pipeline(base, model, transformer=bare),
                 contains=("no aux target-time embedder", "aux_weights=", "mode='lora'"))
    want = aux_tensors(aux_dir, model)
    full = tmp_path / "full.gguf"
    gguf_files.export_gguf(aux_dir, full, "Q8_0")
    ref = generate(load_pipeline(base, model, transformer=full), model)
    file = tmp_path / "aux.safetensors"
    save_file(want, file)
    for source in (aux_dir, file):
        pipe = load_pipeline(base, model, transformer=bare, aux_weights=source)
        check_aux(pipe, model, want)
        assert torch.equal(generate(pipe, model), ref), source
    expect_error(ValueError, lambda: load_pipeline(base, model, transformer=full, aux_weights=file),
                 contains="give one source")
    lora = load_pipeline(base, model, transformer=bare, mode="lora")  # LoRA mode needs no aux embedder
    assert not hasattr(lora.transformer, backbone(model).aux_name)


def test_bad_gguf_input_is_a_clear_error(tmp_path):
    base = tiny_pipelines.saved_pipeline("qwen-image", "stock")
    sd3 = tmp_path / "sd3.gguf"
    gguf_files.export_gguf(tiny_pipelines.saved_pipeline("sd3", "aux"), sd3, "Q8_0")
    expect_error(ValueError, lambda: load_pipeline(base, "qwen-image", transformer=sd3),
                 contains=("tensors of a Qwen-Image transformer", "another backbone"))
    saved = tmp_path / "saved"
    load_pipeline(tiny_pipelines.saved_pipeline("sd3", "aux"), "sd3").save_pretrained(saved)
    recorded = tmp_path / "recorded.gguf"
    gguf_files.export_gguf(saved, recorded, "Q8_0")
    expect_error(ValueError, lambda: load_pipeline(base, "qwen-image", transformer=recorded),
                 contains="TwinFlow sd3 checkpoint")
    smaller = tmp_path / "smaller.gguf"  # the right backbone, another size: wrong tensor shapes
    _rewrite(qwen_file := tmp_path / "q0.gguf", smaller, source=tiny_pipelines.saved_pipeline("qwen-image", "aux"))
    expect_error(ValueError, lambda: load_pipeline(base, "qwen-image", transformer=smaller), contains="shape")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\x00" * 64)
    expect_error(ValueError, lambda: load_pipeline(base, "qwen-image", transformer=garbage), contains="GGUF")
    expect_error(FileNotFoundError, lambda: load_pipeline(base, "qwen-image", transformer=tmp_path / "none.gguf"),
                 contains="none.gguf")
    expect_error(ValueError, lambda: load_pipeline(base, "qwen-image", aux_weights=tmp_path),
                 contains="applies to a GGUF transformer")
    import diffusers
    from torchao.quantization import Int8WeightOnlyConfig

    expect_error(ValueError, lambda: load_pipeline(base, "qwen-image", transformer=qwen_file, quantization_config={
        "transformer": diffusers.TorchAoConfig(Int8WeightOnlyConfig())}), contains="already quantized")
    expect_error(ValueError, lambda: gguf_files.export_gguf(base, tmp_path / "x.gguf", "Q5_K"), contains="Q8_0")


def _rewrite(dst_plain: pathlib.Path, dst: pathlib.Path, *, source: pathlib.Path) -> None:
    """`source` exported to `dst_plain`, and to `dst` with one linear weight cut in half (a file
    of the right backbone whose shapes do not fit the config)."""
    import gguf

    gguf_files.export_gguf(source, dst_plain, "Q8_0")
    reader = gguf.GGUFReader(str(dst_plain))
    writer = gguf.GGUFWriter(str(dst), arch="qwen_image")
    writer.add_string("twinflow.transformer_config",
                      gguf_files._field_str(reader, "twinflow.transformer_config"))
    cut = False
    for t in reader.tensors:
        data = np.array(t.data)
        if not cut and t.name.endswith("img_in.weight"):
            data, cut = data[: data.shape[0] // 2].copy(), True
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(t.name, data)
        else:
            writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    assert cut
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_hub_file_from_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    out = tmp_path / "m.gguf"
    gguf_files.export_gguf(tiny_pipelines.saved_pipeline("sana", "aux"), out, "BF16")
    lay_out_repo(cache, "someone/twinflow-sana-gguf", {"twinflow-sana-BF16.gguf": out})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = tiny_pipelines.saved_pipeline("sana", "stock")
    pipe = load_pipeline(base, "sana", transformer="someone/twinflow-sana-gguf/twinflow-sana-BF16.gguf")
    local = load_pipeline(base, "sana", transformer=out)
    assert torch.equal(generate(pipe, "sana"), generate(local, "sana"))
    expect_error(FileNotFoundError, lambda: load_pipeline(base, "sana", transformer="someone/other/x.gguf"),
                 contains="Hugging Face cache")


def test_export_and_generate_commands(tmp_path, capsys):
    src = tiny_pipelines.saved_pipeline("z-image", "aux")
    out = tmp_path / "z.gguf"
    assert main(["export-gguf", str(src), "--type", "Q8_0", "-o", str(out)]) == 0
    assert "z-image (no recorded mode)" in capsys.readouterr().out
    args = ["generate", "--model", "z-image", "--model-path", str(tiny_pipelines.saved_pipeline("z-image", "stock")),
            "--transformer", str(out), "--prompt", "a cat", "--steps", "2", "--height", str(SIZE),
            "--width", str(SIZE), "--device", "cpu", "--output-dir", str(tmp_path / "img")]
    assert main(args) == 0
    rec = json.loads((tmp_path / "img" / "000-00.json").read_text())
    assert rec["model"] == "z-image" and rec["transformer"].endswith("z.gguf")
    capsys.readouterr()
    assert main(["export-gguf", str(src), "-o", str(tmp_path / "z.bin")]) == 1
    assert "expected a .gguf file name" in capsys.readouterr().err


def test_a_sharded_checkpoint_exports_every_tensor(tmp_path):
    src = tiny_pipelines.saved_pipeline("sana", "sharded")
    keys = set()
    for f in (src / "transformer").glob("*.safetensors"):
        keys |= set(load_file(f))
    info = gguf_files.export_gguf(src, tmp_path / "s.gguf", "BF16")
    assert info["tensors"] == len(keys)
    pipe = load_pipeline(tiny_pipelines.saved_pipeline("sana", "stock"), "sana", transformer=tmp_path / "s.gguf")
    prefix = backbone("sana").aux_prefix
    want = {}
    for f in (src / "transformer").glob("*.safetensors"):
        want.update({k: v for k, v in load_file(f).items() if k.startswith(prefix)})
    check_aux(pipe, "sana", want)


def test_q4_k_falls_back_to_q8_0_for_rows_that_do_not_divide(tmp_path):
    """Rows that are not a multiple of 256 values (SD3.5-large's 2432-wide layers; here the tiny
    SD3's) are written Q8_0 instead of being left in float32."""
    import gguf

    src = tiny_pipelines.saved_pipeline("sd3", "aux")
    q8 = gguf_files.export_gguf(src, tmp_path / "a.gguf", "Q8_0")
    q4 = gguf_files.export_gguf(src, tmp_path / "b.gguf", "Q4_K")
    assert q8["quantized"] == q4["quantized"] > 0
    types = {t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "b.gguf")).tensors}
    assert gguf.GGMLQuantizationType.Q8_0 in types and gguf.GGMLQuantizationType.Q4_K not in types
