"""The CLI's one error boundary: every failure a command lets escape ends as one line on stderr.

A user-caused failure (``IrisError``) prints its message and exits 1. Anything else is a bug in Iris
or a library: it prints one line naming the exception and exits 2. ``--debug`` (or ``IRIS_DEBUG=1``)
shows the full traceback instead. Commands therefore raise errors and never print them. Messages
quote paths, server replies and stored text, so they reach the terminal through ``cli.terminal``.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from assistant.errors import IrisError, one_line
from cli.terminal import make_console, styled

DEBUG_ENV = "IRIS_DEBUG"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def report(error: BaseException) -> int:
    """Print ``error`` as one line on stderr (with its traceback when debugging); returns the exit status."""
    console = make_console(stderr=True, soft_wrap=True)
    if debug_enabled():
        console.print(styled("".join(traceback.format_exception(error))), end="")
    if isinstance(error, IrisError):
        console.print(styled(("error:", "bold red"), " " + one_line(error)))
        return 1
    console.print(styled(("internal error:", "bold red"), f" {type(error).__name__}: {one_line(error)} "
                         "(run with --debug for the traceback)"))
    return 2


def _refuse_undecodable(arguments: Sequence[str]) -> None:
    """Python carries argv bytes that are not UTF-8 as lone surrogates, which no store or terminal accepts."""
    for position, argument in enumerate(arguments, 1):
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:
            sys.exit(report(IrisError(f"argument {position} is not valid UTF-8: {argument}")))


class IrisGroup(TyperGroup):
    """The top-level command group; subcommands (and sub-groups) run inside its ``invoke``."""

    def main(self, args: Sequence[str] | None = None, *rest: Any, **options: Any) -> Any:
        _refuse_undecodable(sys.argv[1:] if args is None else args)
        return super().main(args, *rest, **options)

    def invoke(self, ctx: Any) -> Any:  # typer's Context is its vendored click's
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):  # exits and usage errors: the CLI library reports them
            raise
        except Exception as error:  # the boundary: nothing else may show a traceback to the user
            raise typer.Exit(report(error)) from None
