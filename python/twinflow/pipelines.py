"""Loading TwinFlow checkpoints into stock diffusers pipelines.

    pipe = twinflow.load_pipeline("TwinFlow-Qwen-Image", model="qwen-image", torch_dtype=torch.bfloat16,
                                  device="cuda")
    image = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]

``load_pipeline`` reads a local diffusers-format folder (``model_index.json``, ``transformer/``
with ``diffusion_pytorch_model.safetensors`` or shards plus their ``.index.json``, ``vae/``,
text encoders, tokenizers, ``scheduler/``) with the stock pipeline class, patches the
transformer with ``diffusers_patch`` (SPEC §4), loads the aux target-time embedder from the
transformer's safetensors (keys the stock class does not know, so diffusers skips them) and
installs a ``TwinFlowPresetScheduler`` wired to the transformer: each pipeline call gets the
published preset of its own ``num_inference_steps`` (``twinflow.scheduler.preset_for_steps``).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch

import diffusers_patch

from . import _files, _pipeline_checks
from .scheduler import TwinFlowPresetScheduler, TwinFlowScheduler

__all__ = ["MODELS", "ModelSpec", "load_pipeline", "check_pipeline_folder", "read_aux_weights", "load_aux_weights",
           "resolve_dtype", "resolve_device"]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = WEIGHTS_NAME + ".index.json"


@dataclass(frozen=True)
class ModelSpec:
    pipeline: str      # diffusers pipeline class
    transformer: str   # diffusers transformer class
    cfg_kwarg: str     # the pipeline argument that turns on classifier-free guidance (> 1)
    exact_size: Tuple[Tuple[str, object], ...] = ()  # pipeline arguments to render exactly height × width


MODELS: Dict[str, ModelSpec] = {
    "qwen-image": ModelSpec("QwenImagePipeline", "QwenImageTransformer2DModel", "true_cfg_scale"),
    "z-image": ModelSpec("ZImagePipeline", "ZImageTransformer2DModel", "guidance_scale"),
    "sd3": ModelSpec("StableDiffusion3Pipeline", "SD3Transformer2DModel", "guidance_scale"),
    # SanaPipeline otherwise renders at the nearest trained aspect-ratio bin and resizes.
    "sana": ModelSpec("SanaPipeline", "SanaTransformer2DModel", "guidance_scale", (("use_resolution_binning", False),)),
}


# ----------------------------------------------------------------------------- checks

def resolve_dtype(dtype) -> Optional[torch.dtype]:
    """None, a torch.dtype, or its name ("float32", "bfloat16", "float16", "fp16", "bf16")."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if isinstance(dtype, str) and dtype.lower() in names:
        return names[dtype.lower()]
    raise ValueError(f"torch_dtype: expected a torch.dtype or one of {sorted(names)}, got {dtype!r}")


