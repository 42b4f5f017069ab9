"""The format registry and the canonical checkpoint every reader produces.

Canonical form (ARCHITECTURE.md): HF tensor names, zero-centred norms, the full vocabulary, each
tensor lazy. A format module registers what it can do, all in one place of its own:

* a **reader** (``register_reader``): ``detect(path)``, ``open(path, **options) -> Checkpoint``, the
  ``stored`` view ``inspect`` shows (the tensors as the file stores them, its metadata), and for
  containers with checksums an ``integrity`` check verification runs on the source;
* a **writer** (``register_writer``): ``prepare(checkpoint, options, progress) -> WriteJob``, which
  plans the output (its config, size estimate and verification tolerance) before anything is written.

N readers + M writers instead of N×M converters; ``gemma2_convert.pipeline.convert`` runs any pair.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from gemma2_convert.core.errors import UnknownFormatError, UnsupportedError
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.core.progress import Progress
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.formats.stored import Stored
from gemma2_convert.formats.tolerance import Tolerance
from reference.config import Gemma2Config
from reference.lora import LowRank


@dataclass
class Checkpoint:
    """A model read from disk: config, canonical lazy tensors, and what else was found."""

    format: str
    """Registry key of the reader that produced it."""
    path: Path
    """The file or directory that was opened."""
    config: Gemma2Config
    tensors: dict[str, LazyTensor]
    """HF names → lazy tensors (norms zero-centred)."""
    tokenizer: Path | None = None
    """A SentencePiece tokenizer.model found with the checkpoint, if any."""
    metadata: dict[str, str] = field(default_factory=dict)
    """Format-specific facts worth showing (provenance, quantization, source dtype)."""
    tokenizer_source: Callable[[], bytes | None] | None = None
    """Gives the tokenizer.model the file itself carries (our GGUFs embed one; llama.cpp's hold the
    vocabulary it is rebuilt from), on first use of ``tokenizer_blob``: opening costs nothing for it."""
    default_dtype: str | None = None
    """The float dtype a dense output takes under ``--dtype auto``; None: each tensor keeps its own
    (a GGUF records its source's dtype; its quantized tensors decode to float32)."""
    parts: tuple[Path, ...] = ()
    """The other files of a checkpoint split over several beside ``path`` (a split GGUF's later parts):
    an output may replace none of them."""
    adapters: dict[str, tuple[LowRank, ...]] = field(default_factory=dict)
    """Low-rank updates the reference runs unmerged beside these tensors (``verify BASE+ADAPTER``; see
    ``formats.merge``); empty for a checkpoint read from disk."""

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @cached_property
    def tokenizer_blob(self) -> bytes | None:
        """The serialized tokenizer.model the file carries (see ``tokenizer_source``), or None."""
        return None if self.tokenizer_source is None else self.tokenizer_source()


@dataclass(frozen=True)
class Reader:
    name: str
    description: str
    detect: Callable[[Path], bool]
    open: Callable[..., Checkpoint]
    stored: Callable[[Path], Stored]
    """The file as stored, validated but not loaded (``inspect``)."""
    original: bool = False
    """One of Google's original layouts (gemma_pytorch, Flax/Orbax): the orig-to-* commands take these."""
    integrity: Callable[[Checkpoint], None] | None = None
    """Re-reads the source's checksums (zip CRC-32s) before verification; None when it has none."""


@dataclass
class WriteJob:
    """One planned output: decided before anything is written, so problems surface first."""

    config: Gemma2Config
    """The config the output records."""
    need_bytes: int
    """About the output's size, checked against the free space before writing."""
    source_bytes: int
    """Bytes streamed from the source (the progress total)."""
    tolerance: Tolerance
    """What verification demands of the output against its source."""
    write: Callable[[Path, Progress], list[str]]
    """Writes into the temporary output path; returns the names of the files written. A writer whose output is
    several files side by side (``Writer.siblings``) writes them beside that path, in a fresh temporary
    directory, named after it; the first name returned is the file to open."""
    details: dict[str, Any] = field(default_factory=dict)
    """Writer-specific facts for the result (GGUF: type, query fold, tensors with a non-default type)."""
    source: Checkpoint | None = None
    """What the output is verified against when the writer writes a view of the input (a classifier's
    decoder as a causal LM); None: the input itself."""


@dataclass(frozen=True)
class Writer:
    name: str
    description: str
    directory: bool
    """The output is a directory (else one file)."""
    prepare: Callable[[Checkpoint, ConvertOptions, Progress], WriteJob]
    reads_back_as: str
    """The reader that opens the output for verification."""
    siblings: Callable[[Path, ConvertOptions], re.Pattern[str] | None] | None = None
    """When the output at ``out`` is several files side by side (a split GGUF): the pattern of their names;
    every file beside ``out`` that matches it belongs to an earlier output there, which ``--force`` replaces."""


READERS: dict[str, Reader] = {}
WRITERS: dict[str, Writer] = {}


def register_reader(name: str, description: str, detect: Callable[[Path], bool], *,
                    stored: Callable[[Path], Stored], original: bool = False,
                    integrity: Callable[[Checkpoint], None] | None = None) -> Callable:
    """Decorator registering ``open(path, **options) -> Checkpoint`` under ``name`` (no duplicates)."""

    def wrap(fn: Callable[..., Checkpoint]) -> Callable[..., Checkpoint]:
        if name in READERS:
            raise ValueError(f"reader {name!r} registered twice")
        READERS[name] = Reader(name, description, detect, fn, stored, original, integrity)
        return fn

    return wrap


def register_writer(writer: Writer) -> Writer:
    """Add ``writer`` under its name; a second writer of the same name is an error."""
    if writer.name in WRITERS:
        raise ValueError(f"writer {writer.name!r} registered twice")
    WRITERS[writer.name] = writer
    return writer


def get_writer(name: str) -> Writer:
    """The writer called ``name``; UnsupportedError lists the valid ones."""
    if name not in WRITERS:
        raise UnsupportedError(f"unknown output format {name!r}; choose one of {', '.join(WRITERS)}")
    return WRITERS[name]


def detect_format(path: str | Path) -> str:
    """The name of the first reader that recognises ``path``; UnknownFormatError lists what was tried."""
    p = Path(path)
    if not p.exists():
        raise UnknownFormatError("no such file or directory", p)
    for r in READERS.values():
        if r.detect(p):
            return r.name
    kinds = "; ".join(f"{r.name}: {r.description}" for r in READERS.values())
    raise UnknownFormatError(f"not a Gemma 2 checkpoint this tool reads. Supported: {kinds}", p)


def open_checkpoint(path: str | Path, format: str = "auto", **options: Any) -> Checkpoint:
    """Open any supported checkpoint lazily, auto-detecting its format."""
    name = detect_format(path) if format == "auto" else format
    if name not in READERS:
        raise UnsupportedError(f"unknown format {name!r}; choose one of {sorted(READERS)}")
    return READERS[name].open(Path(path), **options)
