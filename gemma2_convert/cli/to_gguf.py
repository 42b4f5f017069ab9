"""``gemma2-convert to-gguf``: any checkpoint this tool reads → a GGUF that llama.cpp runs."""

from __future__ import annotations

from pathlib import Path

import click

from gemma2_convert.cli.console import RichProgress
from gemma2_convert.cli.options import gguf_options
from gemma2_convert.cli.render import print_gguf, print_report
from gemma2_convert.pipeline.gguf import to_gguf as run


@click.command("to-gguf")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("out_file", type=click.Path(dir_okay=False, path_type=Path))
@gguf_options
@click.option("--drop-head", is_flag=True, help="For a classification model: leave its score head out and export "
              "the decoder as a causal LM (llama.cpp's gemma2 has no classification head).")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A PEFT LoRA adapter directory merged into SRC first (as `convert --adapter`); repeatable.")
def to_gguf(src: Path, out_file: Path, type_name: str, tokenizer: Path | None, verify_output: bool,
            threads: int | None, split_max_size: str | None, split_max_tensors: int | None, imatrix: Path | None,
            force: bool, as_json: bool, allow_nonfinite: bool, quiet: bool, drop_head: bool,
            adapters: tuple[Path, ...]) -> None:
    """Write any checkpoint this tool reads (HF directory, single safetensors, gemma_pytorch, GGUF) as a GGUF
    that llama.cpp runs with the model's own logits, at any depth.

    \b
    Examples:
      gemma2-convert to-gguf ./gemma-2-2b-hf gemma-2-2b-f16.gguf
      gemma2-convert to-gguf ./gemma-2-9b-hf gemma-2-9b-Q4_K_M.gguf --type q4_k_m
      gemma2-convert to-gguf gemma-2-2b-f32.gguf gemma-2-2b-q8_0.gguf --type q8_0
      gemma2-convert to-gguf ./gemma-2-27b-hf gemma-2-27b-f16.gguf --split-max-size 50G
      gemma2-convert to-gguf ./gemma-2-9b-hf gemma-2-9b-IQ4_XS.gguf --type iq4_xs_mix --imatrix imatrix.gguf
    """
    with RichProgress(quiet or as_json) as progress:
        res = run(src, out_file, type_name=type_name, tokenizer=tokenizer, verify=verify_output, threads=threads,
                  split_max_size=split_max_size, split_max_tensors=split_max_tensors, imatrix=imatrix, force=force,
                  drop_head=drop_head, allow_nonfinite=allow_nonfinite, adapters=adapters, progress=progress,
                  on_report=None if as_json else print_report)
    print_gguf(res, as_json)
