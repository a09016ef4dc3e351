"""twinflow.training.config: the published configs in configs/ and config errors (no training).

Every YAML under configs/ validates and carries the docs/algorithm.md §3.7 settings of its model × full/LoRA
× estimate order; a bad key, type or value is a ValueError/TypeError naming the file and the
dotted key; ``--set key=value`` overrides are parsed as YAML and validated like the file.
"""

from __future__ import annotations

import pathlib

import pytest


from checks import expect_error  # noqa: E402
from twinflow.diffusers_patch import backbone  # noqa: E402
from twinflow.training.config import load_config, parse_config  # noqa: E402

# OpenUni's four configs (full, image-free, LoRA 1st/2nd order) are checked in test_train_openuni.py,
# the CPU smoke config (not a published recipe) in test_tiny.py.
CONFIGS = sorted(p for p in (pathlib.Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")
                 if not p.stem.startswith(("openuni", "smoke")) and "_qlora_" not in p.stem)  # smoke_*: test_tiny.py
QLORA = sorted((pathlib.Path(__file__).resolve().parents[2] / "configs").glob("*_qlora_*.yaml"))
MODELS = {"sd35": "sd3", "qwen_image": "qwen-image", "z_image": "z-image", "sana": "sana", "flux": "flux",
          "chroma": "chroma", "lumina2": "lumina2", "wan": "wan"}
#: models with first-order configs only (a video family: no second-order recipe yet)
FIRST_ORDER_ONLY = ("wan",)
#: the editing families: 1st-order configs (the published edit training takes the Qwen-Image settings)
EDIT = {"qwen_image_edit": "qwen-image-edit", "flux_kontext": "flux-kontext"}
BASE = {"model": {"name": "sd3", "pretrained_model_name_or_path": "/x"}}


def test_one_config_per_model_kind_and_order():
    names = {p.stem for p in CONFIGS}
    want = {f"{m}_{k}_{o}order" for m in MODELS for k in ("full", "lora") for o in (1, 2)
            if o == 1 or m not in FIRST_ORDER_ONLY}
    want |= {f"{m}_{k}_1order" for m in EDIT for k in ("full", "lora")}
    assert names == want


@pytest.mark.parametrize("path", QLORA, ids=lambda p: p.stem)
def test_qlora_configs_are_their_lora_config_with_a_quantized_base(path):
    """configs/*_qlora_*.yaml: the published LoRA config of the same model and order, plus
    model.quantization, gradient checkpointing and the optimizer choice (docs/low_vram.md)."""
    cfg, base = load_config(path), load_config(path.with_name(path.name.replace("_qlora_", "_lora_")))
    assert cfg.model.quantization == "nf4" and base.model.quantization is None
    assert cfg.training.gradient_checkpointing and cfg.training.optimizer == "adamw"
    assert (cfg.lora, cfg.twinflow, cfg.sampling) == (base.lora, base.twinflow, base.sampling)


@pytest.mark.parametrize("key", sorted(EDIT))
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_editing_configs_are_their_base_familys(key, kind):
    """An editing family trains as its base family does (the published Qwen-Image-Edit training
    only renames the model): the same sections but model and data.reference_column."""
    base = {"qwen_image_edit": "qwen_image", "flux_kontext": "flux"}[key]
    cfg = load_config(CONFIGS[0].with_name(f"{key}_{kind}_1order.yaml"))
    ref = load_config(CONFIGS[0].with_name(f"{base}_{kind}_1order.yaml"))
    assert (cfg.lora, cfg.training, cfg.twinflow, cfg.sampling) == (ref.lora, ref.training, ref.twinflow, ref.sampling)
    assert cfg.data.reference_column == "reference_bytes" and cfg.model.name == EDIT[key] != ref.model.name


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_published_settings(path):
    cfg = load_config(path)
    key, kind, order = path.stem.rsplit("_", 2)
    assert cfg.model.name == {**MODELS, **EDIT}[key]
    lora = kind == "lora"
    tf, t = cfg.twinflow, cfg.training
    assert cfg.lora.enabled is lora
    assert tf.estimate_order == int(order[0])
    # docs/algorithm.md §3.7, the published configs (Z-Image, FLUX, Chroma, Lumina-2, Wan and the
    # editing families, unpublished: Qwen-Image's; Sana: OpenUni's)
    fam = {"z_image": "qwen_image", "flux": "qwen_image", "chroma": "qwen_image", "lumina2": "qwen_image",
           "wan": "qwen_image", "qwen_image_edit": "qwen_image", "flux_kontext": "qwen_image"}.get(key, key)
    assert t.lr == (1e-4 if lora or fam == "sana" else 1e-5)
    assert t.adam_betas == ((0.9, 0.95) if fam == "sana" else (0.9, 0.99))
    assert (t.grad_clip, t.weight_decay, t.mixed_precision, t.lr_scheduler) == (1.0, 0.0, "bf16", "constant")
    if lora:
        assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.init) == (64, 64.0, "gaussian")
        assert any("to_q" in m for m in cfg.lora.target_modules)
        time_embedder = ("t_embedder", "timestep_embedder", "time_embedder", backbone(cfg.model.name).embed_name)
        assert any(e in m for m in cfg.lora.target_modules for e in time_embedder)
    emd = {("sd35", "full"): 0.99, ("sd35", "lora", 1): 0.0, ("sd35", "lora", 2): 0.99,
           ("qwen_image", "full"): 0.0, ("qwen_image", "lora", 1): 1.0, ("qwen_image", "lora", 2): 0.99,
           ("sana", "full"): 0.999, ("sana", "lora", 1): 0.0, ("sana", "lora", 2): 0.99}
    want = emd[(fam, kind)] if kind == "full" else emd[(fam, kind, int(order[0]))]
    assert tf.ema_decay_rate == want
    assert tf.enhanced_ratio == (4.0 if (fam, kind, order) == ("qwen_image", "lora", "1order") else 0.8)
    assert tf.dist_match_cof == (0.75 if key == "sana" else 0.5)
    assert t.batch_size == {"sd35": 8 if lora else 16, "qwen_image": 4, "sana": 16}[fam]
    assert "Sana / OpenUni" not in path.read_text().splitlines()[0]
    assert t.batch_size >= 4  # the four TwinFlow sub-batches


