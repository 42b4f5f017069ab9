"""The reader registry and the canonical checkpoint every reader produces.

Canonical form (ARCHITECTURE.md): HF tensor names, zero-centred norms, the full vocabulary,
each tensor lazy. N readers + M writers instead of N×M converters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gemma2_convert.core.errors import UnknownFormatError, UnsupportedError
from gemma2_convert.core.lazy import LazyTensor
from reference.config import Gemma2Config


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

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


@dataclass(frozen=True)
class Reader:
    name: str
    description: str
    detect: Callable[[Path], bool]
    open: Callable[..., Checkpoint]


READERS: dict[str, Reader] = {}


def register_reader(name: str, description: str, detect: Callable[[Path], bool]) -> Callable:
    """Decorator registering ``open(path, **options) -> Checkpoint`` under ``name`` (no duplicates)."""

    def wrap(fn: Callable[..., Checkpoint]) -> Callable[..., Checkpoint]:
        if name in READERS:
            raise ValueError(f"reader {name!r} registered twice")
        READERS[name] = Reader(name, description, detect, fn)
        return fn

    return wrap


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


def open_checkpoint(path: str | Path, format: str = "auto", **options: object) -> Checkpoint:
    """Open any supported checkpoint lazily, auto-detecting its format."""
    name = detect_format(path) if format == "auto" else format
    if name not in READERS:
        raise UnsupportedError(f"unknown format {name!r}; choose one of {sorted(READERS)}")
    return READERS[name].open(Path(path), **options)
