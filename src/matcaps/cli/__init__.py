"""The ``matcaps`` command: ``matcaps data|train|test|plot|compare|bench`` and more.

Each sub-command lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a callable taking
the parsed namespace and returning an exit code.  Errors a user can cause are raised as
:class:`matcaps.errors.MatcapsError` anywhere below and reported here as one line with
exit code 2; the library itself never prints or exits.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from matcaps import __version__
from matcaps.errors import MatcapsError

#: Sub-command modules, in the order ``matcaps --help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "data", "train", "test", "predict", "show", "attack", "viewpoints", "plot", "compare", "bench",
)

#: Exit code for errors caused by the user's input (argparse uses the same).
USAGE_ERROR_EXIT_CODE = 2
#: Exit code when the reader of our output went away (``matcaps predict ... | head``): 128 + SIGPIPE (13),
#: what a shell reports for a program that the signal ended.
BROKEN_PIPE_EXIT_CODE = 141


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser that reports a bad command line in one line, like every other error.

    argparse's own ``error`` prints the whole usage (more than 20 lines for ``train``)
    before the message; this one prints ``PROG: error: MESSAGE (see PROG --help)`` and
    exits with :data:`USAGE_ERROR_EXIT_CODE`.  Sub-command parsers inherit the class.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR_EXIT_CODE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command registered."""
    parser = OneLineErrorParser(
        prog="matcaps",
        description="Matrix capsules with EM routing: data, training, evaluation, benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"matcaps {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"matcaps.cli.{name}").register(subparsers)
    parser.set_defaults(command_parsers=subparsers.choices)
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, but an unknown option is blamed on its sub-command (``matcaps train: …``)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args.command_parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``matcaps`` console script; returns the process exit code."""
    parser = build_parser()
    args = parse_arguments(parser, argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe is found here, not at exit, where it could not be handled
        return code
    except BrokenPipeError:
        silence_stdout()
        return BROKEN_PIPE_EXIT_CODE
    except MatcapsError as error:
        print(f"matcaps {args.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print(f"matcaps {args.command}: interrupted", file=sys.stderr)
        return 130


def silence_stdout() -> None:
    """Point standard output at the null device, so that Python's final flush into a closed pipe is silent.

    The recipe of Python's documentation for ``SIGPIPE`` (``signal`` module, "Note on SIGPIPE").
    """
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a captured stream): nothing is flushed at exit
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, descriptor)
    os.close(null)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
