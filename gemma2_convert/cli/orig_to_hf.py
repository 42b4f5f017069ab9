"""``gemma2-convert orig-to-hf``: a gemma_pytorch (or Flax) checkpoint → a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

import click

from gemma2_convert.cli.console import RichProgress
from gemma2_convert.cli.options import convert_options, shape_options
from gemma2_convert.cli.render import print_conversion, print_report
from gemma2_convert.formats.orig_config import ShapeOptions
from gemma2_convert.pipeline.convert import orig_to_hf as run


@click.command("orig-to-hf")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="SentencePiece tokenizer.model; default: the one next to CKPT.")
@shape_options
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors shard, e.g. 2GB.")
@convert_options
def orig_to_hf(ckpt: Path, out_dir: Path, tokenizer: Path | None, shape: ShapeOptions, max_shard_size: str,
               dtype: str, verify_output: bool, force: bool, as_json: bool, allow_nonfinite: bool,
               quiet: bool) -> None:
    """Convert a gemma_pytorch checkpoint to a Hugging Face model directory, streaming, then verify it.

    CKPT is a model.ckpt, a directory holding one, or a sharded directory with
    pytorch_model.bin.index.json; the int8 variant is dequantized.

    \b
    Examples:
      gemma2-convert orig-to-hf gemma-2-2b/model.ckpt ./gemma-2-2b-hf
      gemma2-convert orig-to-hf ft.ckpt ./ft-hf --config config.json --dtype bfloat16
    """
    with RichProgress(quiet or as_json) as progress:
        res = run(ckpt, out_dir, shape=shape, tokenizer=tokenizer, dtype=dtype, max_shard_size=max_shard_size,
                  verify=verify_output, force=force, allow_nonfinite=allow_nonfinite, progress=progress,
                  on_report=None if as_json else print_report)
    print_conversion(res, as_json)
