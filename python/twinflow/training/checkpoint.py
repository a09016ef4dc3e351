"""Atomic, verifiable training checkpoints.

Layout of ``<output>/checkpoints/step-000123/``::

    transformer/            diffusers layout (config.json + diffusion_pytorch_model*.safetensors),
                            the aux embedder keys included        — full fine-tuning
    transformer_ema/        the EMA teacher, same layout          — when the config keeps one
    lora/, lora_teacher/    peft adapters (adapter_config.json + adapter_model.safetensors) — LoRA
    trainer_state.pt        step, epoch position, optimizer, lr scheduler, TwinFlowLoss EMA state
    rng_states.pt           every rank's RNG states
    twinflow_train.json     the resolved config, backbone and patch mode
    COMPLETE.json           written last: size and sha256 of every file above

Rank 0 writes everything into ``step-000123.tmp-<pid>`` and renames it when COMPLETE.json is
on disk, so a run killed mid-save leaves only a ``.tmp-`` folder, which is never loaded (and
removed by the next save). Loading checks every size and hash first.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
from typing import Dict, List, Optional

import torch

from .. import _files

MARKER = "COMPLETE.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
WEIGHTS = "diffusion_pytorch_model{suffix}.safetensors"


def step_dir(root: pathlib.Path, step: int) -> pathlib.Path:
    return root / f"step-{step:06d}"


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
        os.fsync(f.fileno())  # on disk before the marker says so
    return h.hexdigest()


def save_diffusers(folder: pathlib.Path, config_owner, state_dict: Dict[str, torch.Tensor]) -> None:
    """What ``ModelMixin.save_pretrained`` writes (config.json, safetensors shards of 10GB and
    their index), from a state dict, which is all rank 0 holds of an FSDP-sharded model."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config_owner.save_config(folder)
    if any(type(v.data if isinstance(v, torch.nn.Parameter) else v) is not torch.Tensor for v in state_dict.values()):
        raise ValueError("save_diffusers: quantized tensors in the state dict; dequantize them first")
    config = json.loads((folder / "config.json").read_text())
    if config.pop("quantization_config", None) is not None:  # a QLoRA base: these weights are plain
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    split = split_torch_state_dict_into_shards(state_dict, filename_pattern=WEIGHTS, max_shard_size="10GB")
    for fname, keys in split.filename_to_tensors.items():
        save_file({k: state_dict[k].contiguous() for k in keys}, str(folder / fname), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / (WEIGHTS.format(suffix="") + ".index.json")).write_text(json.dumps(index, indent=2))


