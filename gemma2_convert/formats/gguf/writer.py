"""Streaming GGUF v3 writer: header, metadata and tensor infos first, then tensor data one at a time.

File layout (gguf-py ``gguf_writer.py`` and ``constants.py``, ggml ``gguf.h``): magic ``GGUF``,
u32 version 3, u64 tensor count, u64 metadata count; each metadata entry is a string key, a u32
value type and the value (``gguf_values``); each tensor info is the name, u32 n_dims, u64 dims
(ggml ``ne``: the row length first, i.e. the PyTorch shape reversed), u32 ggml type and a u64
data offset relative to the data section. The data section starts at the next multiple of
``general.alignment`` (32) and every tensor's data is padded to that alignment.

All sizes are known from the lazy tensors and the chosen types, so the header is written first
and each tensor is converted in row chunks straight into the file: peak memory is a few chunks.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from gemma2_convert.core.errors import ConversionError, NonFiniteError
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats.direct_write import SequentialWriter
from gemma2_convert.formats.gguf.values import (
    ALIGNMENT,
    GGUF_MAGIC,
    GGUF_VERSION,
    Value,
    ValueType,
    array,
    boolean,
    f32,
    string,
    string_bytes,
    u32,
    value_bytes,
)
from gemma2_convert.formats.output import Interrupted
from gemma2_convert.formats.weight_check import WeightCheck
from quant.gguf_codec import bytes_for, quantize_tensor
from quant.gguf_types import ggml_type
from quant.jit import default_threads

CHUNK_ELEMENTS = 2 << 20
"""Elements converted per step. Temporaries (a float32 copy: 8 MB) stay below glibc's 32 MB mmap
threshold, so they are reused from the heap instead of being mapped and zero-filled for every chunk."""
WRITE_DEPTH = 4
"""Encoded chunks queued for the writer thread."""
HASH_BACKLOG = 256 << 20
"""Bytes of source tensors the hasher may lag behind the encoder (at least one tensor)."""
PREFETCH_AHEAD = 256 << 20
"""Bytes of source tensors asked for ahead of the one being encoded (at least the next tensor)."""


class Hasher(Protocol):
    """A streaming hash (``xxhash.xxh3_128()``, ``hashlib.sha256()``): ``update`` should release the GIL."""

    def update(self, data: bytes | memoryview, /) -> None: ...


@dataclass(frozen=True)
class TensorPlan:
    """One tensor to write: float source in PyTorch layout, target ggml type, optional transform.

    ``transform`` is applied to float32 row chunks ``[rows, cols]`` and must be row-local
    (elementwise transforms are); it is how +1 norms and the query-scale fold are applied.
    """

    name: str
    source: LazyTensor
    qtype: str
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    encoder: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Encodes the whole (transformed, float32) tensor to ``qtype`` block bytes in place of the stock
    quantizer: how a smarter method (mse, gptq, …) writes blocks that llama.cpp decodes as usual."""
    quant_weights: torch.Tensor | None = None
    """float32 ``[cols]``: the per-column importance (an imatrix entry) the stock quantizer weights its search
    with, as ``llama-quantize --imatrix`` does; None: the reference quantizer."""
    from_codes: Callable[[], tuple[dict[str, torch.Tensor], torch.Tensor]] | None = None
    """A tensor moved from quantized codes (``formats/gguf/transcode.py``): returns the source's stored parts
    (``{suffix: tensor}``: codes, scales, offsets — fingerprinted, and the float ones weight-checked, in place of
    the decoded source) and the block bytes made from them. ``source`` is then never loaded or decoded."""

    @property
    def dims(self) -> tuple[int, ...]:
        """ggml ``ne``: the PyTorch shape reversed."""
        return tuple(reversed(self.source.shape))

    @property
    def nbytes(self) -> int:
        return bytes_for(self.qtype, self.source.shape)


def _pad(n: int) -> int:
    return -n % ALIGNMENT


def header_bytes(metadata: Sequence[tuple[str, Value]], tensors: Sequence[TensorPlan]) -> bytes:
    """Everything before the data section, padded to the alignment."""
    parts = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata))]
    parts += [string_bytes(k) + value_bytes(v) for k, v in metadata]
    offset = 0
    for t in tensors:
        dims = t.dims
        parts.append(string_bytes(t.name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims,
                                                         ggml_type(t.qtype).ggml_id, offset))
        offset += t.nbytes + _pad(t.nbytes)
    head = b"".join(parts)
    return head + b"\0" * _pad(len(head))


