"""What ``inspect`` shows of a file as stored — its own tensor table and metadata, validated, not loaded —
and the helpers the format modules' ``stored`` hooks share."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats.safetensors import SafetensorsFile


@dataclass(frozen=True)
class TensorRow:
    """One tensor as its file stores it."""

    name: str
    shape: tuple[int, ...]
    type: str
    """As the format stores it: safetensors ``BF16``, GGUF ``Q4_K``, torch ``int8``, …"""
    nbytes: int


@dataclass(frozen=True)
class PartRow:
    """One file of a checkpoint stored as several (a split GGUF's parts)."""

    name: str
    nbytes: int
    tensors: int
    problem: str = ""
    """What is wrong with it ('' when fine): missing, unreadable, a part of another set."""


@dataclass
class Stored:
    """A checkpoint as its format stores it (what ``inspect`` shows beside the canonical view)."""

    rows: list[TensorRow]
    tensors: dict[str, LazyTensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] | None = None
    raw_config: dict[str, Any] | None = None
    gguf_kv: dict[str, Any] | None = None
    special_tokens: dict[str, bool] | None = None
    parts: list[PartRow] = field(default_factory=list)
    """The files of a split checkpoint, in order (empty for one file or directory)."""


def summary(v: Any) -> Any:
    """A metadata value short enough to show: long arrays and blobs become a count."""
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, str) and len(v) > 120:
        return f"{v[:60]}… ({len(v)} characters)"
    if isinstance(v, list):
        return f"[{len(v)} × {type(v[0]).__name__}]" if len(v) > 8 else [summary(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def json_file(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when it is missing, unreadable or not an object."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def json_text(text: str | None) -> dict[str, Any] | None:
    """A JSON object string, or None."""
    try:
        obj = json.loads(text) if text else None
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def torch_rows(state: dict[str, torch.Tensor]) -> list[TensorRow]:
    """Rows of in-memory (mmap'd) torch tensors."""
    return [TensorRow(n, tuple(t.shape), str(t.dtype).removeprefix("torch."), t.numel() * t.element_size())
            for n, t in state.items()]


def safetensors_rows(files: list[Path]) -> tuple[list[TensorRow], dict[str, LazyTensor], dict[str, str]]:
    """Rows, lazy tensors and the first file's ``__metadata__`` of safetensors files."""
    rows, tensors, meta = [], {}, {}
    for fn in files:
        f = SafetensorsFile(fn)
        meta = meta or dict(f.metadata)
        for n in f.names():
            e = f.header[n]
            rows.append(TensorRow(n, tuple(e["shape"]), e["dtype"], e["data_offsets"][1] - e["data_offsets"][0]))
            tensors[n] = f.lazy(n)
    return rows, tensors, meta
