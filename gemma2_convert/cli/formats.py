"""``gemma2-convert formats``: the inputs, outputs and GGUF types this tool knows, from its registries."""

from __future__ import annotations

import click

from gemma2_convert.cli.console import out, table
from gemma2_convert.pipeline import catalog


@click.command("formats")
@click.option("--markdown", is_flag=True, help="Print the tables as markdown (the README's, which a test keeps equal).")
@click.option("--quiet", is_flag=True, help="Accepted like every command's; this one draws no progress bar.")
def formats(markdown: bool, quiet: bool) -> None:
    """List every input format (auto-detected), every output (convert --to) and every GGUF --type.

    \b
    Example:
      gemma2-convert formats
    """
    if markdown:
        click.echo(catalog.markdown(), nl=False)
        return
    for title, (cols, rows) in (("inputs", catalog.inputs()), ("outputs", catalog.outputs()),
                                ("GGUF types", catalog.gguf_types())):
        out.print(table(title, cols, rows))
