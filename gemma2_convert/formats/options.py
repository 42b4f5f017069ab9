"""The options of one conversion, as every writer and the pipeline read them (one flat, frozen record)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gemma2_convert.core.dtypes import resolve_dtype
from gemma2_convert.core.errors import ConfigError
from gemma2_convert.core.units import parse_size
from gemma2_convert.formats.gguf.mix import check_type
from gemma2_convert.formats.orig_config import ShapeOptions

NAMES = ("hf", "orig")
"""Tensor namings of a single safetensors file."""


@dataclass(frozen=True)
class ConvertOptions:
    """What to write and how; each writer reads the fields that concern it. Checked when made, so a bad
    option fails before any checkpoint is read."""

    to: str = "hf"
    """The output format: a key of ``WRITERS`` (hf, safetensors, gguf, orbax)."""
    command: str = "convert"
    """The command recorded in the output's provenance."""
    inputs: tuple[str, ...] | None = None
    """Reader names accepted as input (None: any); the orig-to-* commands take the original formats only."""
    shape: ShapeOptions | None = None
    """How an input that stores no config gets one (variant, config.json, head layout)."""
    tokenizer: Path | None = None
    """A SentencePiece tokenizer.model; default: the one found with the input."""
    dtype: str = "auto"
    """hf / safetensors / orbax: the output float dtype; auto keeps the source's."""
    max_shard_size: str | int = "5GB"
    """hf: the largest safetensors shard."""
    names: str = "hf"
    """safetensors: tensor names, transformers' (hf) or gemma_pytorch's (orig)."""
    gguf_type: str = "f16"
    """gguf: the ``--type`` (a key of ``formats.gguf.mix.GGUF_TYPES``)."""
    threads: int | None = None
    """gguf: quantization threads (None: every CPU this process may use)."""
    drop_head: bool = False
    """gguf: export a classifier's decoder as a causal LM instead of refusing it."""
    allow_nonfinite: bool = False
    """Write NaN/Inf weights (and float16 overflows) with a warning instead of failing."""
    direct_io: bool = True
    """Write outputs with O_DIRECT where the filesystem allows it (False: through the page cache)."""
    verify: bool = True
    """Reload the output and compare tensors and reference logits with the source."""
    n_tokens: int = 64
    """Tokens per verification prompt."""
    force: bool = False
    """Replace an existing output (kept until the new one is complete)."""

    def __post_init__(self) -> None:
        resolve_dtype(self.dtype)
        check_type(self.gguf_type)
        try:
            parse_size(self.max_shard_size)
        except ValueError as e:
            raise ConfigError(f"--max-shard-size: {e}") from None
        if self.names not in NAMES:
            raise ConfigError(f"unknown --names {self.names!r}; choose one of {', '.join(NAMES)}")
