"""twinflow: one- and few-step generation for flow-matching models.

``UnifiedSampler.sample`` is a Python loop (``twinflow.sampler``); the update between model
calls and the training objective run in a Rust core on libtorch (``twinflow._core``).
"""

# torch must be imported first: it loads libtorch (and libtorch_python) that the
# native module links against.
import torch  # noqa: F401

from ._core import MAX_SAMPLING_STEPS, __version__, ucgm_step
from .losses import TwinFlowLoss
from .sampler import UnifiedSampler


# Names whose modules import diffusers: loaded only when asked for.
_LAZY = {"TwinFlowScheduler": "scheduler", "TwinFlowPresetScheduler": "scheduler", "scheduler_for_steps": "scheduler",
         "preset_for_steps": "scheduler", "load_pipeline": "pipelines"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'twinflow' has no attribute {name!r}")


__all__ = ["UnifiedSampler", "TwinFlowLoss", "ucgm_step", "MAX_SAMPLING_STEPS", "__version__", *_LAZY]
