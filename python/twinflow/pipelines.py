"""Loading TwinFlow checkpoints into stock diffusers pipelines.

    pipe = twinflow.load_pipeline("TwinFlow-Qwen-Image", model="qwen-image", dtype=torch.bfloat16,
                                  device="cuda")
    image = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]

``load_pipeline`` reads a diffusers-format folder (``model_index.json``, ``transformer/``
with ``diffusion_pytorch_model.safetensors`` or shards plus their ``.index.json``, ``vae/``,
text encoders, tokenizers, ``scheduler/``) — local, or a Hub repo id through huggingface_hub's
cache — optionally with the transformer from another folder (``transformer=``, e.g. what the
published training writes: the transformer alone), with the stock pipeline class, patches the
transformer with ``diffusers_patch`` (docs/algorithm.md §4), loads the aux target-time embedder from the
transformer's safetensors (keys the stock class does not know, so diffusers skips them) and
installs a ``TwinFlowPresetScheduler``: each pipeline call gets the published preset of its own
``num_inference_steps`` (``twinflow.scheduler.preset_for_steps``). The transformer is wired to
the pipeline, so it reads the target time from whichever scheduler the pipeline holds when it
is called. What twinflow saves records backbone and mode (``twinflow.saved_format``), so
``load_pipeline(saved_folder)`` needs neither.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import pathlib
import re
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch

from . import diffusers_patch

from . import _files, _pipeline_checks
from ._alignment import align_module
from .scheduler import TwinFlowPresetScheduler, TwinFlowScheduler

__all__ = ["load_pipeline", "check_pipeline_folder", "check_transformer_folder",
           "resolve_model_path", "read_aux_weights", "load_aux_weights", "resolve_dtype", "resolve_device"]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = WEIGHTS_NAME + ".index.json"


@dataclass(frozen=True)
class ModelSpec:
    """A summary of a registered backbone (deprecated: ``diffusers_patch.backbone(name)`` holds it all)."""
    pipeline: str      # pipeline class name
    transformer: str   # diffusers transformer class
    cfg_kwarg: str     # the pipeline argument that turns on classifier-free guidance (> 1)
    exact_size: Tuple[Tuple[str, object], ...] = ()  # pipeline arguments to render exactly height × width


def __getattr__(name):
    # The old view of the registry (until 2026-12): diffusers_patch.backbone(name) holds it all.
    if name == "MODELS":
        import warnings

        warnings.warn("twinflow.pipelines.MODELS is deprecated: use twinflow.diffusers_patch.backbone(name) "
                      "(and diffusers_patch.BACKBONES for the names)", DeprecationWarning, stacklevel=2)
        return {n: ModelSpec(b.pipeline_class_name, b.transformer_class_name, b.cfg_kwarg, tuple(b.exact_size))
                for n, b in diffusers_patch.backbones().items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- checks

def resolve_dtype(dtype, name: str = "dtype") -> Optional[torch.dtype]:
    """None, a torch.dtype, or its name ("float32", "bfloat16", "float16", "fp16", "bf16");
    `name` is the argument's name for the error message."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if isinstance(dtype, str) and dtype.lower() in names:
        return names[dtype.lower()]
    raise ValueError(f"{name}: expected a torch.dtype or one of {sorted(names)}, got {dtype!r}")


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


def _check_safetensors(path: pathlib.Path) -> List[str]:
    """The tensor names of a safetensors file whose header reads."""
    from safetensors import safe_open

    _files.regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
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


