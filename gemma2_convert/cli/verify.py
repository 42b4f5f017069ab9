"""``gemma2-convert verify``: compare two checkpoints, tensors then reference logits."""

from __future__ import annotations

from pathlib import Path

import click

from gemma2_convert.cli.console import RichProgress
from gemma2_convert.cli.errors import fail
from gemma2_convert.cli.render import print_report
from gemma2_convert.formats.orig_config import ShapeOptions
from gemma2_convert.pipeline.calibrate import read_text
from gemma2_convert.pipeline.verify import COMPUTE, TOLERANCES, verify_paths


@click.command("verify")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--tolerance", type=click.Choice(TOLERANCES), default="auto", show_default=True,
              help="exact: equal tensors and logits; cast: equal after casting, close logits; lossy: bounds on KL "
                   "and top-1 only. auto: a quantized file (GGUF block types, compressed-tensors) or another "
                   "tool's GGUF by its stored types' bounds (KL, top-1, per-tensor SQNR floor); else exact when "
                   "the dtypes match, else cast.")
@click.option("--max-kl", type=float, default=0.05, show_default=True, help="lossy: largest mean KL(a‖b).")
@click.option("--min-top1", type=float, default=0.9, show_default=True, help="lossy: smallest top-1 agreement.")
@click.option("--tokens", type=int, default=64, show_default=True, help="Tokens per prompt.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="config.json for an input that stores none (gemma_pytorch of unpublished shape).")
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="UTF-8 text (your own prompts or eval text) to compare on as well, in windows of up to 1024 "
                   "tokens: KL, top-1 and the perplexity of both models on it, judged like the rest.")
@click.option("--compute", type=click.Choice(list(COMPUTE)), default="exact", show_default=True,
              help="Dtype of the reference forward passes. exact: float32, logits identical to transformers "
                   "eager; fast: bfloat16 (about 2.4× faster on CPUs with bf16 matmul), same verdict on lossless "
                   "conversions, KL/top-1 within the bound in the README.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar (also off when stderr is not a terminal).")
def verify(a: Path, b: Path, tolerance: str, max_kl: float, min_top1: float, tokens: int,
           config_path: Path | None, text_file: Path | None, compute: str, as_json: bool, quiet: bool) -> None:
    """Compare two checkpoints (any format the reference reads): tensors, then logits on fixed prompts.

    Prints a table (--json: the same as JSON); exits 3, with one error line, when the comparison fails.

    \b
    Examples:
      gemma2-convert verify gemma-2-2b/model.ckpt ./gemma-2-2b-hf
      gemma2-convert verify ./gemma-2-2b-hf ./gemma-2-2b.safetensors --json --compute fast
      gemma2-convert verify ./gemma-2-9b-hf someone-elses-gemma-2-9b-Q4_K_M.gguf --text held-out.txt
      gemma2-convert verify ./gemma-2-2b-hf+./my-lora ./merged-hf   # BASE+ADAPTER: the adapter run unmerged
    """
    with RichProgress(quiet or as_json) as progress:
        rep = verify_paths(a, b, tolerance=tolerance, max_kl=max_kl, min_top1=min_top1, n_tokens=tokens,
                           shape=ShapeOptions(config=config_path), progress=progress,
                           text=None if text_file is None else read_text(text_file, ""), compute=compute)
    print_report(rep, as_json)
    if not rep.passed:
        fail(f"{rep.b}: verification against {rep.a} failed: " + "; ".join(rep.failures)
             + "".join(f"; likely cause: {c}" for c in rep.likely_causes), 3)
