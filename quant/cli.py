"""The ``gemma2-quantize`` command."""

from __future__ import annotations

import click

from gemma2_convert import __version__
from gemma2_convert.cli import _Group


@click.group(cls=_Group, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gemma2-quantize")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Quantize a Gemma 2 checkpoint to int8 / int4 (GGUF or compressed-tensors) with a quality report."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


def main() -> None:
    cli(prog_name="gemma2-quantize")
