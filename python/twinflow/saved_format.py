"""What a saved TwinFlow pipeline says it is (the record ``twinflow.load_pipeline`` reads).

A pipeline loaded with ``twinflow.load_pipeline`` and saved with ``save_pretrained`` (and the
pipeline ``twinflow train`` exports) carries, under the key ``_twinflow``::

    {"format": 1, "backbone": "sd3", "mode": "aux"}

in ``transformer/config.json`` (a ``register_to_config`` entry of the transformer: diffusers
passes keys starting with "_" through without complaint) and in ``model_index.json``. There,
the transformer entry names this module as the library (``["twinflow.saved_format",
"SD3Transformer2DModel"]``): ``DiffusionPipeline.from_pretrained`` would otherwise load the
stock transformer without the TwinFlow target-time conditioning (a different model, with only
a warning about unexpected weights); the class it finds here refuses with an error that says
how to load the folder. ``transformer/`` itself stays a stock diffusers model folder.

The entry comes from the transformer itself: ``mark_pipeline`` gives the patched instance this
module as its ``__module__`` (an instance attribute; its class is untouched), which is what
diffusers' ``register_modules`` records, so the entry follows the transformer into
``from_pipe`` pipelines and through ``pipe.transformer = ...``.

``format`` is the version of this layout; a newer one than this twinflow knows is refused.
"""

from __future__ import annotations

import pathlib
from typing import Optional

from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin

from . import _files

__all__ = ["FORMAT_VERSION", "KEY", "TwinFlowTransformer", "make_record", "check_record", "mark_pipeline",
           "read_folder_record", "mark_model_index"]

FORMAT_VERSION = 1
KEY = "_twinflow"
#: the library of a saved TwinFlow pipeline's transformer entry in model_index.json
LIBRARY = __name__
_MODES = ("aux", "lora")
_REFUSERS: dict = {}


class TwinFlowTransformer(ModelMixin, ConfigMixin):
    """The transformer entry of a saved TwinFlow pipeline's model_index.json: loading it with
    plain diffusers (``DiffusionPipeline.from_pretrained``) raises ValueError naming
    ``twinflow.load_pipeline``, which loads and patches the stock transformer in ``transformer/``."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *args, **kwargs):
        where = pathlib.Path(str(pretrained_model_name_or_path or "."))
        raise ValueError(f"{where}: a TwinFlow transformer (saved by twinflow): plain diffusers would load it "
                         "without its target-time conditioning, a different model. Load the pipeline with "
                         "twinflow.load_pipeline(path) (install twinflow as its README says: it is not on PyPI)")


def __getattr__(name: str):
    """The stand-in of a registered backbone's transformer class (model_index.json names
    ``[LIBRARY, "<stock class>"]``): a TwinFlowTransformer subclass of that name."""
    from . import diffusers_patch

    if name not in {b.transformer_class_name for b in diffusers_patch.backbones().values()}:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _REFUSERS:
        _REFUSERS[name] = type(name, (TwinFlowTransformer,), {"__module__": __name__})
    return _REFUSERS[name]


def make_record(model: str, mode: str) -> dict:
    return {"format": FORMAT_VERSION, "backbone": model, "mode": mode}


def check_record(record, source: str) -> Optional[dict]:
    """A record read from `source` (None: none there) as {"format", "backbone", "mode"};
    ValueError when it is malformed, names an unknown backbone, or is of a newer format."""
    if record is None:
        return None
    from . import diffusers_patch

    if not isinstance(record, dict):
        raise ValueError(f"{source}: {KEY} must be an object, got {type(record).__name__}")
    fmt = record.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise ValueError(f"{source}: {KEY}.format must be a positive int, got {fmt!r}")
    if fmt > FORMAT_VERSION:
        raise ValueError(f"{source}: saved in TwinFlow format {fmt}, this twinflow reads up to {FORMAT_VERSION}: "
                         "upgrade twinflow")
    if record.get("mode") not in _MODES:
        raise ValueError(f"{source}: {KEY}.mode must be one of {_MODES}, got {record.get('mode')!r}")
    try:
        model = diffusers_patch.canonical_name(record.get("backbone"))
    except ValueError as e:
        raise ValueError(f"{source}: {KEY}.backbone: {e}") from None
    return make_record(model, record["mode"])


def mark_pipeline(pipe, model: str, mode: str) -> None:
    """Record (model, mode) in the pipeline's and its transformer's configs, so that
    ``save_pretrained`` writes a self-describing folder (see the module doc)."""
    record = make_record(model, mode)
    transformer = pipe.transformer
    transformer.register_to_config(**{KEY: record})
    object.__setattr__(transformer, "__module__", LIBRARY)  # diffusers_patch's unpatch removes it
    pipe.register_modules(transformer=transformer)  # the model_index entry: [LIBRARY, class name]
    pipe.register_to_config(**{KEY: record})


def mark_model_index(path: pathlib.Path, model: str, mode: str, unused: Optional[dict] = None) -> None:
    """What ``mark_pipeline`` does to a saved pipeline's model_index.json, on the file (for a
    pipeline folder written piece by piece, as the training export does). `unused`: the
    backbone's ``unused_components`` (components become ``[null, null]``, settings the value)."""
    import json

    index = _files.read_json(path)
    from . import diffusers_patch

    for name, value in (unused or {}).items():
        index[name] = [None, None] if isinstance(index.get(name), list) else value
    index[KEY] = make_record(model, mode)
    index["transformer"] = [LIBRARY, diffusers_patch.backbone(model).transformer_class_name]
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def read_folder_record(root: pathlib.Path, index: Optional[dict] = None) -> Optional[dict]:
    """The record of a pipeline folder (model_index.json, or its parsed `index`, and
    transformer/config.json; they must agree), or None when it has none."""
    if index is None:
        index = _files.read_json(root / "model_index.json")
    index = check_record(index.get(KEY), str(root / "model_index.json"))
    config = root / "transformer" / "config.json"
    inner = check_record(_files.read_json(config).get(KEY), str(config)) if config.is_file() else None
    if index is not None and inner is not None and index != inner:
        raise ValueError(f"{root}: model_index.json says {index}, transformer/config.json says {inner}")
    return index or inner
