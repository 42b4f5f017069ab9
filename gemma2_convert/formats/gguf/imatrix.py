"""Importance-matrix files: llama.cpp's GGUF layout and its legacy ``.dat``, read and written.

GGUF layout (llama.cpp ``tools/imatrix/imatrix.cpp`` ``save_imatrix``, ``common/imatrix-loader.cpp``):
metadata ``general.type = "imatrix"``, ``imatrix.datasets`` (array of strings), ``imatrix.chunk_count``
and ``imatrix.chunk_size`` (u32), in that order; then, for every weight in name order, two F32 tensors:
``<name>.in_sum2`` with ggml ``ne = [cols, n_mat]`` (the raw sum over tokens of x_j², one row per
expert) and ``<name>.counts`` with ``ne = [1, n_mat]`` (tokens seen, per expert). ggml writes
``ggml_n_dims`` dimensions, so a dense weight's tensors are 1-D ``[cols]`` and ``[1]``.

Legacy ``.dat`` (``save_imatrix_legacy``), little-endian: i32 entry count; per entry (name order)
i32 name length, the name, i32 ``ncall``, i32 ``nval``, ``nval`` f32 values; then i32 chunk count and
i32 length + the dataset name. The values are *not* the raw sums: each is ``(sum / count) * ncall``
with ``ncall = ceil(max(counts) / chunk_size)`` — the mean per token times the number of chunks — and
``llama-quantize`` divides by ``ncall`` again. A ``.dat`` stores no chunk size: it is read as
``chunk_size = 0`` with ``counts = [ncall]`` (as llama.cpp's loader does), so that ``in_sum2 / counts``
is still the importance and writing it back is byte-exact.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gemma2_convert.core.errors import FormatError
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats.gguf.file import GGUFFile
from gemma2_convert.formats.gguf.values import GGUF_MAGIC, ValueType, array, string, u32
from gemma2_convert.formats.gguf.writer import TensorPlan, header_bytes
from gemma2_convert.formats.output import atomic_output

SUM_SUFFIX, COUNT_SUFFIX = ".in_sum2", ".counts"
METADATA_KEYS = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")


@dataclass
class ImatrixEntry:
    """One weight's statistics. ``in_sum2``: float32 ``[cols]`` (``[n_mat, cols]`` for stacked experts),
    the sum over tokens of each input column squared; ``counts``: float32 ``[1]`` (``[n_mat]``), the
    tokens seen (the call count when read from a ``.dat``)."""

    in_sum2: torch.Tensor
    counts: torch.Tensor

    @property
    def n_mat(self) -> int:
        return self.counts.numel()


@dataclass
class Imatrix:
    """An importance matrix; ``entries`` keyed by GGUF tensor name (``blk.0.attn_q.weight``)."""

    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    """Tokens per chunk; 0 when read from a ``.dat`` (then ``counts`` are call counts)."""

    def importance(self, gguf_name: str) -> torch.Tensor | None:
        """Per-column weights as llama-quantize derives them (``load_imatrix`` in quantize.cpp): float32
        ``in_sum2 / counts`` per expert row, counts rounded to integers, 1.0 where a count is 0; the
        shape of ``in_sum2``. None when the weight has no entry."""
        e = self.entries.get(gguf_name)
        if e is None:
            return None
        counts = torch.round(e.counts.to(torch.float32)).reshape(-1, 1)  # [n_mat, 1]; loader: lround
        sums = e.in_sum2.to(torch.float32).reshape(e.n_mat, -1)  # [n_mat, cols]
        out = torch.where(counts > 0, sums / counts.clamp(min=1), torch.ones_like(sums))
        return out.reshape(e.in_sum2.shape)


def read_imatrix(path: str | Path) -> Imatrix:
    """Read an imatrix file, GGUF or legacy ``.dat`` (told apart by the GGUF magic), validating every size
    against the file; a FormatError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FormatError("no such file (an imatrix .gguf or .dat was expected)" if not path.exists()
                          else "is not a file (an imatrix .gguf or .dat was expected)", path)
    with open(path, "rb") as f:
        magic = f.read(4)
    im = _read_gguf(path) if magic == GGUF_MAGIC else _read_legacy(path)
    for name, e in im.entries.items():
        _check_entry(path, name, e)
    return im


def write_imatrix(path: str | Path, im: Imatrix, *, legacy: bool = False, force: bool = False) -> None:
    """Write ``im`` atomically, in llama.cpp's GGUF layout or (``legacy``) its ``.dat`` layout, byte for byte
    as ``llama-imatrix`` writes the same statistics. An existing ``path`` is an error unless ``force``."""
    for name, e in im.entries.items():
        _check_entry(path, name, e)
    data = _legacy_bytes(im) if legacy else _gguf_bytes(im)
    with atomic_output(path, force, need_bytes=len(data)) as tmp, open(tmp, "wb") as f:
        f.write(data)


