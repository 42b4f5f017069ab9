"""Validated GGUF parsing: every count, length, type and offset is checked against the file.

``GGUFFile`` reads the header of any GGUF v2/v3 file without trusting it: a string or array may
not run past the end of the file, tensor data must lie inside the file, aligned and without
overlaps, and each tensor's byte size follows from its dims and ggml type. Tensor data is a
view of a private read-only-in-practice mmap, read only when asked for.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gemma2_convert.core.errors import FormatError
from gemma2_convert.formats.gguf.values import GGUF_MAGIC, SCALAR_FORMATS, ValueType

MAX_DIMS = 4
MAX_STRING = 1 << 30


def ggml_types() -> dict[int, tuple[str, int, int]]:
    """ggml type id → (name, block size, type size) for every type gguf-py knows."""
    import gguf

    return {int(t): (t.name, *gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType
            if t in gguf.GGML_QUANT_SIZES}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]
    """ggml ``ne`` (row length first)."""
    type_name: str
    type_id: int
    offset: int
    """Absolute file offset of the data."""
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """PyTorch shape: ``dims`` reversed."""
        return tuple(reversed(self.dims))


class _Cursor:
    """Bounds-checked little-endian reads from a buffer."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise FormatError(f"truncated file: {what} needs {n} bytes at offset {self.pos}, but the file "
                              f"has {self.size} bytes", self.path)
        view = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        if n > MAX_STRING:
            raise FormatError(f"{what}: string length {n} is implausible (corrupt header)", self.path)
        try:
            return bytes(self.take(n, what)).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{what}: string is not valid UTF-8", self.path) from None

    def value(self, vtype: int, what: str) -> Any:
        if vtype == ValueType.STRING:
            return self.string(what)
        if vtype == ValueType.ARRAY:
            return self.array(what)
        try:
            fmt = SCALAR_FORMATS[ValueType(vtype)]
        except ValueError:
            raise FormatError(f"{what}: unknown metadata value type {vtype}", self.path) from None
        return self.scalar(fmt, what)

    def array(self, what: str) -> Any:
        item, n = self.scalar("<I", what), self.scalar("<Q", what)
        if item == ValueType.STRING:
            if n * 8 > self.size - self.pos:
                raise FormatError(f"{what}: array of {n} strings cannot fit in the file", self.path)
            return [self.string(what) for _ in range(n)]
        if item == ValueType.ARRAY:
            if n * 12 > self.size - self.pos:
                raise FormatError(f"{what}: array of {n} arrays cannot fit in the file", self.path)
            return [self.array(what) for _ in range(n)]
        try:
            dtype = np.dtype(SCALAR_FORMATS[ValueType(item)])
        except ValueError:
            raise FormatError(f"{what}: unknown array element type {item}", self.path) from None
        if n > (self.size - self.pos) // dtype.itemsize:
            raise FormatError(f"truncated file: {what} claims {n} elements past the end of the file", self.path)
        if item == ValueType.UINT8:  # a blob (e.g. an embedded file): bytes, not a list of ints
            return bytes(self.take(n, what))
        return np.frombuffer(self.take(n * dtype.itemsize, what), dtype=dtype).tolist()


