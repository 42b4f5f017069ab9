"""Byte-level builders of broken files: safetensors headers that lie, GGUF fields edited in place,
zip archives with records left out, truncations."""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def truncated(src: Path, dst: Path, size: int) -> Path:
    """The first ``size`` bytes of ``src`` (negative: all but the last ``-size``)."""
    data = src.read_bytes()
    dst.write_bytes(data[:size])
    return dst


def edited(src: Path, dst: Path, edit: Callable[[bytearray], None]) -> Path:
    """A copy of ``src`` with its bytes changed by ``edit``."""
    data = bytearray(src.read_bytes())
    edit(data)
    dst.write_bytes(bytes(data))
    return dst


# ---- safetensors -----------------------------------------------------------------------------

def st_parts(path: Path) -> tuple[dict[str, Any], bytes]:
    """(header dict, data buffer) of a valid safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_write(dst: Path, header: dict[str, Any] | bytes, data: bytes, length: int | None = None) -> Path:
    """A safetensors file from a header (dict, or raw bytes) and data; ``length`` overrides the length field."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return dst


def st_lie(src: Path, dst: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """``src`` with its header changed by ``change(header)``; the data is kept."""
    header, data = st_parts(src)
    change(header)
    return st_write(dst, header, data)


def first_tensors(header: dict[str, Any], n: int = 2) -> list[str]:
    """The ``n`` tensors stored first in the data buffer."""
    names = [k for k in header if k != "__metadata__"]
    return sorted(names, key=lambda k: header[k]["data_offsets"][0])[:n]


def st_set_values(src: Path, dst: Path, name: str, values: list[float]) -> Path:
    """``src`` with the first elements of its float32 tensor ``name`` replaced by ``values``."""
    header, _ = st_parts(src)
    assert header[name]["dtype"] == "F32", header[name]
    start = 8 + struct.unpack_from("<Q", src.read_bytes())[0] + header[name]["data_offsets"][0]
    return edited(src, dst, lambda d: struct.pack_into(f"<{len(values)}f", d, start, *values))


# ---- GGUF ------------------------------------------------------------------------------------

def gguf_key_value_pos(data: bytes, key: str) -> int:
    """Byte position of the value (after its u32 type) of metadata ``key``."""
    k = struct.pack("<Q", len(key)) + key.encode()
    return data.index(k) + len(k) + 4


def gguf_tensor_info_pos(data: bytes, name: str) -> tuple[int, int]:
    """(position of n_dims, position of the u64 data offset) of tensor ``name``'s info."""
    key = struct.pack("<Q", len(name)) + name.encode()
    pos = data.rindex(key) + len(key)
    n_dims = struct.unpack_from("<I", data, pos)[0]
    return pos, pos + 4 + 8 * n_dims + 4


def gguf_set(fmt: str, pos_of: Callable[[bytes], int], value: int) -> Callable[[bytearray], None]:
    """An ``edited`` action writing ``value`` as ``fmt`` at ``pos_of(data)``."""
    return lambda d: struct.pack_into(fmt, d, pos_of(bytes(d)), value)


# ---- zip -------------------------------------------------------------------------------------

def zip_without(src: Path, dst: Path, drop: Callable[[str], bool]) -> Path:
    """``src`` re-packed (stored, as torch.save writes) without the records ``drop`` selects."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if not drop(info.filename):
                zout.writestr(info, zin.read(info))
    return dst


# ---- Orbax -----------------------------------------------------------------------------------

def orbax_set_zarray(ckpt: Path, array: str, **changes: Any) -> None:
    """Change fields of one array's zarr header in place: ``<array>/.zarray`` in the directory layout,
    else in the root OCDBT store (a new version, written with tensorstore)."""
    f = ckpt / array / ".zarray"
    if f.is_file():
        f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))
        return
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "ocdbt", "base": ckpt.resolve().as_uri() + "/"}).result()
    key = f"{array}/.zarray".encode()
    kv.write(key, json.dumps({**json.loads(kv.read(key).result().value), **changes}).encode()).result()


def orbax_set_write_shape(ckpt: Path, leaf: tuple[str, ...], shape: list[int]) -> None:
    """Change the write_shape ``_METADATA`` records for the leaf at key path ``leaf``."""
    meta = json.loads((ckpt / "_METADATA").read_text())
    meta["tree_metadata"][str(leaf)]["value_metadata"]["write_shape"] = shape
    (ckpt / "_METADATA").write_text(json.dumps(meta))
