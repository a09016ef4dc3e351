"""Training configuration: YAML → typed dataclasses, validated in this one place.

Errors are ``ValueError``/``TypeError`` naming the file and the dotted key, e.g.
``configs/x.yaml: training.lr: expected a number, got 'fast'``. ``--set key=value``
overrides are applied to the raw mapping before validation (values parsed as YAML).
"""

from __future__ import annotations

import dataclasses
import pathlib
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

from .. import diffusers_patch
from .._core import LOSS_SETTINGS

STRATEGIES = ("auto", "none", "ddp", "fsdp")
PRECISIONS = ("bf16", "no")
OPTIMIZERS = ("adamw", "adamw8bit")


@dataclass
class ModelConfig:
    name: str = ""
    pretrained_model_name_or_path: str = ""
    #: dtype of the frozen parts (VAE, text encoders, the LoRA base): float32 | bfloat16
    frozen_dtype: str = "float32"
    #: QLoRA: the frozen LoRA base and text encoders quantized (twinflow.quantization names:
    #: int8 / fp8 = torchao, nf4 / bnb-int8 = bitsandbytes on CUDA); the adapter and the time
    #: embedders stay in full precision. None: not quantized
    quantization: Optional[str] = None


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 64
    alpha: float = 64.0
    init: str = "gaussian"
    target_modules: List[str] = field(default_factory=list)


@dataclass
class TrainingConfig:
    epochs: int = 1
    #: micro-batch per process
    batch_size: int = 4
    #: optimizer steps per epoch (None: as many as the data gives)
    steps_per_epoch: Optional[int] = None
    #: stop after this many optimizer steps in all (None: epochs × steps_per_epoch)
    max_steps: Optional[int] = None
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    grad_clip: float = 1.0
    grad_accum_steps: int = 1
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = False
    #: adamw (torch) | adamw8bit (bitsandbytes' 8-bit AdamW: optimizer state in 8 bits; CUDA)
    optimizer: str = "adamw"
    seed: int = 0
    #: auto: FSDP2 for full fine-tuning on > 1 process, DDP for LoRA; none: single process only
    strategy: str = "auto"
    checkpoint_every: int = 500
    keep_last: int = 3
    sample_every: int = 500
    log_every: int = 10


# The objective's settings are declared once, in Rust (``_core.LOSS_SETTINGS``): this section
# is built from that declaration, every setting optional (None keeps the recipe's value).
_PY_TYPES = {"float": float, "int": int, "bool": bool, "str": str,
             "Tuple[float, float]": Tuple[float, float],
             "Tuple[float, float, float]": Tuple[float, float, float],
             "Dict[str, float]": Dict[str, float]}


def _loss_settings(self) -> Dict[str, Any]:
    """The TwinFlowLoss keywords given (recipe aside)."""
    return {k: v for k, v in dataclasses.asdict(self).items() if k != "recipe" and v is not None}


TwinFlowConfig = dataclasses.make_dataclass(
    "TwinFlowConfig",
    [("recipe", str, field(default="twinflow"))]
    + [(s["name"], Optional[_PY_TYPES[s["type"]]], field(default=None)) for s in LOSS_SETTINGS]
    # false: one model call per independent pair (less peak memory; models whose rows interact)
    + [("batch_calls", bool, field(default=True))],
    namespace={"settings": _loss_settings,
               "__doc__": "Keyword settings of ``twinflow.TwinFlowLoss`` (``_core.LOSS_SETTINGS``, "
                          "and ``batch_calls``; validated by constructing it)."},
)
TwinFlowConfig.__module__ = __name__


@dataclass
class SamplingConfig:
    """``twinflow.UnifiedSampler`` settings for the sample grids (under the sampler's own names),
    plus the grid itself."""
    # Before 2026-12 two keys had short names; they still load, with a DeprecationWarning.
    RENAMED: ClassVar[Dict[str, str]] = {"steps": "sampling_steps", "order": "sampling_order"}

    sampling_steps: int = 2
    sampling_order: int = 1
    stochast_ratio: Any = 1.0
    extrapol_ratio: float = 0.0
    time_dist_ctrl: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    rfba_gap_steps: Tuple[float, float] = (0.001, 0.6)
    sampling_style: str = "few"
    num_images: int = 4
    seed: int = 0

    def sampler_kwargs(self) -> Dict[str, Any]:
        return dict(sampling_steps=self.sampling_steps, stochast_ratio=self.stochast_ratio,
                    extrapol_ratio=self.extrapol_ratio, sampling_order=self.sampling_order,
                    time_dist_ctrl=tuple(self.time_dist_ctrl), rfba_gap_steps=tuple(self.rfba_gap_steps),
                    sampling_style=self.sampling_style)


