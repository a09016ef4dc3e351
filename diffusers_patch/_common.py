"""Helpers shared by the per-backbone patches."""

from __future__ import annotations

import copy
import functools
import weakref
from typing import Callable, Dict, Optional

import torch

# Attribute of a patched transformer: the tt tensor (t units, 1 = noise), an object with a
# `tt` tensor attribute (a TwinFlowScheduler), a weak reference to a pipeline (its scheduler
# *at call time* is the source, so `pipe.scheduler = ...` rewires), or None (tt = t).
# Set with object.__setattr__ so that a tensor is not registered as a buffer (no state-dict key).
TT_ATTR = "_twinflow_tt"
# Attribute recording (model, mode) of a patched transformer.
PATCH_ATTR = "_twinflow_patch"


def is_patched(transformer: torch.nn.Module) -> bool:
    return getattr(transformer, PATCH_ATTR, None) is not None


def _pipeline_scheduler(ref: "weakref.ref"):
    pipe = ref()
    if pipe is None:  # weak: the transformer must not keep its pipeline alive
        raise ValueError("the TwinFlow transformer is wired to a pipeline that no longer exists; wire it again "
                         "with diffusers_patch.set_target_time(transformer, pipe)")
    sched = getattr(pipe, "scheduler", None)
    # A stock scheduler has no target time: tt = t, the stock model (docs/algorithm.md §4).
    return sched if isinstance(getattr(sched, "tt", None), torch.Tensor) else None


def target_time(transformer: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
    """tt broadcast to the shape of `t` ([B], t units), or `t` itself when no tt is set.
    The source is a tensor, an object whose `tt` attribute is one, or a pipeline whose current
    scheduler is such an object (all read at every call)."""
    tt = getattr(transformer, TT_ATTR, None)
    if isinstance(tt, weakref.ref):
        tt = _pipeline_scheduler(tt)
    if tt is not None and not isinstance(tt, torch.Tensor):
        note = getattr(tt, "_note_tt_read", None)
        if note is not None:  # lets a TwinFlowScheduler's step check that its own tt was read
            note()
        tt = tt.tt
    if tt is None:
        return t
    return tt.to(device=t.device, dtype=t.dtype).expand_as(t) if tt.numel() == 1 else tt.to(t.device, t.dtype)


def scaled_times(transformer: torch.nn.Module, timestep: torch.Tensor, scale: float):
    """(t, tt) in t units and at least float32, for a model fed timestep = t · scale."""
    t = timestep.to(torch.promote_types(timestep.dtype, torch.float32)) / scale
    return t, target_time(transformer, t)


def lora_label(t: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
    """The single time label of the LoRA variant (docs/algorithm.md §4), in t units."""
    return t - tt / 2


def mark(transformer: torch.nn.Module, model: str, mode: str) -> None:
    if mode not in ("aux", "lora"):
        raise ValueError(f'mode: expected "aux" or "lora", got {mode!r}')
    object.__setattr__(transformer, PATCH_ATTR, (model, mode))
    if not hasattr(transformer, TT_ATTR):
        object.__setattr__(transformer, TT_ATTR, None)


def patched_mode(transformer: torch.nn.Module) -> Optional[str]:
    p = getattr(transformer, PATCH_ATTR, None)
    return None if p is None else p[1]


# On a hooked embedder: its instance-level `forward` before patching (None: the class's).
_SAVED = "_twinflow_saved_forward"


def fresh_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of an embedder without any instance-level forward wrapper."""
    aux = copy.deepcopy(module)
    aux.__dict__.pop("forward", None)
    aux.__dict__.pop(_SAVED, None)
    return aux


def install(transformer: torch.nn.Module, *, model: str, mode: str, embed_name: str, aux_name: str,
            forwards: Dict[str, Callable], make_aux: Callable[[torch.nn.Module], torch.nn.Module] = fresh_copy
            ) -> torch.nn.Module:
    """The common patching flow: idempotent per mode, the aux embedder registered at `aux_name`
    (kept when already there, e.g. trained weights), and the embedder's forward replaced by
    ``forwards[mode](transformer, original_forward, *args)`` on the instance, so parameter
    names do not change. functools.partial (not a closure): a deep copy of the transformer
    rebinds to the copy's modules."""
    if mode not in forwards:
        raise ValueError(f'mode: expected one of {sorted(forwards)}, got {mode!r}')
    current = patched_mode(transformer)
    if current == mode:
        return transformer
    if current is not None:
        raise ValueError(f"{model}: already patched in mode {current!r}; unpatch it first")
    embed = getattr(transformer, embed_name)
    if mode == "aux" and not isinstance(getattr(transformer, aux_name, None), torch.nn.Module):
        transformer.add_module(aux_name, make_aux(embed))
    hook(transformer, embed_name, forwards[mode])
    mark(transformer, model, mode)
    return transformer


def hook(transformer: torch.nn.Module, name: str, forward: Callable) -> None:
    """Replace the forward of the submodule `name` on its instance by
    ``forward(transformer, original_forward, *args)``; ``uninstall(embed_name=name)`` undoes it."""
    module = getattr(transformer, name)
    object.__setattr__(module, _SAVED, module.__dict__.get("forward"))
    module.forward = functools.partial(forward, transformer, module.forward)


def uninstall(transformer: torch.nn.Module, *, embed_name: str, aux_name: str) -> torch.nn.Module:
    """Undo `install`: the stock forward, no aux embedder, no tt wiring."""
    embed = getattr(transformer, embed_name)
    if _SAVED in embed.__dict__:
        saved = embed.__dict__.pop(_SAVED)
        if saved is None:
            embed.__dict__.pop("forward", None)
        else:
            embed.forward = saved
    if aux_name in transformer._modules:
        del transformer._modules[aux_name]
    transformer.__dict__.pop(PATCH_ATTR, None)
    transformer.__dict__.pop(TT_ATTR, None)
    # twinflow.saved_format marks a patched instance's __module__ (what diffusers records as
    # its library when saving); the stock transformer saves as the stock class again
    transformer.__dict__.pop("__module__", None)
    return transformer
