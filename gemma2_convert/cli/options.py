"""Click options shared by several commands: the head layout of a gemma_pytorch checkpoint, the safety
switches of every writer, the conversion and GGUF options."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from gemma2_convert.core.dtypes import FLOAT_DTYPES
from gemma2_convert.formats.gguf.mix import GGUF_TYPES, type_help
from gemma2_convert.formats.orig_config import VARIANTS, ShapeOptions

F = TypeVar("F", bound=Callable[..., Any])

DTYPES = ["auto", *FLOAT_DTYPES]
"""``--dtype`` choices of the commands that write float tensors: auto keeps the source's."""


def _apply(fn: F, options: list[Callable[[F], F]]) -> F:
    """Decorate ``fn`` with ``options`` so they list in this order in ``--help``."""
    for o in reversed(options):
        fn = o(fn)
    return fn


def shape_options(fn: F) -> F:
    """--variant, --config and the head-layout overrides, shared by the commands that read gemma_pytorch;
    the command receives them as one ``shape`` (:class:`~gemma2_convert.formats.orig_config.ShapeOptions`)."""

    @functools.wraps(fn)
    def command(*args: Any, variant: str, config_path: Path | None, num_heads: int | None,
                num_kv_heads: int | None, head_dim: int | None, query_pre_attn_scalar: float | None,
                **kwargs: Any) -> Any:
        shape = ShapeOptions(variant, config_path, num_heads, num_kv_heads, head_dim, query_pre_attn_scalar)
        return fn(*args, shape=shape, **kwargs)

    return _apply(command, [
        click.option("--variant", type=click.Choice(["auto", *VARIANTS]), default="auto", show_default=True,
                     help="Model size; auto detects it from the tensor shapes. Must agree with the shapes."),
        click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="A Gemma 2 config.json, for checkpoints of no published size (fine-tunes, tiny models)."),
        click.option("--num-heads", type=int, default=None, help="Query heads N (instead of --config)."),
        click.option("--num-kv-heads", type=int, default=None, help="Key/value heads K (instead of --config)."),
        click.option("--head-dim", type=int, default=None, help="Per-head width D (instead of --config)."),
        click.option("--query-pre-attn-scalar", type=float, default=None,
                     help="Attention scores × this^-1/2; 256 for 2b/9b, 144 for 27b. Needed with the head flags "
                          "for unpublished shapes."),
    ])


def safety_options(fn: F) -> F:
    """--allow-nonfinite and --quiet, shared by every command that writes."""
    return _apply(fn, [
        click.option("--allow-nonfinite", is_flag=True,
                     help="Write weights holding NaN/Inf (or overflowing float16) with a warning, instead of "
                          "refusing them with an error naming the tensor."),
        click.option("--quiet", is_flag=True, help="No progress bar (also off when stderr is not a terminal)."),
    ])


def force_option(fn: F) -> F:
    return click.option("--force", is_flag=True,
                        help="Replace an existing output (kept until the new one is complete).")(fn)


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of tables.")(fn)


def convert_options(fn: F) -> F:
    """--dtype, --verify/--no-verify, --force, --json, --allow-nonfinite, --quiet: the orig-to-* commands."""
    return safety_options(_apply(fn, [
        click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
                     help="Output dtype; auto keeps the source's (int8 is dequantized to the dtype of its scales). "
                          "float16 warns: Gemma 2 activations overflow it."),
        click.option("--verify/--no-verify", "verify_output", default=True, show_default=True,
                     help="Reload the output, compare every tensor and the reference logits with the source; "
                          "on failure nothing is left at the output path."),
        force_option,
        json_option,
    ]))


def gguf_type_help() -> str:
    """``--type``'s help: one paragraph per type, from the GGUF type registry."""
    return "\n\n".join(["Tensor type:", *(f"{key}: {line}" for key, line in type_help().items())])


def split_options(fn: F) -> F:
    """--split-max-size and --split-max-tensors: a GGUF output as a split set (llama.cpp's gguf-split layout)."""
    return _apply(fn, [
        click.option("--split-max-size", metavar="SIZE", default=None,
                     help="Split the GGUF into parts of at most SIZE each, header included (50G, 500M: decimal units "
                          "as llama.cpp's gguf-split; 50GB, 2GiB also work), named NAME-00001-of-0000N.gguf (NAME: "
                          "the output name without .gguf) in gguf-split's layout. llama.cpp and this tool open the "
                          "set from its first part."),
        click.option("--split-max-tensors", type=click.IntRange(min=1), default=None, metavar="N",
                     help="Split the GGUF into parts of at most N tensors each (with --split-max-size: both hold)."),
    ])


def imatrix_option(fn: F) -> F:
    """--imatrix: an importance matrix for the quantized GGUF types, used as llama-quantize uses it."""
    return click.option(
        "--imatrix", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, metavar="FILE",
        help="Importance matrix (imatrix.gguf or legacy .dat, from `gemma2-convert imatrix` or llama-imatrix) "
             "that the quantized types weight their rounding with, exactly as llama-quantize --imatrix does "
             "(Q8_0 and float types ignore it); recorded in the metadata as quantize.imatrix.*.")(fn)


def gguf_options(fn: F) -> F:
    """--type, --tokenizer, --verify/--no-verify, --threads, --split-max-size, --split-max-tensors, --imatrix, --force,
    --json, --allow-nonfinite, --quiet."""
    return safety_options(_apply(fn, [
        click.option("--type", "type_name", type=click.Choice(list(GGUF_TYPES), case_sensitive=False), default="f16",
                     show_default=True, help=gguf_type_help()),
        click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="SentencePiece tokenizer.model; default: the one next to the source (a GGUF source "
                          "keeps its own vocabulary)."),
        click.option("--verify/--no-verify", "verify_output", default=True, show_default=True,
                     help="Read the GGUF back and compare tensors and reference logits with the source; on "
                          "failure nothing is left at the output path."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="Threads quantizing in parallel. Default: every CPU this process may use."),
        split_options,
        imatrix_option,
        force_option,
        json_option,
    ]))


def transcode_options(fn: F) -> F:
    """``--quantized`` and ``--requantize``: what a quantized source's codes become (``formats.transcode_items``)."""
    return _apply(fn, [
        click.option("--quantized", type=click.Choice(["auto", "keep", "dequantize"]), default="auto",
                     show_default=True,
                     help="A quantized SRC (GGUF Q8_0/Q4_0/Q4_1/Q5_0/Q5_1, compressed-tensors int4/int8, MLX): keep "
                          "moves its codes into the output's blocks without re-quantizing; dequantize writes "
                          "floats; auto keeps them for --to mlx and a GGUF block --type, dequantizes for --to hf."),
        click.option("--requantize", is_flag=True,
                     help="Kept quantized: re-quantize the groups the output type cannot hold exactly (they are "
                          "counted and reported) instead of refusing the conversion."),
    ])
