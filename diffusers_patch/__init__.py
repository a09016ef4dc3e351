"""TwinFlow patches for stock diffusers transformers (SPEC §4).

A TwinFlow backbone has a second timestep embedder for the target time tt, scaled by
(t − tt) so that it vanishes when tt = t: the patched transformer then behaves exactly like
the stock one. ``patch(transformer, model)`` adds that embedder under the key names of the
published checkpoints; ``set_target_time(transformer, scheduler)`` wires it to the
``TwinFlowScheduler`` whose ``tt`` tensor is updated in place before every model call.
Without a target time (``None``) tt = t.

One module per backbone: ``qwen_image``, ``z_image``, ``sd3``, ``sana``. Each exposes
``AUX_PREFIX``, ``patch(transformer, mode="aux" | "lora")`` and ``unpatch``.
"""

from __future__ import annotations

import importlib
import torch

from ._common import TT_ATTR, is_patched

MODELS = {"qwen-image": "qwen_image", "z-image": "z_image", "sd3": "sd3", "sana": "sana"}

__all__ = ["MODELS", "module_for", "patch", "set_target_time", "is_patched"]


def module_for(model: str):
    """The patch module of a backbone name ("qwen-image", "z-image", "sd3", "sana")."""
    key = model.lower().replace("_", "-")
    if key not in MODELS:
        raise ValueError(f"model: unknown backbone {model!r}, expected one of {sorted(MODELS)}")
    return importlib.import_module(f"{__name__}.{MODELS[key]}")


def patch(transformer: torch.nn.Module, model: str, mode: str = "aux") -> torch.nn.Module:
    """Patch `transformer` (in place) as the TwinFlow backbone of `model`; returns it."""
    return module_for(model).patch(transformer, mode=mode)


def set_target_time(transformer: torch.nn.Module, tt) -> None:
    """Point a patched transformer at the target time tt (t units: 1 = noise, 0 = data): a
    tensor, or a TwinFlowScheduler (then its current ``tt`` is read at every call, which
    follows the scheduler across devices); None restores tt = t."""
    if not is_patched(transformer):
        raise ValueError("set_target_time: the transformer is not patched (call diffusers_patch.patch first)")
    if not (tt is None or isinstance(tt, torch.Tensor) or isinstance(getattr(tt, "tt", None), torch.Tensor)):
        raise TypeError(f"tt must be a torch.Tensor, a scheduler with a `tt` tensor, or None; got {type(tt).__name__}")
    object.__setattr__(transformer, TT_ATTR, tt)
