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
in ``FOREIGN_WARNINGS``. ``TEST_SIZE`` is an image size every tiny pipeline accepts. ``one_thread`` is a module-scoped
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

    extra = {backbone(model).cfg_kwarg: 1.0, **dict(backbone(model).exact_size)}
    if model == "sana":
        extra["complex_human_instruction"] = None
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(prompt="a cat", height=TEST_SIZE, width=TEST_SIZE, num_inference_steps=steps, output_type="pt",
                    generator=torch.Generator().manual_seed(0), **extra).images
