"""GGUF transformers: what the community runs on 12–24 GB cards, read and written.

Reading (``load_pipeline(base, model=..., transformer="x-Q8_0.gguf")``): the file's tensors are
read with diffusers' GGUF reader and the transformer is built with diffusers'
``from_single_file`` and ``GGUFQuantizationConfig`` (weights stay quantized, dequantized per
layer at call time). The aux target-time embedder comes from, in this order: the file itself
(its tensors dequantized to float32; a file some writer quantized them in is used as stored),
``aux_weights=`` (a safetensors file or a transformer folder), else — for an aux-mode load — a
ValueError naming both options: a TwinFlow checkpoint never falls back to a fresh aux embedder.

Writing (``twinflow export-gguf SOURCE --type Q8_0|Q4_K|BF16 -o out.gguf``): the transformer
of a TwinFlow pipeline folder or transformer folder, diffusers key names (diffusers' single-file
loader reads them as they are), the time embedders and every 1-D or small tensor in float32
(never quantized), the other linear-layer weights in the chosen type (diffusers' GGUF loader
computes only with those quantized; a Q4_K row that is not a multiple of 256 values falls back
to Q8_0). The file records what it is
(``twinflow.backbone``, ``twinflow.mode``, ``twinflow.transformer_config``), so loading it
needs neither ``--model`` nor the base's transformer config.

``gguf`` writes Q8_0 and BF16 itself; it has no Q4_K encoder, so ``quantize_q4_k`` encodes
that (per 32-value sub-block: scale and minimum from the block's range, 6-bit sub-scales
under fp16 super-block factors), and the round trip is checked against gguf's own decoder.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

from . import _files

__all__ = ["GGUF_TYPES", "export_gguf", "is_gguf_path", "load_transformer", "quantize_q4_k", "read_record"]

#: the types ``export_gguf`` writes
GGUF_TYPES = ("Q8_0", "Q4_K", "BF16")
#: tensors with fewer elements stay float32 (biases, norms, modulation vectors)
SMALL = 4096
_PREFIX = "model.diffusion_model."  # ComfyUI-style files put every key under it


def _gguf():
    from .quantization import require_backend

    require_backend("gguf")
    import gguf

    return gguf


def is_gguf_path(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and str(path).lower().endswith(".gguf")


def resolve_gguf_file(path: Union[str, os.PathLike], revision: Optional[str] = None) -> pathlib.Path:
    """A local .gguf file, or ``org/name/path/in/repo.gguf`` on the Hub (huggingface_hub's cache;
    HF_HUB_OFFLINE=1 reads the cache only)."""
    local = pathlib.Path(path).expanduser()
    if local.exists():
        return _files.regular_file(local)
    parts = str(path).split("/")
    if len(parts) >= 3 and not str(path).startswith(("/", ".", "~")) and ".." not in parts:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

        offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
        try:
            return pathlib.Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), revision=revision,
                                                cache_dir=cache, local_files_only=offline))
        except (LocalEntryNotFoundError, EntryNotFoundError, RepositoryNotFoundError) as e:
            raise FileNotFoundError(f"{path}: no such local file, and not in the Hugging Face cache {cache} "
                                    f"({type(e).__name__})") from e
    raise FileNotFoundError(f"{path}: no such GGUF file (a local path, or org/name/file.gguf on the Hub)")


def _reader(path: pathlib.Path):
    gguf = _gguf()
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # ValueError, struct errors, OSError: not a GGUF file or truncated
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def _field_str(reader, key: str) -> Optional[str]:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as e:
        raise ValueError(f"GGUF metadata {key}: not a string ({e})") from e


def read_record(path: pathlib.Path) -> Tuple[Optional[dict], Optional[dict]]:
    """(the saved-format record, the transformer config) a twinflow-written file carries, or
    (None, None) for another writer's file."""
    from .saved_format import check_record

    reader = _reader(path)
    backbone, mode = _field_str(reader, "twinflow.backbone"), _field_str(reader, "twinflow.mode")
    config = _field_str(reader, "twinflow.transformer_config")
    record = None
    if backbone is not None:
        record = check_record({"format": 1, "backbone": backbone, "mode": mode}, str(path))
    try:
        config = None if config is None else json.loads(config)
    except ValueError as e:
        raise ValueError(f"{path}: twinflow.transformer_config is not JSON ({e})") from e
    return record, config


def _dequantized(t: torch.Tensor) -> torch.Tensor:
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    return dequantize_gguf_tensor(t).float() if hasattr(t, "quant_type") else t.float()


def _aux_from_file(aux_weights, prefix: str) -> Dict[str, torch.Tensor]:
    from safetensors import safe_open

    from .pipelines import read_aux_weights

    path = pathlib.Path(aux_weights).expanduser()
    if path.is_dir():
        return read_aux_weights(path, prefix)
    _files.regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except Exception as e:
        raise ValueError(f"aux_weights={str(aux_weights)!r}: not a safetensors file or transformer folder ({e})") from e


