"""The ``gemma2-convert`` command: a thin click layer over library functions.

Every command parses its options, then calls one library function. Bad input raises a
ConversionError, printed here as one line on stderr (a traceback only with ``--debug``).
"""

from __future__ import annotations

import errno
import shutil
import sys
import tempfile
from pathlib import Path

import click

from gemma2_convert import __version__
from gemma2_convert.errors import ConversionError


class _Group(click.Group):
    """Turns the project's errors into one stderr line and a non-zero exit code."""

    def invoke(self, ctx: click.Context) -> object:
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except ConversionError as e:
            if debug:
                raise
            _fail(str(e), e.exit_code)
        except MemoryError:
            if debug:
                raise
            _fail("out of memory; try --no-verify, a smaller --max-shard-size, or a machine with more RAM", 12)
        except OSError as e:
            if debug:
                raise
            if e.errno == errno.ENOSPC:
                _fail(f"{e.filename or 'output'}: disk full; the partial output was removed", 28)
            _fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "), 1)
        return None


def _fail(message: str, code: int) -> None:
    from gemma2_convert.console import err

    err.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    sys.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gemma2-convert")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Convert, quantize and verify Google Gemma 2 checkpoints — exact, streaming, provable.

    \b
    Examples:
      gemma2-convert demo
      gemma2-convert orig-to-hf model.ckpt ./gemma-2-2b-hf --tokenizer tokenizer.model
      gemma2-convert verify ./gemma-2-2b-hf model.ckpt
    """


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the demo's files here (must be empty or absent). Default: a temporary directory, deleted after.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random tiny model.")
def demo(workdir: Path | None, seed: int) -> None:
    """Build a tiny Gemma 2, convert it to every layout, quantize it, verify each step, print a table.

    \b
    Example:
      gemma2-convert demo --workdir ./demo-out
    """
    from gemma2_convert.console import human_bytes, out, table
    from gemma2_convert.demo import run_demo
    from gemma2_convert.output import check_output

    tmp = workdir is None
    work = Path(tempfile.mkdtemp(prefix="gemma2-demo-")) if tmp else workdir
    if not tmp:
        check_output(work, force=False)
        work.mkdir(parents=True, exist_ok=True)
    try:
        rows = run_demo(work, seed, on_row=lambda r: out.print(f"[dim]✓ {r.step}[/]" if r.ok else f"[red]✗ {r.step}"))
    finally:
        if tmp:
            shutil.rmtree(work, ignore_errors=True)
    out.print(table("gemma2-convert demo", ["step", "artifact", "size", "check", "result", "time"], [
        (r.step, r.artifact, human_bytes(r.size) if r.size else "", r.check,
         "[green]PASS" if r.ok else "[red]FAIL", f"{r.seconds:.2f}s") for r in rows]))
    if not all(r.ok for r in rows):
        sys.exit(3)


def main() -> None:
    cli(prog_name="gemma2-convert")


if __name__ == "__main__":
    main()