def test_overrides_apply_and_validate(tmp_path):
    cfg = load_config(CONFIGS[0], ["training.lr=3e-4", "lora.target_modules=[to_q, to_k]", "data.shuffle=false"])
    assert cfg.training.lr == 3e-4 and cfg.lora.target_modules == ["to_q", "to_k"] and cfg.data.shuffle is False
    expect_error(ValueError, lambda: load_config(CONFIGS[0], ["training.lr"]), contains=("key=value", "training.lr"))
    expect_error(ValueError, lambda: load_config(CONFIGS[0], ["training.nope=1"]),
                 contains=(CONFIGS[0].name, "training.nope", "unknown key"))
    expect_error(TypeError, lambda: load_config(CONFIGS[0], ["training.batch_size=many"]),
                 contains=("training.batch_size", "integer"))


@pytest.mark.parametrize("raw, exc, words", [
    ({"modle": {}}, ValueError, ["modle", "unknown key"]),
    ({"training": {"lr": "fast"}}, TypeError, ["training.lr", "number"]),
    ({"training": {"batch_size": 0}}, ValueError, ["training.batch_size", ">= 1"]),
    ({"training": {"strategy": "zero3"}}, ValueError, ["training.strategy", "zero3"]),
    ({"training": {"adam_betas": [0.9]}}, ValueError, ["training.adam_betas", "2 values"]),
    ({"training": {"adam_betas": [0.9, 1.5]}}, ValueError, ["training.adam_betas[1]", "[0, 1)"]),
    ({"training": {"lr_scheduler": "wiggly"}}, ValueError, ["training.lr_scheduler", "wiggly"]),
    ({"model": {"name": "hidream"}}, ValueError, ["model.name", "hidream"]),
    ({"model": {"pretrained_model_name_or_path": ""}}, ValueError, ["model.pretrained_model_name_or_path"]),
    ({"lora": {"enabled": True}}, ValueError, ["lora.target_modules"]),
    ({"lora": {"enabled": True, "target_modules": ["to_q"]}, "training": {"strategy": "fsdp"}},
     ValueError, ["training.strategy", "DDP"]),
    ({"twinflow": {"estimate_order": -1}}, ValueError, ["twinflow", "estimate_order"]),
    ({"twinflow": {"sub_batches": {"e2e": 1, "fake": 1}}}, ValueError, ["twinflow", "fake"]),
    ({"sampling": {"sampling_steps": 0}}, ValueError, ["sampling"]),
    ({"data": {"resolution": "big"}}, TypeError, ["data.resolution", "integer"]),
    ({"data": {"num_frames": 5}}, ValueError, ["data.num_frames", "sd3 is an image family"]),
    ({"data": {"frame_stride": 0}}, ValueError, ["data.frame_stride", ">= 1"]),
])
def test_errors_name_file_and_key(raw, exc, words):
    merged = {k: dict(v) for k, v in BASE.items()}
    for k, v in raw.items():
        merged.setdefault(k, {}).update(v)
    expect_error(exc, lambda: parse_config(merged, "cfg.yaml"), contains=["cfg.yaml", *words])