def load_transformer(bb, path: pathlib.Path, *, config_root: Optional[pathlib.Path], dtype: Optional[torch.dtype],
                     mode: str, aux_weights=None, config: Optional[dict] = None):
    """(the quantized transformer, its aux weights, where they came from) for a GGUF file."""
    _gguf()
    import diffusers
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    try:
        state = load_gguf_checkpoint(str(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    aux, source = {}, str(path)
    for key in list(state):
        bare = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if bare.startswith(bb.aux_prefix):
            aux[bare] = _dequantized(state.pop(key))
    if not any((k[len(_PREFIX):] if k.startswith(_PREFIX) else k).startswith(bb.embed_name + ".") for k in state):
        raise ValueError(f"{path}: holds no {bb.embed_name}.* tensors: not a {bb.label} transformer "
                         f"({bb.transformer_class_name}); pass the right model=")
    if aux_weights is not None:
        if aux:
            raise ValueError(f"aux_weights={str(aux_weights)!r}: {path} holds its own aux target-time embedder "
                             f"({bb.aux_prefix}*); give one source")
        aux, source = _aux_from_file(aux_weights, bb.aux_prefix), str(aux_weights)
        if not aux:
            raise ValueError(f"aux_weights={str(aux_weights)!r}: holds no {bb.aux_prefix}* tensors")
    if mode == "aux" and not aux:
        raise ValueError(f"{path}: holds no aux target-time embedder ({bb.aux_prefix}*), which a TwinFlow "
                         f"transformer in mode 'aux' needs: pass aux_weights= (a safetensors file or the "
                         f"checkpoint's transformer folder holding {bb.aux_prefix}*), or load it with mode='lora' "
                         "if it is a LoRA-mode model")
    compute = dtype or torch.float32
    with tempfile.TemporaryDirectory(prefix="twinflow-gguf-config-") as tmp:
        if config is not None:
            (pathlib.Path(tmp) / "config.json").write_text(json.dumps(config))
            where = dict(config=tmp)
        elif config_root is not None and (config_root / "transformer" / "config.json").is_file():
            where = dict(config=str(config_root), subfolder="transformer")
        else:
            raise ValueError(f"{path}: the file records no transformer config, and the base pipeline has no "
                             "transformer/config.json to take it from")
        try:
            module = bb.transformer_class().from_single_file(
                state, **where, local_files_only=True, dtype=compute,
                quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=compute))
        except (OSError, RuntimeError, ValueError, KeyError, TypeError, NotImplementedError) as e:
            why = _mismatch(bb, state, where) or str(e)
            raise ValueError(f"{path}: could not load it as a {bb.transformer_class_name}: {why}") from e
    missing = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(f"{path}: not a complete {bb.transformer_class_name}: {len(missing)} tensors missing "
                         f"({missing[0]}, ...); a file of another backbone or size?")
    return module, aux, source


def _mismatch(bb, state: dict, where: dict) -> Optional[str]:
    """What does not fit between a file's tensors and the transformer its config describes
    (None when nothing obvious: then diffusers' own message is the best one)."""
    try:
        cls = bb.transformer_class()
        config = cls.load_config(where["config"], subfolder=where.get("subfolder"), local_files_only=True)
        with torch.device("meta"):
            model = cls.from_config(config)
    except Exception:  # the diagnosis must never hide the original error
        return None
    expected = model.state_dict()
    keys = {k[len(_PREFIX):] if k.startswith(_PREFIX) else k: v for k, v in state.items()}
    missing = sorted(set(expected) - set(keys))
    if missing and len(missing) < len(expected):  # diffusers key names, some absent: another backbone
        return (f"it lacks {len(missing)} of the {len(expected)} tensors of a {bb.label} transformer "
                f"({missing[0]}, ...): a file of another backbone?")
    from diffusers.quantizers.gguf.utils import GGML_QUANT_SIZES, _quant_shape_from_byte_shape

    for k, v in keys.items():
        if k in expected:
            shape = tuple(v.shape)
            if hasattr(v, "quant_type"):
                block, size = GGML_QUANT_SIZES[v.quant_type]
                shape = tuple(_quant_shape_from_byte_shape(v.shape, size, block))
            if shape != tuple(expected[k].shape):
                return (f"tensor {k} has shape {shape}, the {bb.label} transformer of this config expects "
                        f"{tuple(expected[k].shape)}: a file of another size?")
    return None


# ----------------------------------------------------------------------------- writing

def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Q4_K blocks (uint8, 144 bytes per 256 values) of a float array whose last dimension is a
    multiple of 256, in ggml's layout (gguf.quants' decoder reads it back)."""
    shape = x.shape
    blocks = x.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(blocks.min(axis=-1), 0.0)
    hi = np.maximum(blocks.max(axis=-1), lo)
    scale, mins = (hi - lo) / 15.0, -lo
    d = (scale.max(axis=-1) / 63.0).astype(np.float16)
    dmin = (mins.max(axis=-1) / 63.0).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.clip(np.ceil(scale / np.where(d32 > 0, d32, 1)), 0, 63), 0).astype(np.uint8)
        m = np.where(dmin32 > 0, np.clip(np.rint(mins / np.where(dmin32 > 0, dmin32, 1)), 0, 63), 0).astype(np.uint8)
        step = (d32 * sc)[..., None]
        q = np.where(step > 0, np.rint((blocks + (dmin32 * m)[..., None]) / np.where(step > 0, step, 1)), 0)
    q = np.clip(q, 0, 15).astype(np.uint8)
    n = blocks.shape[0]
    scales = np.zeros((n, 12), dtype=np.uint8)
    scales[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, 128)
    out = np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), scales, qs], axis=1)
    return out.reshape(*shape[:-1], shape[-1] // 256 * 144)


def _backbone_of(config: dict, where: pathlib.Path):
    from . import diffusers_patch
    from .saved_format import KEY, check_record

    record = check_record(config.get(KEY), str(where / "config.json"))
    if record is not None:
        return diffusers_patch.backbone(record["backbone"]), record["mode"]
    cls = str(config.get("_class_name", "")).removesuffix("Wrapper")
    for bb in diffusers_patch.backbones().values():
        if bb.transformer_class_name == cls:
            return bb, None  # not saved by twinflow: the file records no mode, loading it needs model=
    raise ValueError(f"{where / 'config.json'}: {config.get('_class_name')!r} is not a registered TwinFlow backbone")


def _tensor_type(gguf, qtype, t: torch.Tensor, keep: bool):
    """The GGUF type of one tensor: None (float32) for what stays unquantized, else `qtype`, or
    Q8_0 when a row does not divide into Q4_K's 256-value blocks (as llama.cpp falls back; e.g.
    SD3.5-large's 2432-wide layers)."""
    if keep or t.numel() < SMALL:
        return None
    if t.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    q8 = gguf.GGMLQuantizationType.Q8_0
    return q8 if t.shape[-1] % gguf.GGML_QUANT_SIZES[q8][0] == 0 else None


