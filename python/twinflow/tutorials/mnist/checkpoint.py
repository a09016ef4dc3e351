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
    _atomic(d / MODEL_FILE, lambda p: save_file(cpu(model_weights), str(p)))
    if state is not None:
        _atomic(d / STATE_FILE, lambda p: save_file(cpu(state), str(p)))
    _atomic(d / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))


def read_config(directory: os.PathLike) -> Dict[str, Any]:
    d = Path(directory)
    path = d / CONFIG_FILE
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory {d} does not exist")
    if not path.is_file() or not (d / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{d} is not an MNIST checkpoint: expected {CONFIG_FILE} and {MODEL_FILE}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if "network" not in config:
        raise ValueError(f"{path}: no 'network' section; not an MNIST checkpoint")
    return config


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
        weights = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise ValueError(f"{path}: cannot read weights ({e})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"{path}: weights do not match the network "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {shapes[:3]})")
    return weights


def load_train_state(directory: os.PathLike) -> Optional[Dict[str, torch.Tensor]]:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: cannot read the training state ({e})") from None
