"""One-line errors for every command: the project's errors, out-of-memory and OS errors."""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from typing import TypeVar

import click

from gemma2_convert.errors import ConversionError

T = TypeVar("T")


def fail(message: str, code: int) -> None:
    """Print ``error: message`` (plain text, never markup) on one stderr line and exit."""
    from rich.markup import escape

    from gemma2_convert.console import err

    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    sys.exit(code)


def guarded(run: Callable[[], T], debug: bool) -> T | None:
    """Run a command; turn expected failures into one stderr line and an exit code (``debug`` re-raises)."""
    try:
        return run()
    except ConversionError as e:
        if debug:
            raise
        fail(str(e), e.exit_code)
    except MemoryError:
        if debug:
            raise
        fail("out of memory; try --no-verify, a smaller --max-shard-size, or a machine with more RAM", 12)
    except OSError as e:
        if debug:
            raise
        if e.errno in (errno.ENOSPC, errno.EFBIG):
            fail(f"{e.filename or 'output'}: no space left (disk full or file size limit); "
                 "the partial output was removed", 28)
        fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "), 1)
    return None


class GuardedGroup(click.Group):
    """A click group whose subcommands report errors through :func:`guarded`."""

    def invoke(self, ctx: click.Context) -> object:
        return guarded(lambda: super(GuardedGroup, self).invoke(ctx), bool(ctx.params.get("debug")))


class GuardedCommand(click.Command):
    """A single click command that reports errors through :func:`guarded`."""

    def invoke(self, ctx: click.Context) -> object:
        return guarded(lambda: super(GuardedCommand, self).invoke(ctx), bool(ctx.params.get("debug")))