def _check_entry(path: str | Path, name: str, e: ImatrixEntry) -> None:
    sums, counts = e.in_sum2, e.counts
    if sums.dtype != torch.float32 or counts.dtype != torch.float32:
        raise FormatError(f"imatrix entry {name!r}: in_sum2 and counts must be float32, got {sums.dtype} and "
                          f"{counts.dtype}", path)
    rows = 1 if sums.dim() == 1 else sums.shape[0]
    if sums.dim() not in (1, 2) or counts.dim() != 1 or counts.numel() != rows or sums.numel() == 0:
        raise FormatError(f"imatrix entry {name!r}: in_sum2 {list(sums.shape)} and counts "
                          f"{list(counts.shape)} do not match (expected [cols] with [1], or [n_mat, cols] "
                          "with [n_mat])", path)
    if not bool(torch.isfinite(sums).all()) or bool((sums < 0).any()):
        raise FormatError(f"imatrix entry {name!r}: in_sum2 holds negative, NaN or Inf values (sums of "
                          "squares must be finite and ≥ 0); the file is corrupt — recompute it", path)
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise FormatError(f"imatrix entry {name!r}: counts {counts.tolist()[:4]} must be finite and ≥ 0",
                          path)


# --- GGUF ---------------------------------------------------------------------------------------------------

def _read_gguf(path: Path) -> Imatrix:
    f = GGUFFile(path)
    missing = [k for k in METADATA_KEYS if k not in f.kv]
    if missing:
        kind = f.kv.get("general.type", "unknown")
        raise FormatError(f"not an imatrix GGUF: missing metadata {', '.join(missing)} (general.type is "
                          f"{kind!r}; llama-quantize refuses such a file). Give the file llama-imatrix or "
                          "`gemma2-convert imatrix` wrote", path)
    datasets = f.kv["imatrix.datasets"]
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        raise FormatError("imatrix.datasets must be an array of strings", path)
    ints = {k: f.kv[k] for k in METADATA_KEYS[1:]}
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in ints.values()):
        raise FormatError(f"imatrix.chunk_count / chunk_size must be non-negative integers, got {ints}", path)
    entries = {name: _gguf_entry(f, name) for name in _paired_names(f)}
    if not entries:
        raise FormatError("the file holds no imatrix entries (no '<name>.in_sum2' tensors)", path)
    return Imatrix(entries, list(datasets), ints["imatrix.chunk_count"], ints["imatrix.chunk_size"])


def _paired_names(f: GGUFFile) -> list[str]:
    sums = {n[: -len(SUM_SUFFIX)] for n in f.tensors if n.endswith(SUM_SUFFIX)}
    counts = {n[: -len(COUNT_SUFFIX)] for n in f.tensors if n.endswith(COUNT_SUFFIX)}
    unpaired = sorted(sums ^ counts)
    if unpaired:
        raise FormatError(f"mismatched sums and counts: {', '.join(unpaired[:5])} has only one of "
                          f"'{SUM_SUFFIX}' and '{COUNT_SUFFIX}'", f.path)
    return sorted(sums)


def _gguf_entry(f: GGUFFile, name: str) -> ImatrixEntry:
    s, c = f.tensors[name + SUM_SUFFIX], f.tensors[name + COUNT_SUFFIX]
    if s.type_name != "F32" or c.type_name != "F32":
        raise FormatError(f"imatrix entry {name!r}: sums and counts must be F32, got {s.type_name} and "
                          f"{c.type_name}", f.path)
    n_mat = math.prod(c.dims)
    if math.prod(s.dims) % n_mat or math.prod(s.dims[1:]) != n_mat:
        raise FormatError(f"imatrix entry {name!r}: in_sum2 dims {list(s.dims)} do not fit counts dims "
                          f"{list(c.dims)} (expected [cols, {n_mat}])", f.path)
    sums = torch.from_numpy(f.raw(s.name).view(np.float32).copy())
    counts = torch.from_numpy(f.raw(c.name).view(np.float32).copy())
    return ImatrixEntry(sums if n_mat == 1 else sums.reshape(n_mat, -1), counts)