def _row_chunks(t: torch.Tensor, max_elements: int) -> Iterator[torch.Tensor]:
    """[rows, cols] views of at most ``max_elements`` elements (at least one row)."""
    rows2d = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
    step = max(1, max_elements // max(1, rows2d.shape[1]))
    for r in range(0, rows2d.shape[0], step):
        yield rows2d[r:r + step]


_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def encode_chunk(chunk: torch.Tensor, qtype: str, transform: Callable | None,
                 out: torch.Tensor | None = None, quant_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Float rows [r, cols] → the uint8 bytes of those rows in ``qtype``.

    The bytes go into ``out`` (a reusable uint8 buffer) when it is large enough: writing into an
    existing buffer is several times faster than allocating a fresh tensor per chunk (its pages are
    faulted in once). F32/F16 (and BF16 from bf16) are plain IEEE casts; BF16 from wider floats and the
    block types go through ``quant.gguf_codec``.
    """
    if transform is not None:
        chunk = transform(chunk.float())
    target = _FLOAT_TYPES.get(qtype)
    if target is None or (target == torch.bfloat16 and chunk.dtype != torch.bfloat16):
        nbytes = bytes_for(qtype, chunk.shape)
        dst = out[:nbytes] if out is not None and out.numel() >= nbytes else None
        return quantize_tensor(chunk, qtype, quant_weights, threads=1, out=dst)  # one chunk per encoder thread
    nbytes = chunk.numel() * target.itemsize
    if out is None or out.numel() < nbytes:
        return chunk.to(target).contiguous().view(torch.uint8)
    dst = out[:nbytes].view(target).view(chunk.shape)
    dst.copy_(chunk)  # exact copy, or round-to-nearest-even to f16 (the range was checked per tensor)
    return dst.view(torch.uint8)


def _hash_tensor(h: Hasher, name: str, t: torch.Tensor) -> None:
    h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}\n".encode())
    flat = t.contiguous().reshape(-1)
    if flat.numel():
        h.update(memoryview(flat.view(torch.uint8).numpy()))


@contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """Parallelism comes from our own threads (whole chunks); torch's OpenMP threads would spin at
    barriers after every small kernel and, on a busy machine, cost several times the useful work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _Stream:
    """Overlaps the stages of writing: reading the source ahead (``prefetch``), hashing it (one
    thread), encoding chunks (``threads`` workers for block types; the caller for plain float casts,
    into a ring of reused buffers; nothing when the bytes are the source's) and writing them in order
    (one thread, into a ``SequentialWriter``: direct I/O, or the page cache with write-behind). The hash,
    torch kernels and file writes release the GIL, so the stages run in parallel. Each stage may run ahead of the next by a
    bounded amount — ``WRITE_DEPTH`` chunks queued for the writer, ``HASH_BACKLOG`` bytes of source
    tensors queued for the hasher — so a slow moment in one stage does not stall the others. Memory
    stays at a few chunks per worker (queued source tensors are views of the mmap when the reader
    maps the file)."""

    def __init__(self, sink: SequentialWriter, hasher: Hasher | None, threads: int, check: WeightCheck) -> None:
        self.sink, self.hasher, self.depth, self.check = sink, hasher, 2 * threads, check
        self.failed: set[str] = set()  # tensors whose full check has run (a warning is given once)
        self.failed_lock = threading.Lock()
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="gguf-write")
        self.hashing = ThreadPoolExecutor(1, thread_name_prefix="gguf-hash")
        self.encoders = ThreadPoolExecutor(threads, thread_name_prefix="gguf-encode")
        self.prefetching = ThreadPoolExecutor(1, thread_name_prefix="gguf-prefetch")
        self.fetched, self.fetched_bytes, self.consumed_bytes = 0, 0, 0
        self.pending_writes: deque[Future] = deque()
        self.pending_hashes: deque[tuple[Future, int]] = deque()
        self.hash_backlog = 0
        # one more buffer than writes in flight: the one being filled is never being written
        self.buffers = [torch.empty(CHUNK_ELEMENTS * 4, dtype=torch.uint8) for _ in range(WRITE_DEPTH + 1)]
        self.turn = 0
        # encoded block chunks: one per chunk that may be encoding, queued for the writer or being filled
        # (allocated on first use, the size of a Q8_0 chunk: the widest block type per element)
        self.block_buffers: list[torch.Tensor] = []
        self.block_turn = 0
        self.moving: dict[int, Future] = {}  # tensors made from codes, by index (``moved``)

    def prefetch(self, tensors: Sequence[TensorPlan], i: int) -> None:
        """Called as tensor ``i`` starts: ask for the sources of the next tensors, ``PREFETCH_AHEAD``
        bytes of them (a hint, in the background: ``madvise`` may wait for the disk queue)."""
        self.consumed_bytes += tensors[i - 1].source.nbytes if i else 0
        while self.fetched < len(tensors) and (self.fetched <= i + 1 or
                                               self.fetched_bytes - self.consumed_bytes < PREFETCH_AHEAD):
            src = tensors[self.fetched].source
            if src.prefetch is not None:
                self.prefetching.submit(src.prefetch)
            self.fetched, self.fetched_bytes = self.fetched + 1, self.fetched_bytes + src.nbytes

    def hash(self, name: str, t: torch.Tensor) -> None:
        """Queue ``t`` for the hasher (in order), first waiting while the backlog is over ``HASH_BACKLOG``."""
        if self.hasher is None:
            return
        nbytes = t.numel() * t.element_size()
        while self.pending_hashes and (self.pending_hashes[0][0].done()
                                       or self.hash_backlog + nbytes > HASH_BACKLOG):
            fut, n = self.pending_hashes.popleft()
            fut.result()
            self.hash_backlog -= n
        self.pending_hashes.append((self.hashing.submit(_hash_tensor, self.hasher, name, t), nbytes))
        self.hash_backlog += nbytes

    def write(self, data: torch.Tensor | bytes) -> None:
        """Queue ``data`` for the writer, first waiting while ``WRITE_DEPTH`` writes are in flight."""
        while self.pending_writes and (self.pending_writes[0].done() or len(self.pending_writes) >= WRITE_DEPTH):
            self.pending_writes.popleft().result()
        self.pending_writes.append(self.writer.submit(self._write, data))

    def _write(self, data: torch.Tensor | bytes) -> None:
        if isinstance(data, bytes):
            self.sink.write(data)
        elif data.numel():
            self.sink.write(memoryview(data.contiguous().view(torch.uint8).numpy()))

    def checked(self, t: TensorPlan, src: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        """``chunk`` (rows of ``src``) after the weight check: one pass over the rows about to be encoded,
        while they are in cache, in whichever thread encodes them. A chunk that fails runs the full check on
        the whole tensor (its error, or its warning once per tensor)."""
        to_fp16 = t.qtype == "F16"
        if not self.check.passes(chunk, to_fp16, t.transform):
            with self.failed_lock:
                first = t.name not in self.failed
                self.failed.add(t.name)
            if first:
                self.check(t.name, src, to_fp16=to_fp16, transform=t.transform)
        return chunk

    def moved(self, tensors: Sequence[TensorPlan], i: int) -> Iterator[torch.Tensor]:
        """The bytes of ``tensors[i]`` from its codes (``TensorPlan.from_codes``), made on an encoder thread;
        the next such tensor is started first, so it is made while this one is written."""
        for j in (i, i + 1):
            if j < len(tensors) and tensors[j].from_codes is not None and j not in self.moving:
                self.moving[j] = self.encoders.submit(tensors[j].from_codes)  # type: ignore[arg-type]
        parts, data = self.moving.pop(i).result()
        for suffix, part in parts.items():
            self.check(tensors[i].name + suffix, part)  # scales and offsets: NaN/Inf (integer codes pass)
            self.hash(tensors[i].name + suffix, part)
        yield data

    def _encode(self, t: TensorPlan, src: torch.Tensor, chunk: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return encode_chunk(self.checked(t, src, chunk), t.qtype, t.transform, out, t.quant_weights)

    def encoded(self, t: TensorPlan, src: torch.Tensor) -> Iterator[torch.Tensor]:
        """The bytes of ``t`` chunk by chunk, in order (in one piece for a custom encoder), each chunk
        checked (:meth:`checked`) before it is encoded."""
        if t.encoder is not None:
            w = self.checked(t, src, src).float()
            yield t.encoder(w if t.transform is None else t.transform(w))
            return
        chunks = _row_chunks(src, CHUNK_ELEMENTS)
        target = _FLOAT_TYPES.get(t.qtype)
        if t.transform is None and target == src.dtype:
            for c in chunks:  # the source bytes as they are: written from the source's memory, no copy
                yield self.checked(t, src, c).contiguous().view(torch.uint8)
            return
        if t.transform is None and target is not None and (target != torch.bfloat16 or src.dtype == target):
            for c in chunks:  # a cast: memory-bound, one thread is enough
                self.turn = (self.turn + 1) % len(self.buffers)
                yield self._encode(t, src, c, self.buffers[self.turn])
            return
        pending: deque[Future] = deque()
        if not self.block_buffers:
            self.block_buffers = [torch.empty(-(-CHUNK_ELEMENTS // 32) * 34, dtype=torch.uint8)
                                  for _ in range(self.depth + WRITE_DEPTH + 1)]
        for c in chunks:
            self.block_turn = (self.block_turn + 1) % len(self.block_buffers)
            pending.append(self.encoders.submit(self._encode, t, src, c, self.block_buffers[self.block_turn]))
            if len(pending) >= self.depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def finish(self) -> None:
        """Wait for every queued write and hash; a worker's exception is raised here."""
        while self.pending_writes:
            self.pending_writes.popleft().result()
        while self.pending_hashes:
            self.pending_hashes.popleft()[0].result()

    def shutdown(self) -> None:
        """Drop queued work (after an error) and stop the threads; the one running finishes first."""
        for pool in (self.encoders, self.writer, self.hashing, self.prefetching):
            pool.shutdown(wait=True, cancel_futures=True)


def write_gguf(
    path: str | Path, metadata: Sequence[tuple[str, Value]], tensors: Sequence[TensorPlan], *,
    source_hash: Hasher | None = None, on_tensor: Callable[[str, int], None] | None = None,
    threads: int | None = None, check: WeightCheck | None = None, header: bytes | None = None,
    direct_io: bool = True,
) -> int:
    """Write a GGUF file, streaming tensor data; return its size in bytes.

    ``source_hash``, if given, is updated with every source tensor (name, dtype, shape, bytes) in
    write order, before any transform — a fingerprint of the canonical weights (a tensor moved from codes:
    its stored parts, ``TensorPlan.from_codes``). ``threads``
    (default: all CPUs) encode block-quantized chunks in parallel. ``check`` covers every source
    tensor (NaN/Inf, and the float16 range of F16 tensors after the transform; default: both are
    errors): each chunk is scanned as it is encoded, and a tensor with a failing chunk gets the full
    check (so a scan of a whole tensor no longer stalls the pipeline at every tensor). ``header``:
    ``header_bytes(metadata, tensors)`` when the caller has it already (a 256k-token vocabulary takes a
    quarter of a second to encode). ``direct_io``: write around the page cache where the filesystem allows it.
    """
    path = Path(path)
    check = check or WeightCheck(fix="use --type bf16 or f32")
    with open(path, "wb") as f, _one_intra_op_thread():
        sink = SequentialWriter(f, direct_io)
        sink.write(header_bytes(metadata, tensors) if header is None else header)
        stream = _Stream(sink, source_hash, threads or default_threads(), check)
        try:
            for i, t in enumerate(tensors):
                stream.prefetch(tensors, i)
                src = None if t.from_codes is not None else t.source.load()
                if src is not None:
                    stream.hash(t.name, src)
                written = 0
                try:
                    for data in stream.moved(tensors, i) if src is None else stream.encoded(t, src):
                        stream.write(data)
                        written += data.numel()
                except (Interrupted, NonFiniteError):
                    raise  # a signal that arrived while waiting for the writer: not about this tensor; or
                    # the weight check's error, which names the tensor
                except ConversionError as e:
                    raise ConversionError(f"tensor {t.name!r}: {e}") from None
                if written != t.nbytes:
                    raise AssertionError(f"{t.name}: wrote {written} bytes, planned {t.nbytes}")
                stream.write(b"\0" * _pad(written))
                if on_tensor is not None:
                    on_tensor(t.name, t.source.nbytes)
            stream.finish()
        finally:
            stream.shutdown()
        return sink.finish()


def patch_string(path: str | Path, key: str, placeholder: str, value: str, within: int = 1 << 20) -> None:
    """Replace the string metadata value of ``key``, written as ``placeholder``, by ``value`` of the same
    length, in place (for a value known only after the tensor data is written); it is looked for in the
    first ``within`` bytes (the header)."""
    old = string_bytes(key) + struct.pack("<I", ValueType.STRING) + string_bytes(placeholder)
    new = string_bytes(key) + struct.pack("<I", ValueType.STRING) + string_bytes(value)
    if len(old) != len(new):
        raise ValueError("a patched string must keep its length")
    with open(path, "r+b") as f:
        head = f.read(within)
        pos = head.find(old)
        if pos < 0:
            raise ValueError(f"{key} = {placeholder!r} not found in the first {within} bytes of {path}")
        f.seek(pos)
        f.write(new)
        f.flush()
        os.fsync(f.fileno())


__all__ = ["ALIGNMENT", "GGUF_MAGIC", "GGUF_VERSION", "TensorPlan", "Value", "ValueType", "array", "boolean",
           "encode_chunk", "f32", "header_bytes", "patch_string", "string", "u32", "write_gguf"]
