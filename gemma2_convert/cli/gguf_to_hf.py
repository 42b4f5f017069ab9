"""``gemma2-convert gguf-to-hf``: a gemma2 GGUF (ours or llama.cpp's, any type) → a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

import click

from gemma2_convert.cli.console import RichProgress
from gemma2_convert.cli.options import DTYPES, force_option, json_option, safety_options
from gemma2_convert.cli.render import print_conversion, print_report
from gemma2_convert.pipeline.gguf import gguf_to_hf as run


@click.command("gguf-to-hf")
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Output dtype; auto = the source dtype recorded in the GGUF (float32 for files made elsewhere). "
                   "Quantized tensors are dequantized.")
@click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="tokenizer.model to write the HF tokenizer files from; default: the one next to SRC, else "
                   "the one embedded in the GGUF by to-gguf.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors shard, e.g. 2GB.")
@click.option("--verify/--no-verify", "verify_output", default=True, show_default=True,
              help="Compare the written directory with the GGUF (tensors and reference logits).")
@force_option
@json_option
@safety_options
def gguf_to_hf(src: Path, out_dir: Path, dtype: str, tokenizer: Path | None, max_shard_size: str,
               verify_output: bool, force: bool, as_json: bool, allow_nonfinite: bool, quiet: bool) -> None:
    """Convert a gemma2 GGUF (ours or llama.cpp's, any type) to a Hugging Face directory, undoing the +1 on
    norms and any query scale folded into attn_q.

    \b
    Examples:
      gemma2-convert gguf-to-hf gemma-2-2b-f32.gguf ./gemma-2-2b-hf
      gemma2-convert gguf-to-hf gemma-2-2b-Q4_K_M.gguf ./dequantized --dtype bfloat16
    """
    with RichProgress(quiet or as_json) as progress:
        res = run(src, out_dir, dtype=dtype, tokenizer=tokenizer, max_shard_size=max_shard_size, verify=verify_output,
                  force=force, allow_nonfinite=allow_nonfinite, progress=progress,
                  on_report=None if as_json else print_report)
    print_conversion(res, as_json)
