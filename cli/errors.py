"""The CLI's one error boundary: every failure a command lets escape ends as one line on stderr.

A user-caused failure (``IrisError``) prints its message and exits 1. Anything else is a bug in Iris
or a library: it prints one line naming the exception and exits 2. ``--debug`` (or ``IRIS_DEBUG=1``)
shows the full traceback instead. Commands therefore raise errors and never print them.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup
from typer.exceptions import TyperException

from assistant.errors import IrisError, one_line

DEBUG_ENV = "IRIS_DEBUG"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def report(error: BaseException) -> int:
    """Print ``error`` as one line on stderr (with its traceback when debugging); returns the exit status."""
    console = Console(stderr=True, soft_wrap=True, highlight=False)
    if debug_enabled():
        console.print(escape("".join(traceback.format_exception(error))), end="", markup=True)
    if isinstance(error, IrisError):
        console.print(f"[bold red]error:[/bold red] {escape(one_line(error))}")
        return 1
    console.print(f"[bold red]internal error:[/bold red] {escape(type(error).__name__)}: {escape(one_line(error))} "
                  f"(run with --debug for the traceback)")
    return 2


class IrisGroup(TyperGroup):
    """The top-level command group; subcommands (and sub-groups) run inside its ``invoke``."""

    def invoke(self, ctx: Any) -> Any:  # typer's Context is its vendored click's
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):  # exits and usage errors: the CLI library reports them
            raise
        except Exception as error:  # the boundary: nothing else may show a traceback to the user
            raise typer.Exit(report(error)) from None
