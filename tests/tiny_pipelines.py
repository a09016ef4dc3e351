"""Tiny random-weight diffusers pipelines (every family in ``twinflow.tiny.BACKBONES``) for tests: the
builders are ``twinflow.tiny`` (also ``twinflow tiny-pipeline``); this module saves them.

``saved_pipeline(model, layout)`` saves a pipeline with ``save_pretrained`` into a temporary
folder once per test session and returns the folder:

* ``"stock"``: the stock pipeline (transformer without aux weights);
* ``"aux"``: the published TwinFlow layout: the transformer's safetensors also hold the aux
  target-time embedder (patched, then perturbed so it differs from its initial copy);
* ``"sharded"``: ``"aux"`` with the transformer split into several safetensors files plus
  ``diffusion_pytorch_model.safetensors.index.json``.

``strict_warnings()`` turns every warning into an error but diffusers' own deprecations listed
in ``FOREIGN_WARNINGS``. ``TEST_SIZE`` is an image size every tiny pipeline accepts. Editing
families take a reference image (``reference_image``, ``edit_kwargs``); ``PIPELINES`` are the
families the generic pipeline suites generate with (``SLOW_PIPELINES`` left out),
``TRANSFORMER_FAMILIES`` those the transformer-level suites (GGUF, quantization, offloading)
need (``VARIANTS`` left out). ``one_thread`` is a module-scoped
autouse fixture (import it into a test module): ``tiny_threads()`` torch threads (1 unless
``$TWINFLOW_TEST_THREADS`` says otherwise) while the module runs.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import json
import os
import pathlib
import shutil
import tempfile
import warnings
from typing import Dict, Tuple

import pytest
import torch

# The builders live in the package (``twinflow tiny-pipeline`` makes the same folders).
from twinflow.tiny import (BACKBONES, BUILDERS, TEST_SIZE, TRANSFORMERS, _qwen_tokenizer,  # noqa: E402,F401
                           _sana_transformer, build, build_qwen_image, build_sana, build_sd3, build_transformer,
                           build_z_image, tiny_dc_ae)

_ROOT = None
_CACHE: Dict[Tuple[str, str], pathlib.Path] = {}

#: Qwen-Image-Edit's pipelines VAE-encode every reference at about 1 MP (the size is fixed inside
#: diffusers: ≈ 3 s per image on the tiny model, CPU conv3d) and need torchvision (their
#: Qwen2VLProcessor): the generic pipeline suites leave them out, tests/pipelines/test_edit_pipelines.py
#: takes them through loading, generation, save → load, the CLI and a training step.
SLOW_PIPELINES = ("qwen-image-edit", "qwen-image-edit-plus")
PIPELINES = tuple(m for m in BACKBONES if m not in SLOW_PIPELINES)
#: families whose transformer class and other components another family already takes through the
#: transformer-level suites (GGUF export, quantized and offloaded loading): only the pipeline
#: class differs (FLUX Kontext's is FLUX's transformer, text encoders and VAE class)
VARIANTS = {"flux-kontext": "flux", "qwen-image-edit": "qwen-image", "qwen-image-edit-plus": "qwen-image"}
TRANSFORMER_FAMILIES = tuple(m for m in BACKBONES if m not in VARIANTS)


def needs_pipeline(model: str) -> None:
    """Skip the calling test when this environment cannot build `model`'s pipeline (its
    ``check_environment``: Qwen-Image-Edit's processor needs torchvision)."""
    from twinflow import diffusers_patch

    try:
        diffusers_patch.backbone(model).check_environment()
    except ImportError as e:
        pytest.skip(str(e))


def family_inputs(model: str, transformer, batch: int, seed: int = 4):
    """Random inputs of the trainer's model call on a family's tiny transformer, built from its
    config: latents x [B, C, 8, 8] (C: the packed families' channels / 4; a video family's
    [B, C, 2, 8, 8], 2 latent frames) and the cond list — the text tensors (a sequence of 5, then
    pooled text or a mask when the family has two), then for an editing family reference
    latents [B, C, 4, 6] (another shape than x: its own token grid)."""
    from twinflow.diffusers_patch import backbone

    bb = backbone(model)
    cfg, g = transformer.config, torch.Generator().manual_seed(seed)
    packed = type(transformer).__name__ in ("QwenImageTransformer2DModel", "FluxTransformer2DModel",
                                            "ChromaTransformer2DModel")  # 2×2-packed tokens inside the call
    channels = cfg.in_channels // 4 if packed else cfg.in_channels
    width = next(cfg[k] for k in ("joint_attention_dim", "caption_channels", "cap_feat_dim", "text_dim") if k in cfg)
    x = torch.randn(batch, channels, *((2,) if bb.video else ()), 8, 8, generator=g)
    cond = [torch.randn(batch, 5, width, generator=g)]
    if len(bb.text_keys) > 1:
        if "pooled_projection_dim" in cfg and cfg.get("pooled_projection_dim"):
            cond.append(torch.randn(batch, cfg.pooled_projection_dim, generator=g))
        else:
            cond.append(torch.ones(batch, 5, dtype=torch.long))
    if bb.edit:
        cond.append(torch.randn(batch, channels, 4, 6, generator=g))
    return x, cond


