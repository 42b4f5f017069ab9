"""safetensors reading (validated header, zero-copy mmap views) and streaming writing.

Layout (spec §4.2, huggingface/safetensors README): u64 little-endian header length N, N bytes of
UTF-8 JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}``,
then the data buffer; offsets are relative to the buffer. Every size in the header is checked
against the file before anything is allocated or mapped.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from gemma2_convert.core.errors import FormatError
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats.direct_write import SequentialWriter

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U32": torch.uint32, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
MAX_JSON_DEPTH = 8


def _json_depth_ok(raw: str) -> bool:
    """Cheap nesting check before json.loads, so a deeply nested header cannot exhaust the stack."""
    depth = 0
    in_str = esc = False
    for ch in raw:
        if in_str:
            esc, in_str = (False, in_str) if esc else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and validate the header; return (header dict, absolute offset of the data buffer)."""
    if not path.is_file():
        raise FormatError("is not a file: a safetensors file was expected" if path.exists() else
                          "no such file", path)
    size = path.stat().st_size
    if size < 8:
        raise FormatError(f"file is {size} bytes, too short for a safetensors header", path)
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > min(size - 8, MAX_HEADER):
            raise FormatError(f"header claims {n} bytes but the file has {size - 8} after the length field "
                              "(truncated or not a safetensors file)", path)
        raw_bytes = fh.read(n)
    try:
        raw = raw_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("header is not valid UTF-8 (not a safetensors file?)", path) from None
    if not _json_depth_ok(raw):
        raise FormatError(f"header JSON is nested deeper than {MAX_JSON_DEPTH} levels", path)
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as e:
        raise FormatError(f"header is not valid JSON ({e.msg} at byte {e.pos})", path) from None
    if not isinstance(header, dict):
        raise FormatError("header is not a JSON object", path)
    _validate_entries(header, size - 8 - n, path)
    return header, 8 + n


def _validate_entries(header: dict[str, Any], data_size: int, path: Path) -> None:
    spans = []
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError("__metadata__ must map strings to strings", path)
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets", path)
        dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if dt not in DTYPES:
            raise FormatError(f"tensor {name!r}: unknown dtype {dt!r} (known: {', '.join(DTYPES)})", path)
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**48 for d in shape)):
            raise FormatError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative ints", path)
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise FormatError(f"tensor {name!r}: data_offsets {offs!r} must be two ints", path)
        begin, end = offs
        nbytes = math.prod(shape) * torch.empty((), dtype=DTYPES[dt]).element_size()
        if not 0 <= begin <= end <= data_size:
            raise FormatError(f"tensor {name!r}: data_offsets [{begin}, {end}] outside the {data_size}-byte data "
                              "buffer (file truncated or header corrupt)", path)
        if end - begin != nbytes:
            raise FormatError(f"tensor {name!r}: {dt}{shape} needs {nbytes} bytes, data_offsets span {end - begin}",
                              path)
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise FormatError(f"tensors {n0!r} and {n1!r} overlap in the data buffer", path)


class SafetensorsFile:
    """A validated safetensors file whose tensors are lazy, zero-copy views of one private mmap."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.header, self.data_start = read_header(self.path)
        self.metadata: dict[str, str] = dict(self.header.get("__metadata__", {}))
        self._map: mmap.mmap | None = None
        self._map_lock = threading.Lock()

    def names(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]

    def _mmap(self) -> mmap.mmap:
        with self._map_lock:  # prefetch may map from another thread
            if self._map is None:
                with open(self.path, "rb") as f:
                    # ACCESS_COPY: writable for torch.frombuffer, private, never written back to the file.
                    self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._map

    def prefetch(self, name: str) -> None:
        """Start reading tensor ``name`` into the page cache (``madvise(MADV_WILLNEED)``); a hint."""
        begin, end = self.header[name]["data_offsets"]
        start = self.data_start + begin - (self.data_start + begin) % mmap.PAGESIZE
        if end > begin and hasattr(mmap, "MADV_WILLNEED"):
            try:
                self._mmap().madvise(mmap.MADV_WILLNEED, start, self.data_start + end - start)
            except OSError:
                pass

    def load(self, name: str) -> torch.Tensor:
        e = self.header[name]
        dtype, shape = DTYPES[e["dtype"]], tuple(e["shape"])
        begin, end = e["data_offsets"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        raw = torch.frombuffer(self._mmap(), dtype=torch.uint8, count=end - begin, offset=self.data_start + begin)
        if raw.data_ptr() % raw.new_empty((), dtype=dtype).element_size():
            raw = raw.clone()  # unaligned: copy rather than hand kernels a misaligned pointer
        return raw.view(dtype).reshape(shape)

    def lazy(self, name: str) -> LazyTensor:
        e = self.header[name]
        return LazyTensor(tuple(e["shape"]), DTYPES[e["dtype"]], lambda: self.load(name),
                          prefetch=lambda: self.prefetch(name))

    def tensors(self) -> dict[str, LazyTensor]:
        return {n: self.lazy(n) for n in self.names()}


# ---- writing ---------------------------------------------------------------------------------

def build_header(items: Iterable[tuple[str, LazyTensor]], metadata: Mapping[str, str] | None) -> bytes:
    """The length-prefixed, 8-byte-aligned header for tensors written in the given order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, t in items:
        if t.dtype not in DTYPE_NAMES:
            raise FormatError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


WRITE_CHUNK = 16 << 20  # write() calls of 16 MiB: measured as fast as cp, where one multi-GB call was ~1.5x slower


def write_tensor_bytes(f: BinaryIO | SequentialWriter, t: torch.Tensor) -> None:
    """Write a tensor's row-major little-endian bytes without an intermediate bytes copy."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel():
        buf = memoryview(flat.view(torch.uint8).numpy())
        for i in range(0, len(buf), WRITE_CHUNK):
            f.write(buf[i:i + WRITE_CHUNK])


STREAM_BYTES = 256 << 20
"""A tensor bigger than this whose lazy form reads ``rows`` is written as blocks of rows (a quantized
256k-row embedding written as float32 is 2.4 GB at 2B): the same bytes, without the whole tensor in memory."""
ROW_BLOCK_BYTES = 64 << 20


def tensor_parts(lt: LazyTensor) -> Iterator[torch.Tensor]:
    """``lt``'s data as the writer writes it, in order: the whole tensor, or blocks of rows
    (``STREAM_BYTES``)."""
    if lt.rows is not None and lt.nbytes > STREAM_BYTES:
        yield from lt.row_blocks(ROW_BLOCK_BYTES)
    else:
        yield lt.load()


def write_safetensors(
    path: str | Path, items: list[tuple[str, LazyTensor]], metadata: Mapping[str, str] | None = None,
    on_tensor: Any = None, direct_io: bool = True,
) -> int:
    """Stream tensors into ``path`` one at a time (header first: shapes are known up front), with direct I/O
    where the filesystem allows it (``direct_write.SequentialWriter``).

    ``on_tensor(name, nbytes)`` is called after each tensor (progress). Returns bytes written.
    """
    path = Path(path)
    with open(path, "wb") as f:
        sink = SequentialWriter(f, direct_io)
        sink.write(build_header(items, metadata))
        for name, lt in items:
            for t in tensor_parts(lt):
                write_tensor_bytes(sink, t)
            if on_tensor is not None:
                on_tensor(name, lt.nbytes)
        return sink.finish()
