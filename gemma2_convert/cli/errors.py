"""One-line errors for every command: the project's errors, usage errors, interrupts, out-of-memory and OS
errors, and — as a last resort — bugs, each printed as one stderr line with a non-zero exit code."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import TypeVar

import click

from gemma2_convert.cli.console import print_error
from gemma2_convert.core.errors import ConversionError
from gemma2_convert.formats.output import NO_SPACE, Interrupted

T = TypeVar("T")

BUG_EXIT = 70  # EX_SOFTWARE


def quick_exit() -> None:
    """Make the interpreter's exit cheap: at exit, move all objects to the permanent generation, so the garbage
    collections of interpreter shutdown skip torch's hundreds of thousands of objects (0.5–1 s of every command on
    a 2-core machine). Reference counting still frees what it frees, files are still flushed and closed, and the
    other ``atexit`` handlers still run."""
    import atexit
    import gc

    atexit.register(gc.freeze)


def fail(message: str, code: int) -> None:
    """Print ``error: message`` (plain text, never markup, on one line) on stderr and exit."""
    print_error(message)
    sys.exit(code)


def _os_error(e: OSError) -> tuple[str, int]:
    where = e.filename or "output"
    if e.errno in NO_SPACE:
        return f"{where}: no space left (disk full or file size limit); the partial output was removed", 28
    return f"{e.filename or ''}: {e.strerror or e}".lstrip(": "), 1


def _on_sigterm(signum: int, _frame: object) -> None:
    raise Interrupted("interrupted by signal SIGTERM; no output was written")


def guarded(run: Callable[[], T], debug: bool) -> T | None:
    """Run a command; turn failures into one stderr line and an exit code (``debug`` re-raises). SIGTERM
    is reported like SIGINT (``atomic_output`` handles both while an output is being written)."""
    import threading

    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _on_sigterm) if main else None
    try:
        return _run(run, debug)
    finally:
        if main:
            signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


def _run(run: Callable[[], T], debug: bool) -> T | None:
    try:
        return run()
    except (click.exceptions.Exit, click.exceptions.Abort, SystemExit):
        raise
    except click.ClickException as e:
        if debug:
            raise
        fail(_usage_message(e), e.exit_code)
    except ConversionError as e:
        if debug:
            raise
        fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        fail("interrupted; no output was written", 130)
    except MemoryError:
        if debug:
            raise
        fail("out of memory; try --no-verify, a smaller --max-shard-size, or a machine with more RAM", 12)
    except OSError as e:
        if debug:
            raise
        fail(*_os_error(e))
    except Exception as e:  # a bug: still one line, the traceback with --debug
        if debug:
            raise
        fail(f"internal error ({type(e).__name__}: {e}); this is a bug in gemma2-convert — rerun with --debug "
             "for the traceback and report it", BUG_EXIT)
    return None


def _parse_guarded(make: Callable[[], click.Context], args: list[str]) -> click.Context:
    """``make_context`` with its usage errors (bad option values, missing arguments) as one line."""
    debug = "--debug" in args
    try:
        return make()
    except click.ClickException as e:
        if debug:
            raise
        fail(_usage_message(e), e.exit_code)
        raise  # unreachable: fail exits


def _usage_message(e: click.ClickException) -> str:
    ctx = getattr(e, "ctx", None)
    return e.format_message() + (f" (see {ctx.command_path} --help)" if ctx is not None else "")


class GuardedGroup(click.Group):
    """A click group whose subcommands report errors (usage errors included) through :func:`guarded`."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: object) -> click.Context:
        return _parse_guarded(lambda: super(GuardedGroup, self).make_context(info_name, args, parent, **extra),
                              list(args))

    def invoke(self, ctx: click.Context) -> object:
        return guarded(lambda: super(GuardedGroup, self).invoke(ctx), bool(ctx.params.get("debug")))


class GuardedCommand(click.Command):
    """A single click command that reports errors (usage errors included) through :func:`guarded`."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: object) -> click.Context:
        return _parse_guarded(lambda: super(GuardedCommand, self).make_context(info_name, args, parent, **extra),
                              list(args))

    def invoke(self, ctx: click.Context) -> object:
        return guarded(lambda: super(GuardedCommand, self).invoke(ctx), bool(ctx.params.get("debug")))
