"""The old name of :mod:`twinflow.lora_files` (until 2026-12; it saves and loads, so it was
renamed): importing it works and warns."""

import warnings

from .lora_files import *  # noqa: F401,F403
from .lora_files import __all__  # noqa: F401

warnings.warn("twinflow.lora_export is now twinflow.lora_files", DeprecationWarning, stacklevel=2)