def _linear_weights(bb, config: dict) -> set:
    """The weight names of the transformer's nn.Linear layers (built on the meta device from
    `config`): the only tensors diffusers' GGUF loader computes with quantized (GGUFLinear)."""
    cls = bb.transformer_class()
    with torch.device("meta"):
        model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def export_gguf(source: Union[str, os.PathLike], out: Union[str, os.PathLike], gguf_type: str = "Q8_0") -> dict:
    """Write the transformer of `source` (a TwinFlow pipeline folder or transformer folder) to
    the GGUF file `out`. Returns a summary: {"backbone", "mode" (None when the source records
    none: a stock or published transformer), "type", "tensors", "quantized", "bytes"}."""
    gguf = _gguf()
    from safetensors import safe_open

    from .pipelines import _transformer_folder, transformer_weight_files

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"type: expected one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    tdir = _transformer_folder(source)  # a transformer folder, or a pipeline folder / Hub repo holding one
    config = _files.read_json(tdir / "config.json")
    bb, mode = _backbone_of(config, tdir)
    qtype = getattr(gguf.GGMLQuantizationType, gguf_type)
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), arch=bb.name.replace("-", "_"))
    if mode is not None:  # the source's own record, carried over (never invented)
        writer.add_string("twinflow.backbone", bb.name)
        writer.add_string("twinflow.mode", mode)
    writer.add_string("twinflow.transformer_config",
                      json.dumps({k: v for k, v in config.items() if not k.startswith("_twinflow")}))
    keep = (bb.embed_name + ".", bb.aux_prefix)
    linear = _linear_weights(bb, config)
    quantized = total = 0
    for f in sorted(set(transformer_weight_files(tdir).values())):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                t = h.get_tensor(key).float()
                total += 1
                kind = _tensor_type(gguf, qtype, t, key.startswith(keep) or key not in linear)
                if kind is None:
                    writer.add_tensor(key, t.numpy())
                    continue
                arr = t.numpy()
                data = quantize_q4_k(arr) if kind == gguf.GGMLQuantizationType.Q4_K else gguf.quants.quantize(arr, kind)
                writer.add_tensor(key, data, raw_dtype=kind)
                quantized += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"backbone": bb.name, "mode": mode, "type": gguf_type, "tensors": total, "quantized": quantized,
            "bytes": out.stat().st_size}

