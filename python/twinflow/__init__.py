"""twinflow: one- and few-step generation for flow-matching models.

``UnifiedSampler.sample`` is a Python loop (``twinflow.sampler``); the update between model
calls and the training objective run in a Rust core on libtorch (``twinflow._core``).
"""

# torch must be imported first: it loads libtorch (and libtorch_python) that the
# native module links against.
import torch  # noqa: F401

from ._core import MAX_SAMPLING_STEPS, __version__, ucgm_step
from ._logging import get_verbosity, set_verbosity
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


def __dir__():
    # The lazy names too, so that tab completion and dir() show the whole public API.
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["UnifiedSampler", "TwinFlowLoss", "ucgm_step", "MAX_SAMPLING_STEPS", "__version__", "get_verbosity",
           "set_verbosity", *_LAZY]