_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _snapshot(repo_id: str, revision: Optional[str], subfolder: Optional[str]) -> pathlib.Path:
    """The local snapshot of a Hub repo through huggingface_hub (its cache; HF_HUB_OFFLINE and
    HF_HUB_CACHE read at call time, so they also work when set after import)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    offline = constants.HF_HUB_OFFLINE or _env_flag("HF_HUB_OFFLINE")
    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=offline,
                                   allow_patterns=None if subfolder is None else [f"{subfolder}/*"])
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if offline else "the download failed"
        raise FileNotFoundError(f"{repo_id}: no such local folder, and not in the Hugging Face cache {cache} "
                                f"(revision {revision or 'main'}) while {why}: download it first "
                                f"(hf download {repo_id})") from e
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as e:
        raise ValueError(f"{repo_id}: {type(e).__name__}: {e}") from e
    return pathlib.Path(folder)


def resolve_model_path(path: Union[str, os.PathLike], *, subfolder: Optional[str] = None,
                       revision: Optional[str] = None) -> pathlib.Path:
    """The local folder of `path`: a local folder, or a Hugging Face Hub repo id ("org/repo",
    resolved with ``huggingface_hub.snapshot_download`` as diffusers does: its cache, at
    `revision`; HF_HUB_OFFLINE=1 reads the cache only), then `subfolder` inside it (a relative
    path that stays inside)."""
    if subfolder is not None:
        parts = pathlib.PurePosixPath(str(subfolder)).parts
        if not isinstance(subfolder, str) or not parts or pathlib.PurePath(subfolder).is_absolute() or ".." in parts:
            raise ValueError(f"subfolder: expected a relative folder inside the model path, got {subfolder!r}")
    if isinstance(path, (str, os.PathLike)) and pathlib.Path(path).expanduser().is_dir():
        if revision is not None:
            raise ValueError(f"revision: applies to Hub repo ids, but {str(path)!r} is a local folder")
        base = pathlib.Path(path).expanduser()
    elif isinstance(path, str) and _REPO_ID.fullmatch(path) and ".." not in path:
        base = _snapshot(path, revision, subfolder)
    else:
        raise FileNotFoundError(f"model path {str(path)!r}: no such folder, and not a Hub repo id (org/name)")
    root = base / subfolder if subfolder else base
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (subfolder {subfolder!r} of {str(path)!r})")
    return root


def _check_files(root: pathlib.Path, sub: pathlib.Path) -> None:
    """Nothing under `sub` leads outside `root`, and no FIFO or device would block a reader."""
    for f in sorted(sub.rglob("*")):
        _files.inside(root, f.relative_to(root))
        if not f.is_dir():
            _files.regular_file(f)


def check_transformer_folder(tdir: pathlib.Path, model: str) -> None:
    """A transformer folder of `model`: config.json naming its class (the stock name, or the
    stock name + "Wrapper" that the published TwinFlow training saves) and safetensors weights."""
    want = diffusers_patch.backbone(model).transformer_class_name
    if not tdir.is_dir():
        raise FileNotFoundError(f"{tdir}: no such transformer folder")
    config = tdir / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: missing")
    _check_files(tdir, tdir)
    found = _read_json(config).get("_class_name")
    if found == want + "Wrapper":
        logger.info("%s: %s is the published TwinFlow training wrapper of %s; loading it as the stock %s "
                    "with the TwinFlow patch", config, found, want, want)
    elif found != want:
        raise ValueError(f"{config}: the transformer is a {found}, but model={model!r} needs a {want}")
    for f in sorted(tdir.glob("*.safetensors")):
        peft = [k for k in _check_safetensors(f) if ".base_layer." in k or ".lora_A." in k or ".lora_B." in k]
        if peft:  # the stock class would leave those layers randomly initialised, with a log line
            raise ValueError(f"{f}: holds unfused LoRA layers ({peft[0]}, ...): it was saved with a LoRA loaded; "
                             "save after pipe.fuse_lora() and pipe.unload_lora_weights(), or load the base with "
                             "lora=")
    transformer_weight_files(tdir)


def check_pipeline_folder(path: Union[str, os.PathLike], model: str, *, with_transformer: bool = True,
                          overridden=(), index: Optional[dict] = None) -> pathlib.Path:
    """Check a local diffusers pipeline folder before diffusers reads it: model_index.json,
    every component folder it lists (but those in `overridden`: given by the caller), JSON
    configs, safetensors headers, and (unless `with_transformer` is False: the transformer comes
    from elsewhere) the transformer. Returns the folder. FileNotFoundError / ValueError name the
    problem."""
    diffusers_patch.backbone(model)
    root = pathlib.Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"model path {str(path)!r}: no such folder")
    recorded, index = index, root / "model_index.json"  # the caller's parsed copy, if it read it already
    if not index.is_file():
        raise FileNotFoundError(f"{root}: not a diffusers pipeline folder (no model_index.json)")
    components = {k: v for k, v in (recorded if recorded is not None else _read_json(index)).items()
                  if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is not None
                  and k not in overridden}
    if "transformer" not in components:
        raise ValueError(f"{index}: lists no transformer")
    from .saved_format import LIBRARY

    if components["transformer"][0] == LIBRARY:  # saved by twinflow: transformer/ is a stock folder
        components["transformer"] = ["diffusers", diffusers_patch.backbone(model).transformer_class_name]
    for name in components:
        sub = _files.inside(root, name, "model_index.json")
        if name == "transformer":
            continue
        if not sub.is_dir():
            raise FileNotFoundError(f"{sub}: missing (listed in model_index.json)")
        _check_files(root, sub)
        for f in sorted(sub.glob("*.json")):
            _read_json(f)
        for f in sorted(sub.glob("*.safetensors")):
            _check_safetensors(f)
    if with_transformer:
        check_transformer_folder(root / "transformer", model)
    checked = {k: v for k, v in components.items() if with_transformer or k != "transformer"}
    _pipeline_checks.check_components(root, checked, diffusers_patch.backbone(model).pipeline_class())
    return root


def component_overrides(bb, root: pathlib.Path, given: Dict[str, object], index: Optional[dict] = None
                        ) -> Dict[str, object]:
    """The components to hand diffusers' ``from_pretrained`` instead of loading them from `root`,
    as diffusers takes them: those the caller gives (a loaded module, a tokenizer, or None to
    leave one out, e.g. ``text_encoder_3=None`` for SD3 without T5), and None for each that
    model_index.json records as left out (``[null, null]``: diffusers saves that, then refuses
    to load it unless told again), and what the backbone does not use (``unused_components``)."""
    params = inspect.signature(bb.pipeline_class().__init__).parameters
    names = [n for n in params if n not in ("self", "transformer", "scheduler")]
    for name, value in given.items():
        if name not in names:
            raise ValueError(f"{name}: not a component of {bb.pipeline_class_name} (its components: "
                             f"{', '.join(names)}; transformer and scheduler have their own arguments)")
        if isinstance(value, (str, os.PathLike)):
            raise ValueError(f"{name}: a component override is a loaded component (e.g. from its class's "
                             f"from_pretrained) or None, got the path {str(value)!r}")
    if index is None:
        index = _read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
    recorded = index
    left_out = {k: None for k, v in recorded.items()
                if k in names and isinstance(v, list) and len(v) == 2 and v[0] is None and v[1] is None}
    unused = bb.unused_components(recorded)  # e.g. Wan 2.2 A14B's low-noise expert
    for name, value in given.items():
        if name in unused and value is not unused[name]:
            raise ValueError(f"{name}: not used by TwinFlow's {bb.label} model, which loading sets to "
                             f"{unused[name]!r} (docs/algorithm.md §4); leave it out")
    return {**left_out, **unused, **given}


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


def load_aux_weights(transformer: torch.nn.Module, model: str, aux: Dict[str, torch.Tensor], source: str, *,
                     recorded: bool = False) -> None:
    """Copy aux weights into a patched transformer (trained weights always win); warn and keep
    the backbone's published initialisation when `aux` is empty; ValueError on missing, unknown
    or mis-shaped keys. `recorded`: the checkpoint records its mode (``twinflow.saved_format``),
    so aux weights that do not fit it are an error, not a warning."""
    bb = diffusers_patch.backbone(model)
    prefix = bb.aux_prefix
    state = transformer.state_dict()
    expected = {k for k in state if k.startswith(prefix)}
    if not expected:  # LoRA mode: no second embedder
        if aux and recorded:
            raise ValueError(f"{source}: recorded as a LoRA-mode checkpoint, but holds {len(aux)} aux target-time "
                             f"weights ({prefix}*)")
        if aux:
            warnings.warn(f"{source}: {len(aux)} aux target-time weights ({prefix}*) ignored in LoRA mode",
                          stacklevel=3)
        return
    if not aux and recorded:
        raise ValueError(f"{source}: recorded as an aux-mode checkpoint, but holds no aux target-time weights "
                         f"({prefix}*): it was re-saved without them (e.g. by the stock transformer class)")
    if not aux:
        warnings.warn(f"{source}: no aux target-time weights ({prefix}*) in the checkpoint; initialised them as "
                      f"{bb.aux_init_text} (the published initialisation, not trained weights)", stacklevel=3)
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

def dtype_kwargs(dtype: Optional[torch.dtype]) -> dict:
    """The dtype keyword for diffusers' from_pretrained: ``dtype`` from diffusers 0.42 on (where
    ``torch_dtype`` warns), ``torch_dtype`` before; {} for None."""
    import diffusers
    from packaging.version import Version

    if dtype is None:
        return {}
    return {"dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype": dtype}


def _transformer_folder(transformer) -> pathlib.Path:
    """The folder of a `transformer=` path: a transformer folder (config.json), or a pipeline
    folder / Hub repo holding one under transformer/ (checked with check_transformer_folder)."""
    root = resolve_model_path(transformer)
    if not (root / "config.json").is_file() and (root / "transformer" / "config.json").is_file():
        root = root / "transformer"
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root / 'config.json'}: missing")
    return root


def resolve_dtype_args(dtype, torch_dtype):
    """`dtype`, or its older name `torch_dtype` (diffusers 0.42 renamed it); both: they must agree."""
    if torch_dtype is None:
        return resolve_dtype(dtype)
    old = resolve_dtype(torch_dtype, "torch_dtype")
    if dtype is not None and resolve_dtype(dtype) != old:
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree: pass only dtype "
                         "(torch_dtype is its older name)")
    return old


def _module_record(module: torch.nn.Module, source: str) -> Optional[dict]:
    from .diffusers_patch._common import patched_mode

    from .saved_format import KEY, check_record

    config = getattr(module, "config", None)
    record = check_record(config.get(KEY) if hasattr(config, "get") else None, source)
    mode = patched_mode(module)
    if record is not None and mode is not None and mode != record["mode"]:
        raise ValueError(f"{source}: patched in mode {mode!r}, but its config records mode {record['mode']!r}")
    return record


def _resolve_model_mode(model: Optional[str], mode: Optional[str], records: List[Tuple[Optional[dict], str]]
                        ) -> Tuple[str, str, bool]:
    """(model, mode, recorded) from the explicit arguments and what the files record; any
    disagreement is a ValueError naming both."""
    found = [(r, src) for r, src in records if r is not None]
    for (a, sa), (b, sb) in zip(found, found[1:]):
        if a != b:
            raise ValueError(f"{sa} records {a['backbone']} in mode {a['mode']!r}, but {sb} records "
                             f"{b['backbone']} in mode {b['mode']!r}")
    if model is not None:
        model = diffusers_patch.canonical_name(model)
    if found:
        rec, src = found[0]
        if model is not None and model != rec["backbone"]:
            raise ValueError(f"model={model!r}, but {src} is a TwinFlow {rec['backbone']} checkpoint")
        if mode is not None and mode != rec["mode"]:
            raise ValueError(f"mode={mode!r}, but {src} was saved in mode {rec['mode']!r}: loading it in another "
                             "mode gives a different model; leave mode out to use the recorded one")
        return rec["backbone"], rec["mode"], True
    if model is None:
        raise ValueError("model: required (one of " + ", ".join(sorted(diffusers_patch.BACKBONES)) + "), since "
                         "nothing here records it (only pipelines saved by twinflow do)")
    return model, mode or "aux", False


def load_pipeline(path: Union[str, os.PathLike], model: Optional[str] = None, *, dtype=None, torch_dtype=None,
                  device=None, mode: Optional[str] = None, scheduler: Optional[TwinFlowScheduler] = None,
                  transformer: Union[None, str, os.PathLike, torch.nn.Module] = None,
                  lora: Union[None, str, os.PathLike] = None,
                  subfolder: Optional[str] = None, revision: Optional[str] = None,
                  quantization_config=None, aux_weights: Union[None, str, os.PathLike] = None,
                  pipeline_class=None, **parts):
    """Load a TwinFlow checkpoint into the stock diffusers pipeline of `model`.

    Args:
        path: a local diffusers pipeline folder, or a Hugging Face Hub repo id ("org/repo",
            resolved through huggingface_hub's cache; HF_HUB_OFFLINE=1 reads the cache only).
        model: a registered backbone (``diffusers_patch.BACKBONES``): "qwen-image", "z-image", "sd3",
            "sana", "openuni", "flux", "chroma", "lumina2" or "wan", or an editing family:
            "qwen-image-edit", "qwen-image-edit-plus", "flux-kontext" (their pipelines take the
            reference image as ``image=``).
            Optional for what twinflow saved (``save_pretrained`` of a pipeline loaded here,
            ``twinflow train``'s export, a LoRA given as `lora`): that records it
            (``twinflow.saved_format``); an explicit value that contradicts it is a ValueError.
        dtype: a torch dtype or its name; None loads float32 (diffusers' default).
            ``torch_dtype`` is accepted as its older name.
        device: where to move the pipeline ("cpu", "cuda", "auto", a torch.device); None keeps CPU.
        mode: "aux" (second target-time embedder, weights from the checkpoint) or "lora" (docs/algorithm.md §4).
            Default: the recorded mode, "lora" with `lora`, else "aux"; a value that contradicts
            the record is a ValueError.
        scheduler: a TwinFlowScheduler to install; default a :class:`TwinFlowPresetScheduler`.
        transformer: the TwinFlow transformer, when `path` is only the base pipeline: a
            transformer folder (what the published training and our checkpoints write:
            config.json + safetensors), a pipeline folder or Hub repo id holding one under
            transformer/, a GGUF file (local, or ``org/name/file.gguf`` on the Hub; loaded
            quantized through diffusers' ``from_single_file``, ``twinflow.gguf_files``), or an
            already loaded transformer module (patched or not).
        lora: a TwinFlow LoRA in diffusers' layout (``twinflow.lora_files``: a folder with
            ``pytorch_lora_weights.safetensors``), loaded with the pipeline's own
            ``load_lora_weights`` onto the base `path` (mode "lora").
        subfolder: the pipeline folder inside `path` (e.g. a repo holding several).
        revision: the Hub revision (branch, tag or commit) of a repo id.
        quantization_config: what diffusers' ``from_pretrained`` takes (a
            ``PipelineQuantizationConfig``, a ``{component: config}`` dict, or one diffusers
            quantization config for the transformer), or a name from
            ``twinflow.quantization.QUANTIZE_CHOICES`` ("int8", "fp8": torchao weight-only;
            "nf4", "bnb-int8": bitsandbytes, CUDA only), which quantizes the transformer and
            the text encoders. The time embedders (the stock one and the aux target-time one)
            are never quantized and keep the compute dtype (``twinflow.quantization``).
            A GGUF `transformer` is already quantized: then a name applies to the text encoders
            only, and a config for the transformer is a ValueError.
        pipeline_class: another diffusers pipeline class of the same family (a class or its
            name), e.g. ``"FluxImg2ImgPipeline"`` or ``"StableDiffusion3Img2ImgPipeline"``: the
            image-to-image / inpainting variants take ``strength`` (the TwinFlow scheduler
            honours ``set_begin_index`` and ``scale_noise``). Another registered family's pipeline
            (``FluxKontextPipeline`` for "flux", ``QwenImageEditPlusPipeline`` for
            "qwen-image-edit") is refused: load with that family. The transformer is wired to that
            pipeline (``AutoPipelineForImage2Image.from_pipe(pipe)`` also works while ``pipe``
            is alive: the transformer reads the target time through it).
        aux_weights: for a GGUF `transformer` whose file lacks the aux target-time embedder:
            a safetensors file or transformer folder holding it (``twinflow.gguf_files``).
        **parts: with a pipeline folder or repo id, components to use instead of the folder's,
            as diffusers' ``from_pretrained`` takes them: a loaded component, or None to leave
            one out (``text_encoder_3=None, tokenizer_3=None``: SD3 without T5). Components the
            folder records as left out are passed as None by themselves. For a backbone whose
            ``Backbone`` has ``load_from_parts`` (OpenUni), `path` may instead be its base
            weights file (OpenUni's published ``.pth``), with the components it lacks
            (``text_encoder``, ``tokenizer``, ``vae``, ``transformer_config``).

    Returns the pipeline with ``pipe.scheduler`` the TwinFlow scheduler and ``pipe.transformer``
    patched and wired to the pipeline: it reads the target time from whatever scheduler
    ``pipe.scheduler`` is at call time (``pipe.scheduler = TwinFlowScheduler.from_config(...)``
    works as in diffusers). ``save_pretrained`` of it writes a folder that records backbone and
    mode (``twinflow.saved_format``). Missing files raise FileNotFoundError, everything else
    that is wrong with the folder or the arguments ValueError.
    """
    from . import lora_files, saved_format

    if mode is not None and mode not in ("aux", "lora"):
        raise ValueError(f'mode: expected "aux" or "lora", got {mode!r}')
    if scheduler is not None and not isinstance(scheduler, TwinFlowScheduler):
        raise ValueError(f"scheduler: expected a TwinFlowScheduler, got {type(scheduler).__name__}")
    if not (transformer is None or isinstance(transformer, (str, os.PathLike, torch.nn.Module))):
        raise ValueError(f"transformer: expected a folder, a Hub repo id or a transformer module, "
                         f"got {type(transformer).__name__}")
    if lora is not None and transformer is not None:
        raise ValueError("lora and transformer: give one (a LoRA applies to the base pipeline's transformer)")
    dtype = resolve_dtype_args(dtype, torch_dtype)
    dev = resolve_device(device)
    records: List[Tuple[Optional[dict], str]] = []
    lora_file = None
    if lora is not None:
        lora_file, lora_record = lora_files.read(lora)
        records.append((lora_record, str(lora_file.parent / lora_files.RECORD_NAME)))
        if mode == "aux":
            raise ValueError(f"mode='aux', but lora={str(lora)!r}: a TwinFlow LoRA is trained in mode 'lora'")
        mode = "lora"
    if isinstance(transformer, torch.nn.Module):
        records.append((_module_record(transformer, f"transformer={type(transformer).__name__}"),
                        f"transformer={type(transformer).__name__}"))
    if isinstance(path, (str, os.PathLike)) and pathlib.Path(path).expanduser().is_file():
        if subfolder is not None or revision is not None:
            raise ValueError("subfolder / revision: apply to pipeline folders and Hub repo ids, not to a weights file")
        model, mode, recorded = _resolve_model_mode(model, mode, records)
        if quantization_config is not None:
            raise ValueError(f"quantization_config: not supported when loading {model} from a weights file")
        return _load_from_parts(diffusers_patch.backbone(model), path, dtype, dev, mode, scheduler, transformer,
                                parts, recorded)
    root = resolve_model_path(path, subfolder=subfolder, revision=revision)
    # model_index.json, read once for the record, the components left out and the checks
    index = _read_json(root / "model_index.json") if (root / "model_index.json").is_file() else None
    tfolder = gguf_file = gguf_config = None
    from . import gguf_files

    if aux_weights is not None and not gguf_files.is_gguf_path(transformer):
        raise ValueError("aux_weights: applies to a GGUF transformer (transformer='...gguf'); other checkpoints "
                         "hold their aux target-time embedder themselves")
    if gguf_files.is_gguf_path(transformer):
        gguf_file = gguf_files.resolve_gguf_file(transformer, revision)
        gguf_record, gguf_config = gguf_files.read_record(gguf_file)
        records.append((gguf_record, str(gguf_file)))
    elif isinstance(transformer, (str, os.PathLike)):
        tfolder = _transformer_folder(transformer)
        config = _read_json(tfolder / "config.json")
        records.append((saved_format.check_record(config.get(saved_format.KEY), str(tfolder / "config.json")),
                        str(tfolder / "config.json")))
    elif transformer is None and (root / "model_index.json").is_file():
        records.append((saved_format.read_folder_record(root, index), str(root / "model_index.json")))
    if lora is not None and records[-1][0] is not None and records[-1][0] is not lora_record:
        raise ValueError(f"lora: applies to a stock base pipeline, but {records[-1][1]} is already a TwinFlow "
                         f"checkpoint ({records[-1][0]['mode']} mode)")
    model, mode, recorded = _resolve_model_mode(model, mode, records)
    bb = diffusers_patch.backbone(model)
    model = bb.name
    bb.check_environment()
    pipe_cls = _pipeline_class(bb, pipeline_class)
    if not recorded and transformer is None and (root / "model_index.json").is_file():
        check_family_of_folder(root, bb, index)
    if tfolder is not None:
        check_transformer_folder(tfolder, model)
    overrides = component_overrides(bb, root, parts, index)
    root = check_pipeline_folder(root, model, with_transformer=transformer is None, overridden=overrides, index=index)
    tquant, rest_quant = _quantization(bb, root, quantization_config, overrides, dtype, dev, index)
    if gguf_file is not None and tquant is not None:
        if not isinstance(quantization_config, str):
            raise ValueError(f"quantization_config: {gguf_file} is a GGUF file, already quantized; a config for "
                             "the transformer does not apply (one for the text encoders does)")
        tquant = None  # a name: the GGUF file is the transformer's quantization, the name the text encoders'
    if quantization_config is not None and dtype is None:
        dtype = torch.float32  # explicit: diffusers' torchao path would otherwise pick bfloat16 for the transformer
    load_kw = dict(local_files_only=True, **dtype_kwargs(dtype), **overrides)
    if rest_quant is not None:
        load_kw["quantization_config"] = rest_quant
    module = transformer if isinstance(transformer, torch.nn.Module) else None
    if module is not None and tquant is not None:
        raise ValueError("quantization_config: quantizes the transformer load_pipeline loads, but transformer= is "
                         "an already loaded module; quantize it when you load it, or pass its folder")
    if module is not None:
        bb.check(module)
        tdir, aux, source = None, None, f"transformer={type(module).__name__}"
        if dtype is not None:
            module.to(dtype)
    elif gguf_file is not None:
        module, aux, source = gguf_files.load_transformer(bb, gguf_file, config_root=root, dtype=dtype, mode=mode,
                                                          aux_weights=aux_weights, config=gguf_config)
    else:
        tdir = root / "transformer" if tfolder is None else tfolder
        aux, source = read_aux_weights(tdir, bb.aux_prefix), str(tdir)
    try:
        if module is None:
            transformer_cls = bb.transformer_class()
            with _aux_keys_expected(transformer_cls, bb.aux_prefix):
                module = transformer_cls.from_pretrained(
                    tdir, local_files_only=True, **dtype_kwargs(dtype),
                    **({} if tquant is None else {"quantization_config": tquant}))
        scheduler = scheduler if scheduler is not None else TwinFlowPresetScheduler()
        if pipe_cls is None:
            pipe = bb.load_pipeline(root, transformer=module, scheduler=scheduler, **load_kw)
        else:
            pipe = pipe_cls.from_pretrained(root, transformer=module, scheduler=scheduler, **load_kw)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{root}: could not load it as a {bb.pipeline_class_name}: {e}") from e
    return _finish(bb, pipe, mode, aux, source, dev, recorded=recorded, lora_file=lora_file)


def _family_of_pipeline(class_name) -> Optional[str]:
    """The registered family whose pipeline class is `class_name`, or None."""
    return next((n for n, b in diffusers_patch.backbones().items() if b.pipeline_class_name == class_name), None)


def check_family_of_folder(root: pathlib.Path, bb, index: Optional[dict] = None) -> None:
    """A stock pipeline folder whose model_index.json names another family's pipeline holds that
    family's transformer — the same class for FLUX and FLUX Kontext, Qwen-Image and its edit
    models, but another model: ValueError naming both (unless `bb`'s pipeline derives from it).
    A family of another transformer class is refused by ``check_transformer_folder``."""
    found = (index if index is not None else _read_json(root / "model_index.json")).get("_class_name")
    owner = _family_of_pipeline(found)
    other = diffusers_patch.backbone(owner) if owner is not None and owner != bb.name else None
    if (other is not None and other.transformer_class_name == bb.transformer_class_name
            and not issubclass(bb.pipeline_class(), other.pipeline_class())):
        raise ValueError(f"{root}: a {found} folder (the {owner} family), but model={bb.name!r} needs a "
                         f"{bb.pipeline_class_name} checkpoint: load it with model={owner!r}")


def _pipeline_class(bb, pipeline_class):
    """None (the family's own pipeline), or a diffusers pipeline class of the family's transformer."""
    if pipeline_class is None:
        return None
    import diffusers

    cls = getattr(diffusers, pipeline_class, None) if isinstance(pipeline_class, str) else pipeline_class
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise ValueError(f"pipeline_class: expected a diffusers pipeline class or its name, got {pipeline_class!r}")
    if hasattr(bb, "load_from_parts") or type(bb).load_pipeline is not diffusers_patch.Backbone.load_pipeline:
        raise ValueError(f"pipeline_class: {bb.name} loads its own pipeline class; another is not supported")
    owner = _family_of_pipeline(cls.__name__)
    if owner is not None and owner != bb.name:  # its own family: its text encoding and training glue differ
        raise ValueError(f"pipeline_class: {cls.__name__} is the {owner} family's pipeline, not a {bb.label} "
                         f"variant: load with model={owner!r}")
    hint = inspect.signature(cls.__init__).parameters.get("transformer")
    want = bb.transformer_class()
    annotation = inspect.Parameter.empty if hint is None else hint.annotation
    if hint is None or (annotation is not inspect.Parameter.empty and annotation is not want
                        and want.__name__ not in str(annotation)):  # a class, or its name as a string
        raise ValueError(f"pipeline_class: {cls.__name__} does not take a {want.__name__} transformer, so it is not a "
                         f"{bb.label} pipeline")
    return cls


def _quantization(bb, root: pathlib.Path, quantization_config, overrides, dtype, dev, index: Optional[dict] = None):
    """(transformer config, the rest's config) for load_pipeline (``twinflow.quantization``)."""
    if quantization_config is None:
        return None, None
    if hasattr(bb, "load_from_parts"):
        raise ValueError(f"quantization_config: not supported for {bb.name} (its pipeline is twinflow's own); "
                         "supported: " + ", ".join(n for n, b in diffusers_patch.backbones().items()
                                                   if not hasattr(b, "load_from_parts")))
    from . import quantization

    recorded = index if index is not None else _read_json(root / "model_index.json")
    text_encoders = [k for k, v in recorded.items() if k.startswith("text_encoder") and k not in overrides
                     and isinstance(v, list) and len(v) == 2 and v[0] == "transformers"]
    return quantization.pipeline_quantization(quantization_config, transformer_skip=[bb.embed_name, bb.aux_name],
                                              text_encoders=text_encoders, dtype=dtype, device=dev)


def _finish(bb, pipe, mode: str, aux: Optional[Dict[str, torch.Tensor]], source: str, dev, *,
            recorded: bool = False, lora_file: Optional[pathlib.Path] = None):
    """Patch the pipeline's transformer, load its aux weights (None: a given module, whose own
    aux embedder, if attached, is the trained one) and LoRA, wire it to the pipeline (so to
    the scheduler it holds at each call), record what it is, move the pipeline."""
    from . import lora_files, quantization, saved_format

    embed = getattr(pipe.transformer, bb.embed_name)
    if quantization.quantized_modules(embed):  # e.g. optimum-quanto, a GGUF file: see twinflow.quantization
        replaced = quantization.plain_linears(embed, dtype=_compute_dtype(pipe.transformer))
        logger.info("%s: dequantized the time embedder's %s (time embedders stay unquantized)", source,
                    ", ".join(replaced))
    if aux is None:
        if mode == "aux" and not isinstance(getattr(pipe.transformer, bb.aux_name, None), torch.nn.Module):
            warnings.warn(f"{source}: no aux target-time embedder ({bb.aux_prefix}*) attached; initialised it as "
                          f"{bb.aux_init_text} (the published initialisation, not trained weights)", stacklevel=3)
        bb.patch(pipe.transformer, mode=mode)
    else:
        bb.patch(pipe.transformer, mode=mode)
        load_aux_weights(pipe.transformer, bb.name, aux, source, recorded=recorded)
    aux_module = getattr(pipe.transformer, bb.aux_name, None)
    quantized = quantization.quantized_modules(aux_module) if isinstance(aux_module, torch.nn.Module) else []
    if quantized:
        raise ValueError(f"{source}: the aux target-time embedder is quantized "
                         f"({', '.join(quantized)}); it must stay in the compute "
                         "dtype: load it unquantized")
    if lora_file is not None:
        lora_files.load_into(pipe, lora_file)
    diffusers_patch.set_target_time(pipe.transformer, pipe)
    saved_format.mark_pipeline(pipe, bb.name, mode)
    align_pipeline(pipe)
    if dev is not None:
        pipe.to(dev)
    return pipe


def _compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a (possibly quantized) module computes in: its first plain floating tensor's."""
    for t in list(module.parameters()) + list(module.buffers()):
        data = t.data if isinstance(t, torch.nn.Parameter) else t
        if type(data) is torch.Tensor and data.is_floating_point():
            return data.dtype
    return torch.float32


def align_pipeline(pipe) -> None:
    """Every module of `pipe` in torch-allocated (64-byte aligned, contiguous) memory, so that
    the same weights give the same bits whatever file layout they came from (``_alignment``)."""
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            align_module(comp)


def _load_from_parts(bb, path, dtype, dev, mode, scheduler, transformer, parts, recorded):
    """A pipeline the backbone assembles itself (``load_from_parts``) from a base weights file
    and the components it lacks; `transformer` (a folder, repo or module) replaces the base one."""
    load = getattr(bb, "load_from_parts", None)
    if load is None:
        able = sorted(n for n, b in diffusers_patch.backbones().items() if hasattr(b, "load_from_parts"))
        given = sorted(parts) or ["a weights file"]
        raise ValueError(f"model={bb.name!r}: load_pipeline reads a diffusers pipeline folder or Hub repo; "
                         f"{', '.join(given)}: only for {able}")
    module, aux, source = None, {}, str(path)
    if isinstance(transformer, torch.nn.Module):
        bb.check(transformer)
        module, aux, source = transformer, None, f"transformer={type(transformer).__name__}"
    elif transformer is not None:
        tdir = _transformer_folder(transformer)
        check_transformer_folder(tdir, bb.name)
        aux, source = read_aux_weights(tdir, bb.aux_prefix), str(tdir)
        load_kw = dict(local_files_only=True, **dtype_kwargs(dtype))
        try:
            with _aux_keys_expected(bb.transformer_class(), bb.aux_prefix):
                module = bb.transformer_class().from_pretrained(tdir, **load_kw)
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{tdir}: could not load it as a {bb.transformer_class_name}: {e}") from e
    pipe = load(path, dtype=dtype, transformer=module, **parts)
    pipe.scheduler = scheduler if scheduler is not None else TwinFlowPresetScheduler()
    return _finish(bb, pipe, mode, aux, source, dev, recorded=recorded)