def load_diffusers_weights(folder: pathlib.Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: Dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def save_peft(folder: pathlib.Path, lora_config, state_dict: Dict[str, torch.Tensor]) -> None:
    """peft's adapter format: adapter_config.json + adapter_model.safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    lora_config.save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})


def load_peft_weights(folder: pathlib.Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def write(root: pathlib.Path, step: int, writer) -> pathlib.Path:
    """Rank 0: ``writer(tmp_dir)`` fills a temp folder; hash it, write the marker, rename.
    When anything fails (a full disk) the temp folder is removed, the previous checkpoints
    stay, and an OSError becomes a one-line ValueError."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("step-*.tmp-*"):  # a save killed half-way
        shutil.rmtree(stale, ignore_errors=True)
    final = step_dir(root, step)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        writer(tmp)
        files = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        marker = tmp / MARKER
        marker.write_text(json.dumps({"step": step, "files": files}, indent=1))
        with open(marker, "rb") as f:
            os.fsync(f.fileno())
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            kept = complete_checkpoints(root)
            raise ValueError(f"cannot write checkpoint {final.name}: {e.strerror or e}; "
                             f"the previous checkpoint {kept[-1] if kept else '(none)'} is kept") from e
        raise
    if final.exists():  # re-saving a step (e.g. the final one): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    dfd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return final


def verify(path: pathlib.Path) -> dict:
    """The marker of a complete, intact checkpoint; ValueError naming what is wrong. Every
    name in the marker must stay inside the folder and be a regular file, and a folder named
    ``step-N`` must hold step N."""
    path = pathlib.Path(path)
    marker = path / MARKER
    if not path.is_dir():
        raise ValueError(f"checkpoint {path}: not a folder")
    if not marker.exists():
        raise ValueError(f"checkpoint {path}: incomplete ({MARKER} missing: the save was interrupted); "
                         "refusing to load it")
    try:
        info = _files.read_json(marker)
        files, step = info["files"], info["step"]
        if not isinstance(files, dict) or not isinstance(step, int) or isinstance(step, bool):
            raise TypeError("files must be an object and step an int")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {path}: unreadable {MARKER} ({e}); refusing to load it") from None
    m = _STEP_DIR.match(path.name)
    if m and int(m.group(1)) != step:
        raise ValueError(f"checkpoint {path}: the folder name says step {int(m.group(1))} but it holds step "
                         f"{step}; refusing to load it")
    for rel, meta in files.items():
        p = _files.inside(path, rel, f"checkpoint {path}: {MARKER}")
        if not p.exists():
            raise ValueError(f"checkpoint {path}: corrupt, {rel} is missing; refusing to load it")
        _files.regular_file(p, f"checkpoint {path}")
        if not isinstance(meta, dict) or not isinstance(meta.get("size"), int) or not isinstance(
                meta.get("sha256"), str):
            raise ValueError(f"checkpoint {path}: unreadable {MARKER} entry for {rel}; refusing to load it")
        if p.stat().st_size != meta["size"]:
            raise ValueError(f"checkpoint {path}: corrupt, {rel} has {p.stat().st_size} bytes, "
                             f"expected {meta['size']}; refusing to load it")
        if _sha256(p) != meta["sha256"]:
            raise ValueError(f"checkpoint {path}: corrupt, {rel} does not match its sha256; refusing to load it")
    for name in ("trainer_state.pt", "rng_states.pt"):  # loaded by name, so they must be covered
        if name not in files and (path / name).exists():
            raise ValueError(f"checkpoint {path}: {name} is not listed in {MARKER}; refusing to load it")
    return info


def marker_step(path: pathlib.Path) -> int:
    return _files.read_json(pathlib.Path(path) / MARKER)["step"]


def load_state(path: pathlib.Path):
    """A state file written by `torch.save` of plain containers and tensors, loaded with
    ``weights_only=True``: a checkpoint received from someone else cannot run code."""
    import pickle

    path = _files.regular_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as e:
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e) or "Weights only" in str(e):
            raise ValueError(f"{path}: holds objects other than tensors and plain containers (written by an "
                             "older twinflow, or not by twinflow); refusing to unpickle it") from None
        raise ValueError(f"{path}: unreadable ({e})") from None


def complete_checkpoints(root: pathlib.Path) -> List[pathlib.Path]:
    """Finished checkpoints (marker present), oldest first; temp folders are not listed."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: Optional[str], root: pathlib.Path, overwrite: bool = False) -> Optional[pathlib.Path]:
    """``--resume``: None/"none" → start fresh; "auto" → the newest complete checkpoint under
    `root` (none yet: fresh); a path → that checkpoint. The chosen one is verified.

    A fresh start into a `root` that holds checkpoints is refused unless `overwrite` (which
    deletes them): the new run would prune its own checkpoints in favour of the old, higher
    step numbers, and a later ``--resume auto`` would pick the old run."""
    if resume in (None, "", "none"):
        found = complete_checkpoints(root)
        if found and not overwrite:
            raise ValueError(f"{root} already holds checkpoints of an earlier run (newest: {found[-1].name}); "
                             "pass --resume auto to continue it, or --overwrite to delete them and start over")
        if overwrite and root.exists():
            shutil.rmtree(root)
        return None
    if overwrite:
        raise ValueError("--overwrite starts a fresh run: it cannot be combined with --resume")
    if resume == "auto":
        found = complete_checkpoints(root)
        if not found:
            return None
        path = found[-1]
    else:
        path = pathlib.Path(resume)
    verify(path)
    return path


def prune(root: pathlib.Path, keep_last: int) -> None:
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict:
    """Every RNG's state as tensors and numbers only (nothing that needs unpickling code)."""
    import random

    import numpy as np

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
             "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