def resolve_device(device) -> Optional[torch.device]:
    """None, "auto" (cuda when available, else cpu), or a torch device that exists here."""
    if device is None:
        return None
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: not a torch device: {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")
    return dev


def _read_json(path: pathlib.Path) -> dict:
    return _files.read_json(path)


def _check_safetensors(path: pathlib.Path) -> None:
    from safetensors import safe_open

    _files.regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # SafetensorError, OSError: header or size wrong
        raise ValueError(f"{path}: corrupt or not a safetensors file ({e})") from e


def transformer_weight_files(transformer_dir: pathlib.Path) -> Dict[str, pathlib.Path]:
    """{tensor key: file} from the sharded index, or {"": file} for a single file; checks that
    every file exists."""
    index = transformer_dir / WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no weight_map")
        files = {k: _files.inside(transformer_dir, v, index.name) for k, v in weight_map.items()}
        for f in set(files.values()):
            if not f.exists():
                raise FileNotFoundError(f"{f}: shard listed in {index.name} is missing")
            _files.regular_file(f)
        return files
    single = transformer_dir / WEIGHTS_NAME
    if not single.is_file():
        raise FileNotFoundError(f"{transformer_dir}: no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME} with its shards); "
                                "only safetensors checkpoints are supported")
    return {"": single}


def check_pipeline_folder(path: Union[str, os.PathLike], model: str) -> pathlib.Path:
    """Check a diffusers pipeline folder before diffusers reads it: model_index.json, every
    component folder it lists, JSON configs, safetensors headers, the transformer class.
    Returns the folder. FileNotFoundError / ValueError name the problem."""
    if model not in MODELS:
        raise ValueError(f"model: unknown {model!r}, expected one of {sorted(MODELS)}")
    root = pathlib.Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"model path {str(path)!r}: no such folder (load_pipeline reads a local "
                                "diffusers folder; download it first, e.g. huggingface_hub.snapshot_download)")
    index = root / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{root}: not a diffusers pipeline folder (no model_index.json)")
    components = {k: v for k, v in _read_json(index).items()
                  if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is not None}
    if "transformer" not in components:
        raise ValueError(f"{index}: lists no transformer")
    for name in components:
        sub = _files.inside(root, name, "model_index.json")
        if not sub.is_dir():
            raise FileNotFoundError(f"{sub}: missing (listed in model_index.json)")
        for f in sorted(sub.rglob("*")):  # nothing outside the folder; no FIFO that would block a reader
            _files.inside(root, f.relative_to(root))
            if not f.is_dir():
                _files.regular_file(f)
        for f in sorted(sub.glob("*.json")):
            _read_json(f)
        for f in sorted(sub.glob("*.safetensors")):
            _check_safetensors(f)
    tdir = root / "transformer"
    config = tdir / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: missing")
    found, want = _read_json(config).get("_class_name"), MODELS[model].transformer
    if found != want:
        raise ValueError(f"{config}: the transformer is a {found}, but model={model!r} needs a {want}")
    transformer_weight_files(tdir)
    import diffusers

    _pipeline_checks.check_components(root, components, getattr(diffusers, MODELS[model].pipeline))
    return root


# ----------------------------------------------------------------------------- aux weights

def read_aux_weights(transformer_dir: Union[str, os.PathLike], prefix: str) -> Dict[str, torch.Tensor]:
    """The tensors under `prefix` (e.g. "time_text_embed_2.") in a transformer folder's
    safetensors, single-file or sharded ({} when there are none)."""
    from safetensors import safe_open

    files = transformer_weight_files(pathlib.Path(transformer_dir))
    if "" in files:
        wanted: Dict[pathlib.Path, Optional[List[str]]] = {files[""]: None}
    else:  # sharded: open only the shards that hold aux keys
        wanted = {}
        for k, f in files.items():
            if k.startswith(prefix):
                wanted.setdefault(f, []).append(k)
    out = {}
    for f, keys in wanted.items():
        try:
            with safe_open(str(f), framework="pt") as h:
                available = set(h.keys())
                for k in (keys if keys is not None else [k for k in available if k.startswith(prefix)]):
                    if k not in available:
                        raise ValueError(f"{f}: tensor {k} listed in {WEIGHTS_INDEX_NAME} is missing")
                    out[k] = h.get_tensor(k)
        except ValueError:
            raise
        except Exception as e:  # SafetensorError, OSError
            raise ValueError(f"{f}: corrupt or not a safetensors file ({e})") from e
    return out


def load_aux_weights(transformer: torch.nn.Module, model: str, aux: Dict[str, torch.Tensor], source: str) -> None:
    """Copy aux weights into a patched transformer; warn and keep the initial copy of the main
    embedder when `aux` is empty; ValueError on missing, unknown or mis-shaped keys."""
    prefix = diffusers_patch.module_for(model).AUX_PREFIX
    state = transformer.state_dict()
    expected = {k for k in state if k.startswith(prefix)}
    if not expected:  # LoRA mode: no second embedder
        if aux:
            warnings.warn(f"{source}: {len(aux)} aux target-time weights ({prefix}*) ignored in LoRA mode",
                          stacklevel=3)
        return
    if not aux:
        warnings.warn(f"{source}: no aux target-time weights ({prefix}*) in the checkpoint; initialised them as "
                      "a copy of the main timestep embedder (the published initialisation, not trained weights)",
                      stacklevel=3)
        return
    missing, unknown = sorted(expected - set(aux)), sorted(set(aux) - expected)
    if missing or unknown:
        raise ValueError(f"{source}: aux weights do not match the {model} transformer: "
                         f"missing {missing}, unexpected {unknown}")
    for k, v in aux.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise ValueError(f"{source}: aux weight {k} has shape {tuple(v.shape)}, "
                             f"the transformer expects {tuple(state[k].shape)}")
    transformer.load_state_dict(aux, strict=False)


