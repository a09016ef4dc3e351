"""The deprecated top-level name ``diffusers_patch`` (now ``twinflow.diffusers_patch``).

``import diffusers_patch`` runs the top-level package's ``__init__`` under that name; it calls
``alias_diffusers_patch()``, which puts ``twinflow.diffusers_patch`` and every submodule of it
in ``sys.modules`` under the old names, so that the old name gives the very same modules (one
registry, one set of classes) instead of a second copy. Our own code never imports the old
name: a user's ``diffusers_patch.py`` that shadows it cannot break twinflow.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings

OLD, NEW = "diffusers_patch", "twinflow.diffusers_patch"


def alias_diffusers_patch() -> None:
    warnings.warn(f"`import {OLD}` is deprecated; use `from twinflow import diffusers_patch`",
                  DeprecationWarning, stacklevel=3)
    package = importlib.import_module(NEW)
    sys.modules[OLD] = package
    # Importing a backbone module does not import diffusers, so aliasing them all is cheap.
    for info in pkgutil.iter_modules(package.__path__):
        sys.modules[f"{OLD}.{info.name}"] = importlib.import_module(f"{NEW}.{info.name}")
