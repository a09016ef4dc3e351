"""MNIST checkpoints: a directory with

* ``model.safetensors`` – the sampling weights (EMA of the online model),
* ``config.json``       – network config, training settings, progress, metrics,
* ``train_state.safetensors`` – online weights, Adam moments, loss teacher, RNG states
  (only what resuming needs; a shipped checkpoint may omit it).

Every file is written to a temporary name and renamed, ``config.json`` last, so an
interrupted save leaves the previous checkpoint readable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from ... import _files
from .unet import MnistUNet

__all__ = ["save_checkpoint", "load_model", "load_weights", "read_config", "load_train_state",
           "shipped_checkpoint", "SHIPPED"]

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "train_state.safetensors"
# twinflow: fine-tuned from flow_matching (the embedded default); twinflow_scratch: TwinFlow
# trained from scratch at the base's budget (the README's comparison row).
SHIPPED = ("twinflow", "twinflow_scratch", "rcgm", "flow_matching")
_WEIGHTS = Path(__file__).parent / "weights"


def shipped_checkpoint(name_or_path) -> Path:
    """A directory path as is, or one of the shipped checkpoints by method name."""
    if str(name_or_path) in SHIPPED:
        return _WEIGHTS / str(name_or_path)
    return Path(name_or_path)


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(directory: os.PathLike, model_weights: Dict[str, torch.Tensor],
                    config: Dict[str, Any], state: Optional[Dict[str, torch.Tensor]] = None) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cpu = lambda sd: {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}  # noqa: E731
    # The step in each file's metadata: a save killed between two renames is detected on resume.
    meta = {"step": str(config.get("progress", {}).get("step", ""))}
    _atomic(d / MODEL_FILE, lambda p: save_file(cpu(model_weights), str(p), metadata=meta))
    if state is not None:
        _atomic(d / STATE_FILE, lambda p: save_file(cpu(state), str(p), metadata=meta))
    _atomic(d / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))


# The network's schema: (type, lowest, highest) per key of config["network"]. The bounds keep
# a hostile or mistyped config from allocating gigabytes; GroupNorm(8) needs multiples of 8.
NETWORK_SCHEMA = {"width": (8, 256), "num_classes": (1, 1000), "emb_dim": (1, 1024), "n_freq": (1, 256)}
MAX_LEVELS, MAX_MULT = 6, 8
METHODS = ("twinflow", "rcgm", "flow_matching")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_config(config: Any, path: os.PathLike) -> Dict[str, Any]:
    """Check config.json against the network's schema before anything is built; ValueError
    naming the key otherwise."""
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    net = config.get("network")
    if not isinstance(net, dict):
        raise ValueError(f"{path}: no 'network' section; not an MNIST checkpoint")
    unknown = sorted(set(net) - set(NETWORK_SCHEMA) - {"mults"})
    if unknown:
        raise ValueError(f"{path}: network: unknown keys {unknown}")
    for key, (lo, hi) in NETWORK_SCHEMA.items():
        if key not in net:
            raise ValueError(f"{path}: network.{key} is missing")
        v = net[key]
        if not _is_int(v) or not lo <= v <= hi:
            raise ValueError(f"{path}: network.{key} must be an int in [{lo}, {hi}], got {v!r}")
    if net["width"] % 8:
        raise ValueError(f"{path}: network.width must be a multiple of 8, got {net['width']}")
    mults = net.get("mults")
    if (not isinstance(mults, list) or not 1 <= len(mults) <= MAX_LEVELS
            or not all(_is_int(m) and 1 <= m <= MAX_MULT for m in mults)):
        raise ValueError(f"{path}: network.mults must be a list of 1 to {MAX_LEVELS} ints in [1, {MAX_MULT}], "
                         f"got {mults!r}")
    method = config.get("method")
    if method not in METHODS:
        raise ValueError(f"{path}: method must be one of {', '.join(METHODS)}, got {method!r}")
    return config


def read_config(directory: os.PathLike) -> Dict[str, Any]:
    d = Path(directory)
    path = d / CONFIG_FILE
    if d.is_file():
        hint = f" (give its folder, {d.parent})" if d.name in (MODEL_FILE, CONFIG_FILE) else ""
        raise ValueError(f"{d} is a file: a checkpoint is a directory holding {CONFIG_FILE} and {MODEL_FILE}{hint}")
    if not d.is_dir():
        shipped = "" if os.sep in str(directory) else f"; the shipped checkpoints are {', '.join(SHIPPED)}"
        raise FileNotFoundError(f"checkpoint directory {d} does not exist{shipped}")
    if not path.exists() or not (d / MODEL_FILE).exists():
        raise FileNotFoundError(f"{d} is not an MNIST checkpoint: expected {CONFIG_FILE} and {MODEL_FILE}")
    return validate_config(_files.read_json(path), path)


def load_model(directory: os.PathLike, device="cpu") -> Tuple[MnistUNet, Dict[str, Any]]:
    """The sampling network (eval mode) and the checkpoint's config."""
    config = read_config(directory)
    model = MnistUNet(**config["network"])
    model.load_state_dict(load_weights(directory, model))
    return model.to(device).eval(), config


def load_weights(directory: os.PathLike, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The checkpoint's sampling weights, checked against `model`'s keys and shapes."""
    path = Path(directory) / MODEL_FILE
    try:
        weights = load_file(str(_files.regular_file(path)))
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise ValueError(f"{path}: cannot read weights ({e})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [f"{k} {tuple(weights[k].shape)} (expected {tuple(expected[k].shape)})"
              for k in sorted(set(expected) & set(weights)) if expected[k].shape != weights[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path}: weights do not match the network "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {shapes[:3]})")
    # A file damaged in its data (header intact) loads; say so here, not as a NaN model output later.
    bad = sorted(k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise ValueError(f"{path}: {len(bad)} weight tensors hold NaN or Inf values ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}): the file is damaged or comes from a diverged run")
    return weights


def load_train_state(directory: os.PathLike) -> Optional[Dict[str, torch.Tensor]]:
    """The resume state, refused when it and config.json come from different saves (a save
    killed between its renames): resuming from it would not continue the same run."""
    from safetensors import safe_open

    path = Path(directory) / STATE_FILE
    if not path.exists():
        return None
    config = _files.read_json(Path(directory) / CONFIG_FILE)
    step = str(config.get("progress", {}).get("step", ""))
    for f in (path, Path(directory) / MODEL_FILE):
        try:
            with safe_open(str(_files.regular_file(f)), framework="pt") as h:
                saved = (h.metadata() or {}).get("step")
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"{f}: cannot read it ({e})") from None
        if saved is not None and saved != step:
            raise ValueError(f"{f} holds step {saved} but {CONFIG_FILE} step {step}: the last save was interrupted "
                             "between its files; resume from a copy of an earlier checkpoint or start over")
    try:
        return load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: cannot read the training state ({e})") from None