def perturb(module, seed: int = 5, prefix: str = "") -> None:
    """Add 0.5·N(0, 1) noise (seeded) to `module`'s parameters whose names start with `prefix`:
    trained-looking weights, e.g. an aux embedder whose term must still vanish at tt = t."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith(prefix):
                p.add_(0.5 * torch.randn(p.shape, generator=g))


def reference_image(size: int = TEST_SIZE, seed: int = 0):
    """A seeded random RGB image: the reference image of the editing families' tests."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8"))


def edit_kwargs(model: str, image=None) -> dict:
    """The pipeline arguments of an editing family's reference for one prompt (``image`` and FLUX
    Kontext's ``_auto_resize=False``: the tiny reference is used at its own size, not at 1 MP);
    {} for other families."""
    from twinflow.diffusers_patch import backbone

    bb = backbone(model)
    if not bb.edit:
        return {}
    kw = {"image": reference_image() if image is None else image}
    if model == "flux-kontext":
        kw["_auto_resize"] = False
    return kw


#: warnings of other libraries that no twinflow code can avoid: diffusers 0.42's
#: ChromaTransformer2DModel builds the deprecated diffusers.models.embeddings.FluxPosEmbed alias
FOREIGN_WARNINGS = (r"`FluxPosEmbed` is deprecated",)


@contextlib.contextmanager
def strict_warnings(ignore_all: bool = False):
    """Every warning is an error inside (all ignored with `ignore_all`), but FOREIGN_WARNINGS."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if ignore_all else "error")
        for message in FOREIGN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        yield


THREADS_ENV = "TWINFLOW_TEST_THREADS"


def tiny_threads() -> int:
    """Torch threads for tiny-model tests: 1 (thread start-up dominates tiny models, 25× slower on
    the shared 2-core machine), or ``$TWINFLOW_TEST_THREADS``: tests/package/test_thread_counts.py reruns
    the ``exact`` tests under 1 and 2 so a thread count cannot hide a layout dependence."""
    return int(os.environ.get(THREADS_ENV, "1"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(tiny_threads())
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- saved folders

def _root() -> pathlib.Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = pathlib.Path(tempfile.mkdtemp(prefix="twinflow-tiny-pipelines-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def trained_aux_transformer(model: str, transformer: torch.nn.Module) -> torch.nn.Module:
    """A patched copy of `transformer` whose aux embedder no longer equals its initial copy of
    the main one (stands in for trained aux weights)."""
    from twinflow import diffusers_patch

    with torch.random.fork_rng():  # SD3 and Sana draw their aux init from the global RNG
        torch.manual_seed(7)
        patched = diffusers_patch.patch(copy.deepcopy(transformer), model)
    g = torch.Generator().manual_seed(7)
    prefix = diffusers_patch.module_for(model).AUX_PREFIX
    with torch.no_grad():
        for name, p in patched.named_parameters():
            if name.startswith(prefix):
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return patched


def saved_pipeline(model: str, layout: str = "stock") -> pathlib.Path:
    """The folder of a saved tiny pipeline (built once per session); see the module doc."""
    key = (model, layout)
    if key in _CACHE:
        return _CACHE[key]
    if layout not in ("stock", "aux", "sharded"):
        raise ValueError(f"layout: unknown {layout!r}")
    path = _root() / f"{model}-{layout}"
    needs_pipeline(model)
    if layout == "stock":
        build(model).save_pretrained(path)
    else:
        stock = saved_pipeline(model, "stock")
        shutil.copytree(stock, path)
        shutil.rmtree(path / "transformer")
        import diffusers

        cls_name = json.loads((stock / "transformer" / "config.json").read_text())["_class_name"]
        transformer = getattr(diffusers, cls_name).from_pretrained(stock / "transformer")
        patched = trained_aux_transformer(model, transformer)
        shard = "20KB" if layout == "sharded" else "10GB"
        patched.save_pretrained(path / "transformer", max_shard_size=shard)
    _CACHE[key] = path
    return path


def generate_images(pipe, model: str, steps: int = 2) -> torch.Tensor:
    """The images [B, 3, TEST_SIZE, TEST_SIZE] of one prompt at a fixed seed, guidance off, as
    every load-path test compares them."""
    from twinflow.diffusers_patch import backbone

    extra = {backbone(model).cfg_kwarg: 1.0, **backbone(model).exact_size_kwargs(TEST_SIZE, TEST_SIZE),
             **edit_kwargs(model)}
    if model == "sana":
        extra["complex_human_instruction"] = None
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(prompt="a cat", height=TEST_SIZE, width=TEST_SIZE, num_inference_steps=steps, output_type="pt",
                    generator=torch.Generator().manual_seed(0), **extra).images
