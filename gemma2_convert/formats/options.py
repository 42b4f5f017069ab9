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
QUANTIZED = ("auto", "keep", "dequantize")
"""What a conversion does with a quantized source's codes (``ConvertOptions.quantized``)."""
"""Tensor namings of a single safetensors file."""


@dataclass(frozen=True)
class ConvertOptions:
    """What to write and how; each writer reads the fields that concern it. Checked when made, so a bad
    option fails before any checkpoint is read."""

    to: str = "hf"
    """The output format: a key of ``WRITERS`` (hf, safetensors, gguf, orbax, keras)."""
    command: str = "convert"
    """The command recorded in the output's provenance."""
    inputs: tuple[str, ...] | None = None
    """Reader names accepted as input (None: any); the orig-to-* commands take the original formats only."""
    shape: ShapeOptions | None = None
    """How an input that stores no config gets one (variant, config.json, head layout)."""
    tokenizer: Path | None = None
    """A SentencePiece tokenizer.model; default: the one found with the input."""
    dtype: str = "auto"
    """hf / safetensors / orbax / keras: the output float dtype; auto keeps the source's."""
    max_shard_size: str | int = "5GB"
    """hf: the largest safetensors shard."""
    names: str = "hf"
    """safetensors: tensor names, transformers' (hf) or gemma_pytorch's (orig)."""
    gguf_type: str = "f16"
    """gguf: the ``--type`` (a key of ``formats.gguf.mix.GGUF_TYPES``)."""
    threads: int | None = None
    """gguf: quantization threads (None: every CPU this process may use)."""
    split_max_size: str | int | None = None
    """gguf: split the output into parts of at most this many bytes, header included (``50G``, ``500M``; decimal
    units as llama.cpp's gguf-split), named ``NAME-00001-of-0000N.gguf`` in gguf-split's layout."""
    split_max_tensors: int | None = None
    """gguf: split the output into parts of at most this many tensors (with ``split_max_size``: both hold)."""
    imatrix: Path | None = None
    """gguf: a llama.cpp importance matrix (llama-imatrix's GGUF or legacy .dat) the quantized types weight their
    search with, as ``llama-quantize --imatrix`` (``formats.gguf.importance``)."""
    drop_head: bool = False
    """gguf: export a classifier's decoder as a causal LM instead of refusing it."""
    allow_nonfinite: bool = False
    """Write NaN/Inf weights (and float16 overflows) with a warning instead of failing."""
    direct_io: bool = True
    """Write outputs with O_DIRECT where the filesystem allows it (False: through the page cache)."""
    verify: bool = True
    """Reload the output and compare tensors and reference logits with the source."""
    n_tokens: int | None = None
    """Tokens per verification prompt (None: by the plan, ``pipeline.convert.verify_plan``: 8 for a lossless
    conversion, whose logits are equal by construction once its tensors and config are, 64 otherwise)."""
    force: bool = False
    """Replace an existing output (kept until the new one is complete)."""
    quantized: str = "auto"
    """A quantized source (``QuantTensor``s): ``keep`` moves its codes into the output's block layout without
    re-quantizing, ``dequantize`` writes floats, ``auto`` keeps them for mlx and a GGUF block ``--type``
    (q8_0, q4_0, q4_1, q5_0, q5_1), dequantizes for the others (``formats.transcode_items``)."""
    requantize: bool = False
    """Kept quantized: re-quantize the groups the output cannot hold exactly instead of refusing them."""
    adapters: tuple[Path, ...] = ()
    """PEFT LoRA adapter directories merged into the input, in order, before anything is written (``--adapter``)."""

    def __post_init__(self) -> None:
        resolve_dtype(self.dtype)
        check_type(self.gguf_type)
        try:
            parse_size(self.max_shard_size)
        except ValueError as e:
            raise ConfigError(f"--max-shard-size: {e}") from None
        if self.names not in NAMES:
            raise ConfigError(f"unknown --names {self.names!r}; choose one of {', '.join(NAMES)}")
        self._check_split()
        if self.quantized not in QUANTIZED:
            raise ConfigError(f"unknown quantized={self.quantized!r}; choose one of {', '.join(QUANTIZED)}")

    @property
    def split(self) -> bool:
        """gguf: the output is a split set (either limit is given)."""
        return self.split_max_size is not None or self.split_max_tensors is not None

    @property
    def split_bytes(self) -> int | None:
        """``split_max_size`` in bytes (None: no size limit)."""
        return None if self.split_max_size is None else parse_size(self.split_max_size)

    def _check_split(self) -> None:
        if self.imatrix is not None and self.to != "gguf":
            raise ConfigError(f"--imatrix weights the quantization of a GGUF output, not {self.to!r}; use --to gguf")
        if self.split and self.to != "gguf":
            raise ConfigError(f"--split-max-size and --split-max-tensors split a GGUF output, not {self.to!r}"
                              + ("; an HF directory is sharded by --max-shard-size" if self.to == "hf" else ""))
        if self.split_max_size is not None:
            try:
                size = parse_size(self.split_max_size)
            except ValueError as e:
                raise ConfigError(f"--split-max-size: {e} (llama.cpp's 50G and 500M work)") from None
            if size <= 0:
                raise ConfigError(f"--split-max-size must be positive, not {self.split_max_size!r}")
        if self.split_max_tensors is not None and self.split_max_tensors < 1:
            raise ConfigError(f"--split-max-tensors must be at least 1, not {self.split_max_tensors}")
