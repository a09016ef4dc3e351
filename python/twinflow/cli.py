"""Command-line interface: ``twinflow <command> ...`` (also ``python -m twinflow``).

Commands live in a registry. To add one, write a ``run(args) -> int`` function
and register it with its argument builder::

    def _add_foo_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--bar", type=int, default=1)

    @register_command("foo", help="one line for `twinflow --help`",
                      add_arguments=_add_foo_arguments)
    def _run_foo(args: argparse.Namespace) -> int:
        ...
        return 0

in a module named in ``_COMMAND_MODULES`` (imported when the parser is built).
A command that raises ``ValueError`` (invalid user input), ``FileNotFoundError``, ``FloatingPointError``
(NaN/Inf) or ``ImportError`` (a missing or too old dependency) gets a one-line
``twinflow <command>: error: ...`` and exit status 1; ``main`` returns the
command's exit status.

Commands: ``demo`` (twinflow.demo), ``generate`` (twinflow.generate),
``train`` (twinflow.training.command), ``mnist`` (twinflow.tutorials.mnist.cli),
``tiny-pipeline`` (twinflow.tiny).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

__all__ = ["Command", "COMMANDS", "register_command", "build_parser", "main", "positive_int"]

PROG = "twinflow"


# --------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: Optional[str] = None


COMMANDS: Dict[str, Command] = {}

# Modules that register their commands on import (kept out of `twinflow --help`'s imports
# until the parser is built).
_COMMAND_MODULES: Sequence[str] = ("twinflow.demo", "twinflow.generate", "twinflow.tutorials.mnist.cli",
                                     "twinflow.training.command", "twinflow.tiny",
                                     "twinflow.export_gguf")


def register_command(name: str, *, help: str,
                     add_arguments: Callable[[argparse.ArgumentParser], None],
                     description: Optional[str] = None):
    """Decorator: register ``run(args) -> int`` as the sub-command ``name``."""
    def decorate(run: Callable[[argparse.Namespace], int]):
        if name in COMMANDS:
            raise ValueError(f"command {name!r} is already registered")
        COMMANDS[name] = Command(name, help, add_arguments, run, description)
        return run
    return decorate


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("twinflow")
    except Exception:  # not installed as a distribution (e.g. a source tree)
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    for module in _COMMAND_MODULES:
        importlib.import_module(module)
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="TwinFlow: one- and few-step generation for flow-matching models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        cmd.add_arguments(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console-script entry point; returns the exit status."""
    from ._logging import add_stderr_handler, quiet_import_noise

    add_stderr_handler()  # twinflow's log records (TWINFLOW_VERBOSITY) on stderr
    quiet_import_noise()
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        rc = COMMANDS[args.command].run(args)
    # bad input, a missing file, NaN/Inf values, a missing or too old dependency
    except (ValueError, FileNotFoundError, FloatingPointError, ImportError) as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0 if rc is None else int(rc)
