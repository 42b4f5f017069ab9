"""Open-time checks that an Orbax checkpoint's zarr v2 headers agree with the chunk data (spec §2.3).

A lying ``.zarray`` otherwise fails deep inside a read, or not at all: with ``fill_value: null`` (what
Orbax writes) tensorstore reads a missing chunk as zeros. So, before any array is read, every chunk
the header's shape and chunks imply must be listed in the store, and each chunk's first bytes (a zstd
frame header, whose Frame_Content_Size must equal the chunk's bytes under the header's dtype) and last
byte (a value cut short by a truncated OCDBT data file fails here) must be readable. Cost: two small
reads per chunk (Orbax writes one chunk per array below 2 GiB). A compressed chunk cut short in its own
file (the one-directory-per-array layout) is still only found by decoding it, on read.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gemma2_convert.core.errors import FormatError, name_list

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
HEAD = 18
"""The longest zstd frame header (RFC 8878 §3.1.1.1): magic 4, descriptor 1, window 1, dictionary 4, size 8."""


def zstd_content_size(head: bytes) -> int | None:
    """Frame_Content_Size of a zstd frame header; None when the frame does not state it."""
    desc = head[4]
    single = desc >> 5 & 1
    size = (single, 2, 4, 8)[desc >> 6]
    pos = 5 + (1 - single) + (0, 1, 2, 4)[desc & 3]
    if size == 0 or len(head) < pos + size:
        return None
    return int.from_bytes(head[pos:pos + size], "little") + (256 if size == 2 else 0)


def chunk_keys(name: str, meta: dict[str, Any], listed: frozenset[str], where: Path) -> list[str]:
    """The stored chunk keys of a zarr v2 array; FormatError when its header implies chunks the store lacks
    and, with ``fill_value: null``, nothing may stand in for them."""
    stored = sorted(k for k in listed if not k.rpartition("/")[2].startswith("."))
    if meta.get("fill_value") is not None:  # chunks equal to the fill value may be left out
        return stored
    grid = [math.ceil(s / c) for s, c in zip(meta["shape"], meta["chunks"])]
    total, have = math.prod(grid), set(stored)
    if total > len(have) + 4096:  # bounds the enumeration below for a header claiming absurd sizes
        lacking = f"at least {total - len(have)} of {total} chunks missing"
    else:
        sep = meta.get("dimension_separator") or "."
        keys = (sep.join(map(str, i)) or "0" for i in itertools.product(*map(range, grid)))
        missing = [k for k in keys if k not in have]
        if not missing:
            return stored
        lacking = f"{len(missing)} of {total} chunks missing ({name_list(missing, 5)})"
    raise FormatError(f"array {name}: {lacking}; its zarr header (shape {meta['shape']}, chunks {meta['chunks']}) "
                      "disagrees with the stored data, or the checkpoint is incomplete", where)


def _problem(name: str, key: str, head: Any, tail: Any, kv: Any, meta: dict, nbytes: int) -> str | None:
    """What is wrong with one chunk (head/tail: futures of its first bytes and last byte), or None."""
    try:
        tail.result()
        try:
            data = head.result().value
        except Exception:  # noqa: BLE001  (OUT_OF_RANGE: a value shorter than HEAD bytes)
            data = kv.read(key).result().value
    except Exception as e:  # noqa: BLE001  (tensorstore raises ValueError for unreadable values)
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        return f"cannot read array {name}: chunk {key} ({msg}); the data is damaged or incomplete"
    if not data:  # an OCDBT value in a data file that is gone reads as empty
        return f"cannot read array {name}: chunk {key} is empty; the data is damaged or incomplete"
    if (meta.get("compressor") or {}).get("id") != "zstd" or meta.get("filters"):
        return None
    if len(data) < 6 or data[:4] != ZSTD_MAGIC:
        return f"array {name}: chunk {key} is not a zstd frame, as its zarr header says; the data is damaged"
    size = zstd_content_size(data)
    if size is not None and size != nbytes:
        return (f"array {name}: chunk {key} holds {size} bytes, but its zarr header ({meta['dtype']}, chunks "
                f"{meta['chunks']}) needs {nbytes}; the header disagrees with the data")
    return None


def check_chunks(arrays: Mapping[str, tuple[Any, frozenset[str]]], where: Path) -> None:
    """Check every chunk of every array (name → (opened zarr v2 TensorStore, keys listed under it)); the
    first problem, in name order, is one FormatError naming the array and the chunk."""
    pending = []
    for name, (store, listed) in sorted(arrays.items()):
        meta = store.spec().to_json()["metadata"]
        nbytes = math.prod(meta["chunks"]) * store.dtype.numpy_dtype.itemsize
        kv = store.kvstore
        for key in chunk_keys(name, meta, listed, where):
            head, tail = kv.read(key, byte_range=slice(0, HEAD)), kv.read(key, byte_range=slice(-1, None))
            pending.append((name, key, head, tail, kv, meta, nbytes))
    for args in pending:
        problem = _problem(*args)
        if problem:
            raise FormatError(problem, where)