@contextlib.contextmanager
def _aux_keys_expected(cls, prefix: str):
    """While loading the stock transformer class, treat the aux keys as known extras (diffusers'
    own mechanism) instead of logging them as unused weights."""
    saved = cls.__dict__.get("_keys_to_ignore_on_load_unexpected", None)
    had = "_keys_to_ignore_on_load_unexpected" in cls.__dict__
    cls._keys_to_ignore_on_load_unexpected = list(saved or []) + ["^" + prefix.replace(".", r"\.")]
    try:
        yield
    finally:
        if had:
            cls._keys_to_ignore_on_load_unexpected = saved
        else:
            del cls._keys_to_ignore_on_load_unexpected


# ----------------------------------------------------------------------------- loading

def _dtype_keyword() -> str:
    # diffusers renamed from_pretrained's torch_dtype to dtype (the old name warns from 0.42 on).
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"


def load_pipeline(path: Union[str, os.PathLike], model: str, *, torch_dtype=None, device=None, mode: str = "aux",
                  scheduler: Optional[TwinFlowScheduler] = None):
    """Load a TwinFlow checkpoint folder into the stock diffusers pipeline of `model`.

    Args:
        path: a local diffusers pipeline folder (nothing is downloaded).
        model: "qwen-image", "z-image", "sd3" or "sana".
        torch_dtype: a torch dtype or its name; None loads float32 (diffusers' default).
        device: where to move the pipeline ("cpu", "cuda", "auto", a torch.device); None keeps CPU.
        mode: "aux" (second target-time embedder, weights from the checkpoint) or "lora" (SPEC §4).
        scheduler: a TwinFlowScheduler to install; default a :class:`TwinFlowPresetScheduler`.

    Returns the pipeline with ``pipe.scheduler`` the TwinFlow scheduler and ``pipe.transformer``
    patched and wired to it. Missing files raise FileNotFoundError, everything else that is
    wrong with the folder or the arguments ValueError.
    """
    import diffusers

    if mode not in ("aux", "lora"):
        raise ValueError(f'mode: expected "aux" or "lora", got {mode!r}')
    if scheduler is not None and not isinstance(scheduler, TwinFlowScheduler):
        raise ValueError(f"scheduler: expected a TwinFlowScheduler, got {type(scheduler).__name__}")
    dtype = resolve_dtype(torch_dtype)
    dev = resolve_device(device)
    root = check_pipeline_folder(path, model)
    spec = MODELS[model]
    prefix = diffusers_patch.module_for(model).AUX_PREFIX
    aux = read_aux_weights(root / "transformer", prefix)
    load_kw = dict(local_files_only=True, **({} if dtype is None else {_dtype_keyword(): dtype}))
    try:
        transformer_cls = getattr(diffusers, spec.transformer)
        with _aux_keys_expected(transformer_cls, prefix):
            transformer = transformer_cls.from_pretrained(root, subfolder="transformer", **load_kw)
        scheduler = scheduler if scheduler is not None else TwinFlowPresetScheduler()
        pipe = getattr(diffusers, spec.pipeline).from_pretrained(root, transformer=transformer, scheduler=scheduler,
                                                                 **load_kw)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{root}: could not load it as a {spec.pipeline}: {e}") from e
    diffusers_patch.patch(pipe.transformer, model, mode=mode)
    load_aux_weights(pipe.transformer, model, aux, str(root / "transformer"))
    diffusers_patch.set_target_time(pipe.transformer, pipe.scheduler)
    if dev is not None:
        pipe.to(dev)
    return pipe
