"""TwinFlow patches for stock diffusers transformers (docs/algorithm.md §4).

A TwinFlow backbone has a second timestep embedder for the target time tt, scaled by
(t − tt) so that it vanishes when tt = t: the patched transformer then behaves exactly like
the stock one. ``patch(transformer, model)`` adds that embedder under the key names of the
published checkpoints; ``set_target_time(transformer, scheduler)`` wires it to the
``TwinFlowScheduler`` whose ``tt`` tensor is updated in place before every model call.
Without a target time (``None``) tt = t.

One module per backbone (``qwen_image``, ``z_image``, ``sd3``, ``sana``, ``openuni``, ``flux``,
``chroma``, ``lumina2``, ``wan``; the editing families ``qwen_image_edit``, ``qwen_image_edit_plus``,
``flux_kontext``) holds everything
specific to it in one ``Backbone`` object, ``BACKBONE`` (classes, time mapping, aux keys and
initialisation, pipeline call arguments, training glue; see ``_backbone.py``), and exposes
``AUX_PREFIX``, ``patch(transformer, mode="aux" | "lora")`` and ``unpatch``. ``BACKBONES`` below
is the one registry of backbones: every other module asks it (``backbone(name)``). Adding a
backbone is adding its module and one line here.
"""

from __future__ import annotations

if __name__ == "diffusers_patch":  # the deprecated top-level name: become twinflow.diffusers_patch
    from twinflow._deprecated import alias_diffusers_patch

    alias_diffusers_patch()

import importlib
import weakref

import torch

from typing import Dict

from ._backbone import Backbone
from ._common import PATCH_ATTR, TT_ATTR, is_patched

#: The registry: backbone name → the module defining its ``BACKBONE`` (a module of this
#: package, or a full dotted module path). Importing a backbone module does not import
#: diffusers, so listing names stays cheap.
BACKBONES = {
    "qwen-image": "qwen_image",
    "z-image": "z_image",
    "sd3": "sd3",
    "sana": "sana",
    "openuni": "openuni",
    "flux": "flux",
    "chroma": "chroma",
    "lumina2": "lumina2",
    "wan": "wan",
    "qwen-image-edit": "qwen_image_edit",
    "qwen-image-edit-plus": "qwen_image_edit_plus",
    "flux-kontext": "flux_kontext",
}

__all__ = ["BACKBONES", "Backbone", "backbone", "backbones", "canonical_name", "module_for", "patch",
           "set_target_time", "is_patched"]


def canonical_name(model: str) -> str:
    """The registry name of `model` ("Z_Image" → "z-image"); ValueError naming the choices."""
    key = model.lower().replace("_", "-") if isinstance(model, str) else model
    if key not in BACKBONES:
        raise ValueError(f"model: unknown backbone {model!r}, expected one of {sorted(BACKBONES)}")
    return key


def module_for(model: str):
    """The module of a backbone name ("qwen-image", "z-image", "sd3", "sana", ...: ``BACKBONES``)."""
    module = BACKBONES[canonical_name(model)]
    return importlib.import_module(module if "." in module else f"{__name__}.{module}")


def backbone(model: str) -> Backbone:
    """The ``Backbone`` of a registered name."""
    return module_for(model).BACKBONE


def backbones() -> Dict[str, Backbone]:
    """{name: Backbone} for every registered backbone, in registry order."""
    return {name: backbone(name) for name in BACKBONES}


def patch(transformer: torch.nn.Module, model: str, mode: str = "aux") -> torch.nn.Module:
    """Patch `transformer` (in place) as the TwinFlow backbone of `model`; returns it."""
    return backbone(model).patch(transformer, mode=mode)


def set_target_time(transformer: torch.nn.Module, tt) -> None:
    """Point a patched transformer at the target time tt (t units: 1 = noise, 0 = data): a
    tensor; a TwinFlowScheduler (its current ``tt`` is read at every call, which follows the
    scheduler across devices); or a pipeline (held weakly): then the scheduler the pipeline
    holds *at call time* is read, so ``pipe.scheduler = TwinFlowScheduler.from_config(...)``
    needs no rewiring, and a stock scheduler there means tt = t. None restores tt = t."""
    if not is_patched(transformer):
        raise ValueError("set_target_time: the transformer is not patched (call diffusers_patch.patch first)")
    if tt is not None and not isinstance(tt, torch.Tensor) and not isinstance(getattr(tt, "tt", None), torch.Tensor):
        if not (hasattr(tt, "scheduler") and hasattr(tt, "transformer")):
            raise TypeError(f"tt must be a torch.Tensor, a scheduler with a `tt` tensor, a pipeline or None; "
                            f"got {type(tt).__name__}")
        family = getattr(transformer, PATCH_ATTR)[0]
        if family in BACKBONES:  # e.g. Wan 2.2 A14B still routing steps to its second expert
            backbone(family).check_pipeline(tt)
        tt = weakref.ref(tt)
    object.__setattr__(transformer, TT_ATTR, tt)


def __getattr__(name):
    # The registry's old name (until 2026-12): one name now, BACKBONES.
    if name == "MODELS":
        import warnings

        warnings.warn("diffusers_patch.MODELS is now diffusers_patch.BACKBONES", DeprecationWarning, stacklevel=2)
        return BACKBONES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