def _gguf_bytes(im: Imatrix) -> bytes:
    metadata = [("general.type", string("imatrix")),
                ("imatrix.datasets", array(ValueType.STRING, im.datasets)),
                ("imatrix.chunk_count", u32(im.chunk_count)), ("imatrix.chunk_size", u32(im.chunk_size))]
    tensors: list[torch.Tensor] = []
    plans: list[TensorPlan] = []
    for name in sorted(im.entries):
        e = im.entries[name]
        counts = e.counts if e.n_mat == 1 else e.counts.reshape(-1, 1)  # ggml ne [1, n_mat]
        for suffix, t in ((SUM_SUFFIX, e.in_sum2), (COUNT_SUFFIX, counts)):
            plans.append(TensorPlan(name + suffix, LazyTensor.of(t), "f32"))
            tensors.append(t.contiguous())
    parts = [header_bytes(metadata, plans)]
    for t in tensors:
        raw = t.numpy().tobytes()
        parts += [raw, b"\0" * (-len(raw) % 32)]
    return b"".join(parts)


# --- legacy .dat --------------------------------------------------------------------------------------------

class _Reader:
    """Bounds-checked little-endian reads of a ``.dat``."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise FormatError(f"truncated or not an imatrix .dat: {what} needs {n} bytes at offset "
                              f"{self.pos}, but the file has {len(self.data)} bytes", self.path)
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _read_legacy(path: Path) -> Imatrix:
    r = _Reader(path.read_bytes(), path)
    n = r.i32("entry count")
    if not 1 <= n <= r.left // 16:
        raise FormatError(f"not an imatrix file: neither GGUF nor a legacy .dat (entry count {n} is "
                          f"impossible for a {len(r.data)}-byte file)", path)
    entries: dict[str, ImatrixEntry] = {}
    for i in range(n):
        name = _legacy_name(r, i)
        if name in entries:
            raise FormatError(f"imatrix entry {name!r} is listed twice", path)
        ncall, nval = r.i32(f"{name!r} call count"), r.i32(f"{name!r} value count")
        if ncall < 0 or nval < 1:
            raise FormatError(f"imatrix entry {name!r}: call count {ncall} / value count {nval} is invalid",
                              path)
        sums = torch.from_numpy(np.frombuffer(r.take(4 * nval, f"{name!r} values"), "<f4").copy())
        # llama-quantize uses the values as they are when ncall is 0: counts [1] gives the same importance
        entries[name] = ImatrixEntry(sums, torch.tensor([float(max(ncall, 1))]))
    chunk_count, datasets = 0, []
    if r.left:
        chunk_count = r.i32("chunk count")
        size = r.i32("dataset name length") if r.left else 0
        if size > 0:
            datasets.append(r.take(size, "dataset name").decode("utf-8", "replace"))
    if r.left:
        raise FormatError(f"not an imatrix .dat: {r.left} unexpected bytes after the dataset name", path)
    return Imatrix(entries, datasets, max(chunk_count, 0), 0)


def _legacy_name(r: _Reader, i: int) -> str:
    size = r.i32(f"entry #{i} name length")
    if not 0 < size <= min(r.left, 4096):
        raise FormatError(f"not an imatrix .dat: entry #{i} name length {size} is invalid", r.path)
    try:
        return r.take(size, f"entry #{i} name").decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"not an imatrix .dat: entry #{i} name is not UTF-8", r.path) from None


def _legacy_values(im: Imatrix, e: ImatrixEntry) -> tuple[int, torch.Tensor]:
    """(ncall, values) as ``save_imatrix_legacy`` computes them, in float32."""
    counts = e.counts.reshape(-1, 1)  # [n_mat, 1]
    sums = e.in_sum2.reshape(e.n_mat, -1)  # [n_mat, cols]
    zero = counts == 0
    if im.chunk_size == 0:  # read from a .dat: counts are call counts, the values are stored as they are
        ncall = int(counts.max())
        return ncall, torch.where(zero, torch.full_like(sums, float(ncall)), sums)
    ncall = (int(counts.max()) + im.chunk_size - 1) // im.chunk_size  # ceiling division, as llama.cpp
    value = torch.where(zero, torch.ones_like(sums), sums)
    count = torch.where(zero, torch.ones_like(counts), counts)
    return ncall, (value / count) * torch.tensor(float(ncall), dtype=torch.float32)


def _legacy_bytes(im: Imatrix) -> bytes:
    stored = sorted(n for n, e in im.entries.items() if bool((e.counts != 0).any()))  # all-zero: skipped
    parts = [struct.pack("<i", len(stored))]
    for name in stored:
        ncall, values = _legacy_values(im, im.entries[name])
        raw = name.encode("utf-8")
        parts += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.numel()),
                  values.contiguous().numpy().astype("<f4").tobytes()]
    dataset = im.datasets[-1].encode("utf-8") if im.datasets else b""
    parts += [struct.pack("<ii", im.chunk_count, len(dataset)), dataset]
    return b"".join(parts)


__all__ = ["Imatrix", "ImatrixEntry", "read_imatrix", "write_imatrix"]
