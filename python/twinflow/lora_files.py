"""TwinFlow LoRA weights in diffusers' own LoRA layout.

``save(folder, transformer, adapter, model)`` writes what the pipeline class's
``save_lora_weights`` writes (``pytorch_lora_weights.safetensors``, keys under
``transformer.``, the adapter's LoraConfig as metadata so rank and alpha load back exactly)
plus ``twinflow_lora.json``, the record of what it is (``twinflow.saved_format``: backbone,
mode "lora", format). Two ways to load it:

    pipe = twinflow.load_pipeline(base, lora=folder)                 # model and mode from the record
    pipe = twinflow.load_pipeline(base, model="sd3", mode="lora")    # or by hand: the patched base,
    pipe.load_lora_weights(folder)                                   # then diffusers' stock loader

A TwinFlow LoRA is trained with the LoRA-mode patch (single time label t − tt/2, docs/algorithm.md §4):
on a pipeline loaded in mode "aux", or on the unpatched stock pipeline, it is a different
model, which ``load_pipeline`` refuses.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import pathlib
from typing import Optional, Tuple, Union

import torch

from . import diffusers_patch

from . import _files
from .saved_format import check_record, make_record

__all__ = ["WEIGHT_NAME", "RECORD_NAME", "ADAPTER_NAME", "supported", "save", "read", "load_into"]

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default name
RECORD_NAME = "twinflow_lora.json"
#: the adapter name ``load_pipeline(..., lora=)`` gives the loaded LoRA
ADAPTER_NAME = "twinflow"


def supported(model: str) -> bool:
    """Whether the backbone's pipeline class has diffusers' LoRA loader (all stock pipelines
    here; not OpenUni's own pipeline)."""
    return hasattr(diffusers_patch.backbone(model).pipeline_class(), "save_lora_weights")


def save(folder: Union[str, os.PathLike], transformer: torch.nn.Module, adapter_name: str, model: str) -> pathlib.Path:
    """Write the peft adapter `adapter_name` of `transformer` (a TwinFlow `model` backbone)
    with the pipeline class's ``save_lora_weights``, and the record. Returns the folder."""
    from peft import get_peft_model_state_dict

    bb = diffusers_patch.backbone(model)
    cls = bb.pipeline_class()
    if not supported(model):
        raise ValueError(f"{bb.name}: {cls.__name__} has no diffusers LoRA loader; keep the merged export instead")
    folder = pathlib.Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in
             get_peft_model_state_dict(transformer, adapter_name=adapter_name).items()}
    if not state:
        raise ValueError(f"the transformer has no LoRA adapter {adapter_name!r}")
    kw = {}
    if "transformer_lora_adapter_metadata" in inspect.signature(cls.save_lora_weights).parameters:
        kw["transformer_lora_adapter_metadata"] = transformer.peft_config[adapter_name].to_dict()
    cls.save_lora_weights(str(folder), transformer_lora_layers=state, weight_name=WEIGHT_NAME,
                          safe_serialization=True, **kw)
    (folder / RECORD_NAME).write_text(json.dumps({"_twinflow": make_record(bb.name, "lora")}, indent=1) + "\n")
    return folder


def read(lora: Union[str, os.PathLike]) -> Tuple[pathlib.Path, Optional[dict]]:
    """(weights file, record or None) of `lora`: a folder holding ``pytorch_lora_weights.safetensors``
    or that file itself. A record of another mode than "lora" is a ValueError."""
    if not isinstance(lora, (str, os.PathLike)):
        raise ValueError(f"lora: expected a folder or a .safetensors file, got {type(lora).__name__}")
    p = pathlib.Path(lora).expanduser()
    if p.is_dir():
        p = p / WEIGHT_NAME
    if not p.is_file():
        raise FileNotFoundError(f"lora: {p}: no such file (a folder written by twinflow's LoRA export holds "
                                f"{WEIGHT_NAME})")
    if p.suffix != ".safetensors":
        raise ValueError(f"lora: {p}: only safetensors LoRA files are read")
    _files.regular_file(p)
    record_path = p.parent / RECORD_NAME
    record = None
    if record_path.is_file():
        record = check_record(_files.read_json(record_path).get("_twinflow"), str(record_path))
        if record is not None and record["mode"] != "lora":
            raise ValueError(f"{record_path}: records mode {record['mode']!r}; a LoRA is mode 'lora'")
    return p, record


# diffusers' loaders log "No LoRA keys associated to <text encoder> found with the
# prefix='text_encoder...'" once per text encoder when a LoRA, as ours, holds transformer keys
# only: harmless here (load_into counts that every transformer tensor landed), and three such
# paragraphs per load hid real messages. Only those records are dropped, only during the load.
_LOADER_LOGGERS = ("diffusers.loaders.lora_base", "diffusers.loaders.lora_pipeline", "diffusers.loaders.peft")


class _TextEncoderLoraNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("No LoRA keys associated to" in msg and "prefix='text_encoder" in msg)


@contextlib.contextmanager
def _quiet_text_encoder_notices():
    notice, loggers = _TextEncoderLoraNotice(), [logging.getLogger(n) for n in _LOADER_LOGGERS]
    for lg in loggers:
        lg.addFilter(notice)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(notice)


def load_into(pipe, lora_file: pathlib.Path) -> None:
    """``pipe.load_lora_weights`` of the file, checked: every LoRA tensor of the file for the
    transformer must land in it (diffusers only logs keys it cannot place)."""
    from safetensors import safe_open

    if not hasattr(pipe, "load_lora_weights"):
        raise ValueError(f"lora: {type(pipe).__name__} has no diffusers LoRA loader")
    try:
        with safe_open(str(lora_file), framework="pt") as f:
            wanted = sum(1 for k in f.keys() if k.startswith("transformer.") and ".lora_" in k)
    except Exception as e:  # SafetensorError, OSError
        raise ValueError(f"{lora_file}: corrupt or not a safetensors file ({e})") from e
    if not wanted:
        raise ValueError(f"{lora_file}: no LoRA weights for the transformer (keys transformer.*.lora_A/B)")
    try:
        with _quiet_text_encoder_notices():
            pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name=ADAPTER_NAME)
    except (ValueError, KeyError, RuntimeError, IndexError, TypeError) as e:  # diffusers' own, unwrapped
        raise ValueError(f"{lora_file}: diffusers could not load it as a LoRA of the "
                         f"{type(pipe.transformer).__name__}: {e}") from e
    got = sum(1 for n, _ in pipe.transformer.named_parameters() if f".{ADAPTER_NAME}." in n and ".lora_" in n)
    if got != wanted:
        raise ValueError(f"{lora_file}: {wanted} LoRA tensors for the transformer, {got} of them loaded: the "
                         "LoRA does not fit this transformer")
