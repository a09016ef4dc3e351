"""Verbosity of twinflow's loggers, set the way diffusers sets its own.

Library modules log with ``logging.getLogger(__name__)`` (never ``print``). The level of the
``twinflow`` logger comes from ``TWINFLOW_VERBOSITY`` (debug, info, warning, error, critical;
like ``DIFFUSERS_VERBOSITY``), default warning, or from ``twinflow.set_verbosity``. As a
library twinflow adds no handler (records go where the application sends them); the
``twinflow`` command adds one that writes to stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Union

__all__ = ["get_verbosity", "set_verbosity", "add_stderr_handler", "no_library_progress_bars"]

ROOT = "twinflow"
ENV = "TWINFLOW_VERBOSITY"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL}


def set_verbosity(level: Union[int, str]) -> None:
    """Level of every ``twinflow.*`` logger: a ``logging`` constant or one of the names above."""
    if isinstance(level, str):
        if level.lower() not in LEVELS:
            raise ValueError(f"verbosity: expected one of {list(LEVELS)}, got {level!r}")
        level = LEVELS[level.lower()]
    if isinstance(level, bool) or not isinstance(level, int):
        raise TypeError(f"verbosity: expected a logging level or a name, got {type(level).__name__}")
    logging.getLogger(ROOT).setLevel(level)


def get_verbosity() -> int:
    return logging.getLogger(ROOT).getEffectiveLevel()


def _from_environment() -> None:
    text = os.environ.get(ENV)
    if text and text.lower() not in LEVELS:
        logging.getLogger(ROOT).warning("%s=%s is not one of %s; using warning", ENV, text, ", ".join(LEVELS))
        text = None
    set_verbosity(text or "warning")


def add_stderr_handler() -> None:
    """Show twinflow's records on stderr (once per process; for the command line)."""
    root = logging.getLogger(ROOT)
    if not any(getattr(h, "_twinflow", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
        handler._twinflow = True
        root.addHandler(handler)


_from_environment()

#: loggers whose import-time warnings say nothing a twinflow command's user can act on: torch's
#: pytree deprecation of ``register_constant`` for torchao's enums, and diffusers' note that
#: torchao's tensor classes could not be imported (torchao ≥ 0.16 moved them); both appear at
#: ``import diffusers`` once torchao is installed ([quant] extra)
IMPORT_NOISE = ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


def quiet_import_noise() -> None:
    """Errors only from the ``IMPORT_NOISE`` loggers (for the command line: its one-line errors
    stay one line). Library use keeps every library's defaults."""
    for name in IMPORT_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def no_library_progress_bars(quiet: bool = True):
    """diffusers', transformers' and huggingface_hub's own bars (loading components, weights,
    downloads, a pipeline's steps) off while the block runs, then as they were; for ``--quiet``.
    Our own bars take a ``progress`` argument instead."""
    if not quiet:
        yield
        return
    switches = []
    try:
        from diffusers.utils import logging as dl

        switches.append((dl.is_progress_bar_enabled(), dl.disable_progress_bar, dl.enable_progress_bar))
    except ImportError:
        pass
    try:
        from transformers.utils import logging as tl

        switches.append((tl.is_progress_bar_enabled(), tl.disable_progress_bar, tl.enable_progress_bar))
    except ImportError:
        pass
    try:
        import huggingface_hub.utils as hu

        switches.append((not hu.are_progress_bars_disabled(), hu.disable_progress_bars, hu.enable_progress_bars))
    except ImportError:
        pass
    for _, off, _ in switches:
        off()
    try:
        yield
    finally:
        for was_on, _, on in switches:
            if was_on:
                on()
