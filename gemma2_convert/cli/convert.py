"""``gemma2-convert convert SRC OUT --to FORMAT``: any checkpoint this tool reads → any format it writes."""

from __future__ import annotations

from pathlib import Path

import click

from gemma2_convert.cli.console import RichProgress
from gemma2_convert.cli.options import (
    DTYPES,
    gguf_type_help,
    imatrix_option,
    safety_options,
    shape_options,
    split_options,
    transcode_options,
)
from gemma2_convert.cli.render import print_conversion, print_gguf, print_report
from gemma2_convert.formats import WRITERS
from gemma2_convert.formats.gguf.mix import GGUF_TYPES
from gemma2_convert.formats.options import NAMES, ConvertOptions
from gemma2_convert.formats.orig_config import ShapeOptions
from gemma2_convert.pipeline.convert import convert as run


def _formats_help() -> str:
    writers = "; ".join(f"{w.name}: {w.description}" for w in WRITERS.values())
    return f"Output format. {writers}."


@click.command("convert")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--to", "to", type=click.Choice(list(WRITERS)), required=True, help=_formats_help())
@click.option("--type", "type_name", type=click.Choice(list(GGUF_TYPES), case_sensitive=False), default="f16",
              show_default=True, help="--to gguf: " + gguf_type_help())
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="--to hf/safetensors/orbax/keras: the output dtype; auto keeps the source's (a GGUF's recorded one).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="--to hf: largest safetensors shard.")
@click.option("--names", type=click.Choice(list(NAMES)), default="hf", show_default=True,
              help="--to safetensors: transformers' names, or gemma_pytorch's (fused qkv_proj, embedder).")
@click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="SentencePiece tokenizer.model; default: the one found with SRC (or embedded in a GGUF).")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) merged into SRC "
                   "in float32 before writing (LoRA, rsLoRA, DoRA, embedding LoRA, modules_to_save); repeat to "
                   "merge several in order. A changed lm_head or embedding unties the output head.")
@shape_options
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="--to gguf: threads quantizing in parallel (default: every CPU this process may use).")
@click.option("--drop-head", is_flag=True, help="--to gguf: export a classifier's decoder as a causal LM.")
@split_options
@imatrix_option
@transcode_options
@click.option("--verify/--no-verify", "verify_output", default=True, show_default=True,
              help="Reload the output and compare every tensor and the reference logits with SRC; on failure "
                   "nothing is left at the output path.")
@click.option("--direct-io/--no-direct-io", default=True, show_default=True,
              help="Write around the page cache (O_DIRECT) where the filesystem allows it; the bytes are the same.")
@click.option("--force", is_flag=True, help="Replace an existing output (kept until the new one is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of tables.")
@safety_options
def convert(src: Path, out: Path, to: str, type_name: str, dtype: str, max_shard_size: str, names: str,
            tokenizer: Path | None, adapters: tuple[Path, ...], shape: ShapeOptions, threads: int | None,
            drop_head: bool,
            split_max_size: str | None, split_max_tensors: int | None, imatrix: Path | None, quantized: str,
            requantize: bool, verify_output: bool,
            direct_io: bool, force: bool, as_json: bool, allow_nonfinite: bool, quiet: bool) -> None:
    """Convert SRC — any format this tool reads — to the format --to names, streaming, then verify it.

    \b
    Examples:
      gemma2-convert convert ./gemma-2-2b-hf gemma-2-2b.safetensors --to safetensors
      gemma2-convert convert gemma-2-2b-q8_0.gguf ./back --to hf --dtype bfloat16
      gemma2-convert convert ./flax-ckpt gemma-2-9b.gguf --to gguf --type q4_k_m
      gemma2-convert convert ./gemma-2-2b-hf ./gemma-2-2b-keras --to keras   # KerasHub's from_preset loads it
      gemma2-convert convert ./gemma-2-27b-hf gemma-2-27b-bf16.gguf --to gguf --type bf16 --split-max-size 50G
      gemma2-convert convert ./gemma-2-2b-hf ./merged --to hf --adapter ./my-lora   # merge a fine-tune
      gemma2-convert convert ./gemma-2-2b-int4-g32 g2-q4_0.gguf --to gguf --type q4_0   # same codes, no requant
      gemma2-convert convert ./gemma-2-2b-mlx-4bit ./ct --to hf --quantized keep
    """
    opts = ConvertOptions(to=to, command="convert", shape=shape, tokenizer=tokenizer, dtype=dtype,
                          max_shard_size=max_shard_size, names=names, gguf_type=type_name, threads=threads,
                          split_max_size=split_max_size, split_max_tensors=split_max_tensors, imatrix=imatrix,
                          drop_head=drop_head, allow_nonfinite=allow_nonfinite, direct_io=direct_io,
                          verify=verify_output, force=force, adapters=adapters, quantized=quantized,
                          requantize=requantize)
    with RichProgress(quiet or as_json) as progress:
        res = run(src, out, opts, progress, on_report=None if as_json else print_report)
    (print_gguf if to == "gguf" else print_conversion)(res, as_json)

