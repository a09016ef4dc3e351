"""Checks of a pipeline folder's components before any weights load: what would otherwise
fail deep inside diffusers/transformers (an unknown class, a VAE of the wrong class, a
tokenizer folder without its vocabulary) or unpickle a file (``pytorch_model.bin``) gets a
one-line ValueError naming the component."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import re
from typing import Dict, List

import torch

__all__ = ["check_components", "PICKLE_SUFFIXES"]

# Formats that torch/transformers read with pickle; never loaded here.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Where component classes may come from (a saved pipeline names twinflow.scheduler for our
# scheduler, twinflow.openuni_pipeline for OpenUni's parts); diffusers would import
# any module named here.
LIBRARIES = ("diffusers", "transformers", "twinflow.scheduler", "twinflow.openuni_pipeline")
# A tokenizer needs one of these (fast tokenizer, BPE vocab, sentencepiece, WordPiece).
VOCAB_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model", "vocab.txt",
               "sentencepiece.bpe.model")


def _component_class(root: pathlib.Path, name: str, lib: str, cls: str):
    if not isinstance(cls, str) or not cls.isidentifier():
        raise ValueError(f"{root / 'model_index.json'}: {name}: invalid class name {cls!r}")
    if lib not in LIBRARIES:
        raise ValueError(f"{root / 'model_index.json'}: {name} comes from {lib!r}; only {LIBRARIES} are loaded")
    try:
        found = getattr(importlib.import_module(lib), cls, None)
    except ImportError as e:
        raise ValueError(f"{root / 'model_index.json'}: {name} needs {lib}, which is not installed ({e})") from e
    if found is None or not inspect.isclass(found):
        raise ValueError(f"{root / 'model_index.json'}: {name}: {lib} has no class {cls!r}")
    return found


def check_components(root: pathlib.Path, components: Dict[str, List], pipeline_cls) -> None:
    """`components`: model_index.json's {name: [library, class]} entries; `pipeline_cls` the
    diffusers pipeline class that will load them (its ``__init__`` annotations say which class
    each component must be)."""
    try:
        expected = {k: p.annotation for k, p in inspect.signature(pipeline_cls.__init__).parameters.items()}
    except (TypeError, ValueError):
        expected = {}
    for name, (lib, cls) in components.items():
        sub = root / name
        found = _component_class(root, name, lib, cls)
        want = expected.get(name)
        # Networks only (tokenizers and schedulers are interchangeable within their kind, and
        # the scheduler is replaced anyway); transformers' Auto classes are factories, not bases.
        strict = (inspect.isclass(want) and issubclass(want, torch.nn.Module)
                  and not want.__module__.startswith("transformers.models.auto."))
        if strict and not issubclass(found, want):
            raise ValueError(f"{sub}: {pipeline_cls.__name__} needs a {want.__name__} here, "
                             f"but model_index.json says {cls}")
        files = [p for p in sub.iterdir() if p.is_file()]
        pickled = sorted(p.name for p in files if p.suffix in PICKLE_SUFFIXES)
        if pickled and not any(p.suffix == ".safetensors" for p in files):
            raise ValueError(f"{sub}: weights only in pickle format ({', '.join(pickled)}); twinflow never "
                             "unpickles weights: convert them to safetensors")
        if "Tokenizer" in cls and not any((sub / f).exists() for f in VOCAB_FILES):
            raise ValueError(f"{sub}: the tokenizer has no vocabulary (none of {', '.join(VOCAB_FILES)})")
        _check_depth(sub)


# Config keys that count repeated blocks (SD3/Sana/Qwen "num_layers", Z-Image "n_layers",
# Flux-style "num_single_layers", transformers "num_hidden_layers", ...).
_DEPTH_KEY = re.compile(r"^(num_|n_)?(hidden_|single_|refiner_)?(layers|blocks|depth)$|^num_.*layers$")


def _check_depth(sub: pathlib.Path) -> None:
    """Refuse a config that asks for more blocks than its weights hold (``num_layers: 100000``
    would build 100000 blocks before the weights are even compared)."""
    from safetensors import safe_open

    from ._files import read_json

    config_path = sub / "config.json"
    weights = sorted(sub.glob("*.safetensors"))
    if not config_path.exists() or not weights:
        return
    config = read_json(config_path)
    indices = set()
    for f in weights:
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                indices.update(int(part) for part in key.split(".") if part.isdigit())
    most = max(indices, default=-1) + 1
    for key, value in _flatten(config):
        if _DEPTH_KEY.match(key) and isinstance(value, int) and not isinstance(value, bool) and value > most:
            raise ValueError(f"{config_path}: {key} = {value}, but the weights hold at most {most} blocks")


def _flatten(config: dict, depth: int = 0):
    for k, v in config.items():
        if isinstance(v, dict) and depth < 3:  # e.g. transformers' text_config
            yield from _flatten(v, depth + 1)
        else:
            yield k, v