class GGUFFile:
    """The parsed, validated header of a GGUF file and raw access to its tensor bytes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FormatError("is not a file: a GGUF file was expected" if self.path.exists() else "no such file",
                              self.path)
        with open(self.path, "rb") as f:
            size = self.path.stat().st_size
            if size < 24:
                raise FormatError(f"file is {size} bytes, too short for a GGUF header", self.path)
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: torch wants writable buffers
        self.size = len(self._map)
        c = _Cursor(self._map, self.path)
        if bytes(c.take(4, "magic")) != GGUF_MAGIC:
            raise FormatError("not a GGUF file (magic bytes are not 'GGUF')", self.path)
        self.version = c.scalar("<I", "version")
        if self.version not in (2, 3):
            raise FormatError(f"GGUF version {self.version} is not supported (2 or 3 expected)", self.path)
        n_tensors, n_kv = c.scalar("<Q", "tensor count"), c.scalar("<Q", "metadata count")
        if n_kv * 13 > size or n_tensors * 28 > size:
            raise FormatError(f"header claims {n_kv} metadata entries and {n_tensors} tensors, more than a "
                              f"{size}-byte file can hold (corrupt or truncated)", self.path)
        self.kv: dict[str, Any] = {}
        self.kv_types: dict[str, tuple[int, int | None]] = {}
        """key → (value type, array element type or None)."""
        for i in range(n_kv):
            key = c.string(f"metadata key #{i}")
            vtype = c.scalar("<I", f"type of {key!r}")
            item = struct.unpack_from("<I", self._map, c.pos)[0] if vtype == ValueType.ARRAY and c.pos + 4 <= size else None
            self.kv_types[key] = (vtype, item)
            self.kv[key] = c.value(vtype, f"metadata {key!r}")
        self.alignment = self._alignment()
        infos = [self._tensor_info(c, i) for i in range(n_tensors)]
        self.data_start = c.pos + (-c.pos % self.alignment)
        self.tensors: dict[str, TensorInfo] = {}
        types = ggml_types()
        for name, dims, tid, rel in infos:
            self._add_tensor(name, dims, tid, rel, types)
        self._check_overlaps()

    def _alignment(self) -> int:
        a = self.kv.get("general.alignment", 32)
        if not isinstance(a, int) or a <= 0 or a & (a - 1) or a > 1 << 20:
            raise FormatError(f"general.alignment {a!r} is not a power of two", self.path)
        return a

    def _tensor_info(self, c: _Cursor, i: int) -> tuple[str, tuple[int, ...], int, int]:
        name = c.string(f"tensor #{i} name")
        n_dims = c.scalar("<I", f"tensor {name!r} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise FormatError(f"tensor {name!r} has {n_dims} dimensions (1–{MAX_DIMS} allowed)", self.path)
        dims = tuple(c.scalar("<Q", f"tensor {name!r} dims") for _ in range(n_dims))
        tid, rel = c.scalar("<I", f"tensor {name!r} type"), c.scalar("<Q", f"tensor {name!r} offset")
        return name, dims, tid, rel

    def _add_tensor(self, name: str, dims: tuple[int, ...], tid: int, rel: int,
                    types: dict[int, tuple[str, int, int]]) -> None:
        if tid not in types:
            raise FormatError(f"tensor {name!r} has unknown ggml type id {tid}", self.path)
        tname, block, tsize = types[tid]
        if name in self.tensors:
            raise FormatError(f"tensor {name!r} is listed twice", self.path)
        if any(d <= 0 or d >= 1 << 40 for d in dims) or dims[0] % block:
            raise FormatError(f"tensor {name!r}: dims {list(dims)} invalid for {tname} (row length must be a "
                              f"positive multiple of {block})", self.path)
        nbytes = math.prod(dims) // block * tsize
        start = self.data_start + rel
        if rel % self.alignment:
            raise FormatError(f"tensor {name!r}: data offset {rel} is not aligned to {self.alignment}", self.path)
        if start + nbytes > self.size:
            raise FormatError(f"tensor {name!r}: data [{start}, {start + nbytes}) runs past the end of the "
                              f"{self.size}-byte file (truncated or corrupt header)", self.path)
        self.tensors[name] = TensorInfo(name, dims, tname, tid, start, nbytes)

    def _check_overlaps(self) -> None:
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise FormatError(f"tensors {n0!r} and {n1!r} overlap in the data section", self.path)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a uint8 view of the (private) mapped file."""
        t = self.tensors[name]
        return np.frombuffer(self._map, dtype=np.uint8, count=t.nbytes, offset=t.offset)
