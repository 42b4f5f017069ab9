"""``gemma2-convert orig-to-safetensors``: a gemma_pytorch (or Flax) checkpoint → one .safetensors file."""

from __future__ import annotations

from pathlib import Path

import click

from gemma2_convert.cli.console import RichProgress
from gemma2_convert.cli.options import convert_options, shape_options
from gemma2_convert.cli.render import print_conversion, print_report
from gemma2_convert.formats.options import NAMES
from gemma2_convert.formats.orig_config import ShapeOptions
from gemma2_convert.pipeline.convert import orig_to_safetensors as run


@click.command("orig-to-safetensors")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.argument("out_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--names", type=click.Choice(NAMES), default="hf", show_default=True,
              help="Tensor names: transformers' (q/k/v split) or gemma_pytorch's (fused qkv_proj, embedder).")
@shape_options
@convert_options
def orig_to_safetensors(ckpt: Path, out_file: Path, names: str, shape: ShapeOptions, dtype: str,
                        verify_output: bool, force: bool, as_json: bool, allow_nonfinite: bool, quiet: bool) -> None:
    """Convert a gemma_pytorch checkpoint to one self-describing .safetensors file (config in its metadata).

    \b
    Examples:
      gemma2-convert orig-to-safetensors model.ckpt gemma-2-2b.safetensors
      gemma2-convert orig-to-safetensors model.ckpt orig-names.safetensors --names orig
    """
    with RichProgress(quiet or as_json) as progress:
        res = run(ckpt, out_file, shape=shape, names=names, dtype=dtype, verify=verify_output, force=force,
                  allow_nonfinite=allow_nonfinite, progress=progress, on_report=None if as_json else print_report)
    print_conversion(res, as_json)