@dataclass
class DataConfig:
    resolution: int = 1024
    caption_column: str = "text"
    image_column: str = "image_bytes"
    #: editing families: the parquet column of the reference images (raw bytes, like image_column)
    reference_column: str = "reference_bytes"
    shuffle: bool = True
    num_workers: int = 2
    #: safetensors file with the text embeddings of the empty prompt (precomputed datasets)
    null_text_embeds: Optional[str] = None
    #: video families: frames per clip (Wan: 4k + 1), taken from each clip's start every frame_stride-th
    num_frames: int = 1
    frame_stride: int = 1


@dataclass
class LoggingConfig:
    tensorboard: bool = False


@dataclass
class RunConfig:
    """A ``twinflow train`` run: model, LoRA, training, objective (``twinflow``), sampling,
    data and logging sections (formerly ``TrainConfig``, a name still importable)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    twinflow: TwinFlowConfig = field(default_factory=TwinFlowConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    #: where it was read from (for messages)
    source: str = "<config>"

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


# ----------------------------------------------------------------------------- parsing

class _Err:
    def __init__(self, source: str):
        self.source = source

    def value(self, key: str, msg: str) -> ValueError:
        return ValueError(f"{self.source}: {key}: {msg}")

    def type(self, key: str, msg: str) -> TypeError:
        return TypeError(f"{self.source}: {key}: {msg}")


def _convert(value: Any, tp: Any, key: str, err: _Err) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key, err)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise err.type(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise err.type(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4 without a dot as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise err.type(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise err.type(key, f"expected a string, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise err.type(key, f"expected a list, got {value!r}")
        if origin is tuple:
            if len(value) != len(args):
                raise err.value(key, f"expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]", err) for i, (v, a) in enumerate(zip(value, args)))
        return [_convert(v, args[0], f"{key}[{i}]", err) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise err.type(key, f"expected a mapping, got {value!r}")
        return {str(k): _convert(v, args[1], f"{key}.{k}", err) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, err)
    raise AssertionError(f"unhandled config type {tp!r}")


def _build(cls, raw: Any, prefix: str, err: _Err):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise err.type(prefix or "<top level>", f"expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    for old, new in getattr(cls, "RENAMED", {}).items():
        if old in raw:
            where = f"{prefix}.{old}" if prefix else old
            if new in raw:
                raise err.value(where, f"give {new} only (it is the new name of {old})")
            warnings.warn(f"{err.source}: {where} is now {new}", DeprecationWarning, stacklevel=2)
            raw = {(new if k == old else k): v for k, v in raw.items()}
    for k in raw:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise err.value(where, f"unknown key (expected one of {sorted(names)})")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k, err) for k, v in raw.items()}
    return cls(**kwargs)


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``key.sub=value`` strings (value parsed as YAML) to a raw config mapping."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value (e.g. training.lr=1e-4)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"--set {item!r}: empty key component")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(text)
    return raw


def _check(cfg: RunConfig, err: _Err) -> None:
    m, t, lo, s = cfg.model, cfg.training, cfg.lora, cfg.sampling
    if m.name.lower().replace("_", "-") not in diffusers_patch.BACKBONES:
        raise err.value("model.name", f"expected one of {list(diffusers_patch.BACKBONES)}, got {m.name!r}")
    m.name = m.name.lower().replace("_", "-")
    if not m.pretrained_model_name_or_path:
        raise err.value("model.pretrained_model_name_or_path", "required (a local pipeline folder)")
    if m.frozen_dtype not in ("float32", "bfloat16"):
        raise err.value("model.frozen_dtype", f"expected float32 or bfloat16, got {m.frozen_dtype!r}")
    from ..quantization import QUANTIZE_CHOICES

    if m.quantization == "none":
        m.quantization = None
    if m.quantization is not None and m.quantization not in QUANTIZE_CHOICES:
        raise err.value("model.quantization", f"expected one of {list(QUANTIZE_CHOICES)}, got {m.quantization!r}")
    if m.quantization is not None and not cfg.lora.enabled:
        raise err.value("model.quantization", "quantizes the frozen LoRA base (QLoRA): set lora.enabled: true "
                                              "(a full fine-tune updates every weight, which cannot stay quantized)")
    if t.optimizer not in OPTIMIZERS:
        raise err.value("training.optimizer", f"expected one of {list(OPTIMIZERS)}, got {t.optimizer!r}")
    positive = {"training.epochs": t.epochs, "training.batch_size": t.batch_size,
                "training.grad_accum_steps": t.grad_accum_steps, "training.checkpoint_every": t.checkpoint_every,
                "training.keep_last": t.keep_last, "training.sample_every": t.sample_every,
                "training.log_every": t.log_every, "data.resolution": cfg.data.resolution,
                "data.num_frames": cfg.data.num_frames, "data.frame_stride": cfg.data.frame_stride,
                "sampling.num_images": s.num_images}
    if t.steps_per_epoch is not None:
        positive["training.steps_per_epoch"] = t.steps_per_epoch
    if t.max_steps is not None:
        positive["training.max_steps"] = t.max_steps
    if lo.enabled:
        positive["lora.rank"] = lo.rank
    for key, v in positive.items():
        if v < 1:
            raise err.value(key, f"must be >= 1, got {v}")
    try:
        diffusers_patch.backbone(m.name).check_num_frames(cfg.data.num_frames, "data.num_frames")
    except ValueError as e:
        raise err.value("data.num_frames", str(e).split(": ", 1)[1]) from None
    for key, v in {"training.lr": t.lr, "training.adam_eps": t.adam_eps}.items():
        if not v > 0:
            raise err.value(key, f"must be > 0, got {v}")
    for i, b in enumerate(t.adam_betas):
        if not 0.0 <= b < 1.0:
            raise err.value(f"training.adam_betas[{i}]", f"must be in [0, 1), got {b}")
    for key, v in {"training.weight_decay": t.weight_decay, "training.grad_clip": t.grad_clip,
                   "training.lr_warmup_steps": t.lr_warmup_steps, "data.num_workers": cfg.data.num_workers}.items():
        if v < 0:
            raise err.value(key, f"must be >= 0, got {v}")
    if t.mixed_precision not in PRECISIONS:
        raise err.value("training.mixed_precision", f"expected one of {list(PRECISIONS)}, got {t.mixed_precision!r}")
    if t.strategy not in STRATEGIES:
        raise err.value("training.strategy", f"expected one of {list(STRATEGIES)}, got {t.strategy!r}")
    if lo.enabled and t.strategy == "fsdp":
        raise err.value("training.strategy", "LoRA trains with DDP (its base weights are frozen); use auto or ddp")
    if lo.enabled and not lo.target_modules:
        raise err.value("lora.target_modules", "required when lora.enabled is true")
    if lo.enabled and lo.init not in ("gaussian", "default"):
        raise err.value("lora.init", f'expected "gaussian" or "default", got {lo.init!r}')
    from diffusers.optimization import SchedulerType

    if t.lr_scheduler not in {e.value for e in SchedulerType}:
        raise err.value("training.lr_scheduler", f"unknown scheduler {t.lr_scheduler!r} "
                        f"(one of {sorted(e.value for e in SchedulerType)})")
    # The objective's and the sampler's own validation, with the file and section named.
    from twinflow import TwinFlowLoss, UnifiedSampler

    try:
        TwinFlowLoss(cfg.twinflow.recipe, **cfg.twinflow.settings())
    except (ValueError, TypeError) as e:
        raise type(e)(f"{err.source}: twinflow: {e}") from None
    try:
        UnifiedSampler(**s.sampler_kwargs())
    except (ValueError, TypeError) as e:
        raise type(e)(f"{err.source}: sampling: {e}") from None


def parse_config(raw: Any, source: str = "<config>", overrides: Sequence[str] = ()) -> RunConfig:
    """Validate a raw mapping (as read from YAML) into a RunConfig."""
    err = _Err(source)
    if not isinstance(raw, dict):
        raise err.type("<top level>", f"expected a mapping of sections, got {type(raw).__name__}")
    if overrides:
        try:
            raw = apply_overrides(raw, overrides)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
    cfg = _build(RunConfig, raw, "", err)
    cfg.source = source
    _check(cfg, err)
    return cfg


def packaged_configs() -> Dict[str, pathlib.Path]:
    """{name: path} of the configs shipped inside the package (``twinflow/configs/*.yaml``: the
    repository's ``configs/`` folder, linked in a source checkout and copied into the wheel)."""
    from importlib.resources import files

    folder = files("twinflow") / "configs"
    if not folder.is_dir():
        return {}
    return {p.name[:-len(".yaml")]: pathlib.Path(str(p)) for p in sorted(folder.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".yaml")}


def resolve_config(path) -> pathlib.Path:
    """A config file: `path` itself when it is a file, else the packaged config of that name
    (``sd35_lora_2order`` or ``sd35_lora_2order.yaml``); ValueError listing the names otherwise."""
    given = pathlib.Path(path)
    if given.is_file():
        return given
    text = str(path)
    if "/" not in text and "\\" not in text:
        known = packaged_configs()
        name = text[:-len(".yaml")] if text.endswith(".yaml") else text
        if name in known:
            return known[name]
        raise ValueError(f"--config: {text!r} is neither a file nor a packaged config "
                         f"(packaged: {', '.join(known) or 'none'})")
    raise ValueError(f"--config: no such file: {given}")


def load_config(path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read and validate a YAML config: a file, or the name of a packaged one (``resolve_config``);
    ``overrides`` are ``key=value`` strings."""
    import yaml

    path = resolve_config(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from None
    return parse_config(raw if raw is not None else {}, str(path), overrides)


def __getattr__(name: str) -> Any:
    if name == "TrainConfig":  # the old name of RunConfig
        warnings.warn("twinflow.training.config.TrainConfig is deprecated: use RunConfig",
                      DeprecationWarning, stacklevel=2)
        return RunConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
