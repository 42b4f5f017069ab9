"""The ``gemma2-quantize`` command: parse options, call ``gemma2_convert.pipeline.quantize``, print the report."""

from __future__ import annotations

from pathlib import Path

import click

from gemma2_convert import __version__
from gemma2_convert.cli.console import RichProgress
from gemma2_convert.cli.errors import GuardedCommand, quick_exit
from gemma2_convert.cli.int4_options import (
    autoround_settings,
    int4_options,
    target_bytes,
)
from gemma2_convert.cli.options import imatrix_option, split_options
from gemma2_convert.cli.render import print_quantization
from gemma2_convert.pipeline.quantize import (
    FORMATS,
    QuantizeOptions,
    quantize_checkpoint,
)
from quant.methods import QUANTIZERS
from quant.spec import GROUP_SIZES


def parse_group_size(value: str) -> int | None | str:
    """``--group-size``: a size, 'channel' (None: one scale per output row) or 'auto'."""
    if value == "auto":
        return "auto"
    if value == "channel":
        return None
    if value in map(str, GROUP_SIZES):
        return int(value)
    raise click.BadParameter(f"{value!r}; use {', '.join(map(str, GROUP_SIZES))}, channel or auto")


@click.command(cls=GuardedCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gemma2-quantize")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--bits", type=click.Choice(["8", "4"]), default="4", show_default=True, help="Weight bits.")
@click.option("--group-size", default="auto", show_default=True,
              help="Columns sharing one scale: 32, 64, 128, 256, or 'channel' (one per output row). "
                   "auto: 128 for --format hf, 32 for --format gguf, 64 for --format mlx (mlx-lm's default; MLX "
                   "takes 32, 64 or 128).")
@click.option("--scheme", type=click.Choice(["sym", "asym"]), default="sym", show_default=True,
              help="Symmetric (scale only) or asymmetric (scale + zero point).")
@click.option("--method", type=click.Choice(list(QUANTIZERS)), default="mse", show_default=True,
              help="rtn: min/max; mse: least-squares scale search; hqq: half-quadratic zero-point fit; "
                   "gptq: Hessian-based error feedback, calibrated on --calibration text; autoround: learned "
                   "rounding and scales per decoder layer (SignRound), calibrated like gptq.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="hf", show_default=True,
              help="hf: compressed-tensors pack-quantized directory (transformers, vLLM); gguf: llama.cpp file; "
                   "mlx: mlx-lm directory (mlx_lm.load; affine scales + biases).")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="UTF-8 text for gptq calibration (default: a built-in sample; longer is better).")
@click.option("--eval", "eval_text", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="UTF-8 held-out text for the quality report (default: a built-in sample).")
@click.option("--embedding", type=click.Choice(["keep", "int8", "int4", "q6_k"]), default="keep", show_default=True,
              help="The tied embedding is also the output head: keep it (default) or quantize it; q6_k "
                   "(--format gguf only) is llama.cpp's own choice for it in Q4_0/Q4_1 files.")
@imatrix_option
@int4_options
@split_options
@click.option("--adapter", "adapters", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A PEFT LoRA adapter directory merged into SRC before quantizing (one pass; the same bytes as "
                   "`convert --adapter` then gemma2-quantize); repeat to merge several in order.")
@click.option("--verify/--no-verify", "verify_output", default=True, show_default=True,
              help="Compare against the source with the reference model; on failure the output is removed.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--quiet", is_flag=True, help="No progress bar (also off when stderr is not a terminal).")
@click.option("--allow-nonfinite", is_flag=True,
              help="Quantize weights holding NaN/Inf with a warning, instead of refusing them with an error.")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def cli(src: Path, out: Path, bits: str, group_size: str, scheme: str, method: str, fmt: str,
        calibration: Path | None, eval_text: Path | None, embedding: str, imatrix: Path | None,
        split_max_size: str | None, split_max_tensors: int | None, adapters: tuple[Path, ...], equalize: bool,
        bpw: float | None, target_size: str | None,
        autoround_steps: int, autoround_batch: int, autoround_tokens: int, autoround_lr: float | None,
        autoround_init: str, autoround_fast: bool, verify_output: bool,
        as_json: bool,
        force: bool, quiet: bool, allow_nonfinite: bool, debug: bool) -> None:
    """Quantize the Gemma 2 checkpoint SRC (HF dir, original checkpoint, safetensors, GGUF F32/F16/BF16)
    to int8 / int4 into OUT, and report its quality against SRC.

    \b
    Examples:
      gemma2-quantize ./gemma-2-2b-hf ./gemma-2-2b-int4 --bits 4
      gemma2-quantize ./gemma-2-2b-hf gemma-2-2b-q4.gguf --format gguf --method mse
      gemma2-quantize ./gemma-2-2b-hf ./gemma-2-2b-mlx-4bit --format mlx --group-size 64
      gemma2-quantize model.ckpt ./int4-gptq --method gptq --calibration wiki.txt --eval held-out.txt
      gemma2-quantize ./gemma-2-2b-hf g2-q4.gguf --format gguf --method autoround --equalize --calibration a.txt
      gemma2-quantize ./gemma-2-2b-hf g2-ft-q4.gguf --format gguf --adapter ./my-lora   # merge, then quantize
      gemma2-quantize ./gemma-2-27b-hf g27-q4.gguf --format gguf --imatrix imatrix.gguf --split-max-size 20G
    """
    opts = QuantizeOptions(int(bits), parse_group_size(group_size), scheme == "sym", method, fmt, embedding,
                           calibration, eval_text, verify_output, force, allow_nonfinite,
                           split_max_size=split_max_size, split_max_tensors=split_max_tensors, imatrix=imatrix,
                           adapters=adapters, equalize=equalize, bpw=bpw,
                           target_size=target_bytes(target_size),
                           autoround=autoround_settings(autoround_steps, autoround_batch, autoround_tokens,
                                                        autoround_lr, autoround_init, autoround_fast))
    with RichProgress(quiet or as_json) as progress:
        res = quantize_checkpoint(src, out, opts, progress)
    print_quantization(res, as_json)


def main() -> None:
    quick_exit()
    cli(prog_name="gemma2-quantize")


if __name__ == "__main__":
    main()
