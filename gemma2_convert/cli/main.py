"""The ``gemma2-convert`` command: a click group over one module per subcommand.

Every subcommand parses its options, calls one library function and renders its result. Bad input raises
a ConversionError, printed as one line on stderr (a traceback only with ``--debug``).
"""

from __future__ import annotations

import click

from gemma2_convert import __version__
from gemma2_convert.cli import (
    convert,
    demo,
    formats,
    gguf_to_hf,
    imatrix,
    inspect,
    lora_to_gguf,
    orig_to_gguf,
    orig_to_hf,
    orig_to_safetensors,
    to_gguf,
    verify,
)
from gemma2_convert.cli.errors import GuardedGroup, quick_exit


@click.group(cls=GuardedGroup, context_settings={"help_option_names": ["-h", "--help"]})
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


cli.add_command(demo.demo)
cli.add_command(orig_to_hf.orig_to_hf)
cli.add_command(orig_to_safetensors.orig_to_safetensors)
cli.add_command(verify.verify)
cli.add_command(to_gguf.to_gguf)
cli.add_command(orig_to_gguf.orig_to_gguf)
cli.add_command(gguf_to_hf.gguf_to_hf)
cli.add_command(inspect.inspect)
cli.add_command(convert.convert)
cli.add_command(formats.formats)
cli.add_command(imatrix.imatrix)
cli.add_command(lora_to_gguf.lora_to_gguf)


def main() -> None:
    quick_exit()
    cli(prog_name="gemma2-convert")


if __name__ == "__main__":
    main()
