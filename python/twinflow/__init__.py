"""twinflow: one- and few-step generation for flow-matching models.

The sampler math runs in a Rust core on libtorch (``twinflow._core``).
"""

# torch must be imported first: it loads libtorch (and libtorch_python) that the
# native module links against.
import torch  # noqa: F401

from ._core import UnifiedSampler, __version__, ucgm_step
from .losses import TwinFlowLoss


def __getattr__(name):
    # The scheduler imports diffusers: load it only when asked for.
    if name == "TwinFlowScheduler":
        from .scheduler import TwinFlowScheduler

        return TwinFlowScheduler
    raise AttributeError(f"module 'twinflow' has no attribute {name!r}")


__all__ = ["UnifiedSampler", "TwinFlowLoss", "TwinFlowScheduler", "ucgm_step", "__version__"]