def test_file_errors(tmp_path):
    expect_error(ValueError, lambda: load_config(tmp_path / "none.yaml"), contains="no such file")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    expect_error(ValueError, lambda: load_config(bad), contains=("bad.yaml", "invalid YAML"))
    bad.write_text("- a\n- b\n")
    expect_error(TypeError, lambda: load_config(bad), contains=("bad.yaml", "mapping"))


def test_objective_section_is_the_rust_declaration():
    """twinflow: holds exactly the objective's settings as _core.LOSS_SETTINGS declares them."""
    import dataclasses

    from twinflow._core import LOSS_SETTINGS
    from twinflow.training.config import TwinFlowConfig

    names = [f.name for f in dataclasses.fields(TwinFlowConfig)]
    assert names == ["recipe"] + [s["name"] for s in LOSS_SETTINGS] + ["batch_calls"]
    cfg = parse_config({"model": {"name": "sd3", "pretrained_model_name_or_path": "x"},
                        "twinflow": {"estimate_order": 3, "sub_batches": {"e2e": 1, "mul": 1, "any": 1, "adv": 0}}})
    assert cfg.twinflow.settings() == {"estimate_order": 3, "batch_calls": True,
                                       "sub_batches": {"e2e": 1.0, "mul": 1.0, "any": 1.0, "adv": 0.0}}
    from twinflow import TwinFlowLoss

    off = parse_config({"model": {"name": "sd3", "pretrained_model_name_or_path": "x"},
                        "twinflow": {"batch_calls": False}})
    assert TwinFlowLoss(off.twinflow.recipe, **off.twinflow.settings()).batch_calls is False
    expect_error(TypeError, lambda: parse_config({"model": {"name": "sd3", "pretrained_model_name_or_path": "x"},
                                                  "twinflow": {"estimate_order": 1.5}}),
                 contains=("twinflow.estimate_order",))


def test_train_config_is_a_deprecated_name_of_run_config():
    from twinflow.training import config

    with pytest.warns(DeprecationWarning, match="RunConfig"):
        assert config.TrainConfig is config.RunConfig


def test_sections_use_the_settings_own_names():
    """sampling: and twinflow: take the names UnifiedSampler and TwinFlowLoss take (the
    settings tables), so a key means the same thing everywhere."""
    import dataclasses

    from twinflow._core import LOSS_SETTINGS, SAMPLER_SETTINGS
    from twinflow.training.config import SamplingConfig

    sampler_keys = set(SamplingConfig().sampler_kwargs())
    assert sampler_keys <= {s["name"] for s in SAMPLER_SETTINGS}
    assert sampler_keys <= {f.name for f in dataclasses.fields(SamplingConfig)}
    cfg = parse_config({**BASE, "twinflow": {s["name"]: s["default"] for s in LOSS_SETTINGS}}, "cfg.yaml")
    assert set(cfg.twinflow.settings()) - {"batch_calls"} == {s["name"] for s in LOSS_SETTINGS}


@pytest.mark.parametrize("old,new,value", [("steps", "sampling_steps", 3), ("order", "sampling_order", 2)])
def test_old_sampling_names_load_with_a_warning(old, new, value):
    merged = {**BASE, "sampling": {old: value}}
    with pytest.warns(DeprecationWarning, match=f"sampling.{old} is now {new}"):
        cfg = parse_config(merged, "cfg.yaml")
    assert getattr(cfg.sampling, new) == value
    expect_error(ValueError, lambda: parse_config({**BASE, "sampling": {old: value, new: value}}, "cfg.yaml"),
                 contains=["cfg.yaml", f"sampling.{old}", new])
