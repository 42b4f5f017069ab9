"""``gemma2-convert orig-to-gguf``: a gemma_pytorch (or Flax) checkpoint → a GGUF, without an HF directory."""

from __future__ import annotations

from pathlib import Path

import click

from gemma2_convert.cli.console import RichProgress
from gemma2_convert.cli.options import gguf_options, shape_options
from gemma2_convert.cli.render import print_gguf, print_report
from gemma2_convert.formats.orig_config import ShapeOptions
from gemma2_convert.pipeline.gguf import orig_to_gguf as run


@click.command("orig-to-gguf")
@click.argument("ckpt", type=click.Path(exists=True, path_type=Path))
@click.argument("out_file", type=click.Path(dir_okay=False, path_type=Path))
@shape_options
@gguf_options
def orig_to_gguf(ckpt: Path, out_file: Path, shape: ShapeOptions, type_name: str, tokenizer: Path | None,
                 verify_output: bool, threads: int | None, split_max_size: str | None, split_max_tensors: int | None,
                 imatrix: Path | None, force: bool, as_json: bool, allow_nonfinite: bool, quiet: bool) -> None:
    """Write a gemma_pytorch checkpoint (model.ckpt, sharded or int8) as a GGUF, without an HF directory.

    \b
    Examples:
      gemma2-convert orig-to-gguf gemma-2-2b/model.ckpt gemma-2-2b-q8_0.gguf --type q8_0
      gemma2-convert orig-to-gguf ft.ckpt ft-q5_k_m.gguf --config config.json --type q5_k_m
    """
    with RichProgress(quiet or as_json) as progress:
        res = run(ckpt, out_file, shape=shape, type_name=type_name, tokenizer=tokenizer, verify=verify_output,
                  threads=threads, split_max_size=split_max_size, split_max_tensors=split_max_tensors,
                  imatrix=imatrix, force=force,
                  allow_nonfinite=allow_nonfinite, progress=progress, on_report=None if as_json else print_report)
    print_gguf(res, as_json)
