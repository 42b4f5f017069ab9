"""GGUF format constants and typed metadata values, shared by the writer and the reader.

Layout facts from gguf-py ``constants.py`` / ``gguf_writer.py`` and ggml ``gguf.h``: magic ``GGUF``,
version 3, default alignment 32; strings are a u64 byte length + UTF-8; an array is a u32 element
type, a u64 count and the elements.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32


class ValueType(IntEnum):
    """GGUF metadata value types (gguf-py ``GGUFValueType``)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


SCALAR_FORMATS: dict[ValueType, str] = {
    ValueType.UINT8: "<B", ValueType.INT8: "<b", ValueType.UINT16: "<H", ValueType.INT16: "<h",
    ValueType.UINT32: "<I", ValueType.INT32: "<i", ValueType.FLOAT32: "<f", ValueType.BOOL: "<?",
    ValueType.UINT64: "<Q", ValueType.INT64: "<q", ValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class Value:
    """A typed metadata value; ``item_type`` is the element type of an ARRAY."""

    type: ValueType
    value: object
    item_type: ValueType | None = None


def u32(v: int) -> Value:
    return Value(ValueType.UINT32, int(v))


def f32(v: float) -> Value:
    return Value(ValueType.FLOAT32, float(v))


def string(v: str) -> Value:
    return Value(ValueType.STRING, str(v))


def boolean(v: bool) -> Value:
    return Value(ValueType.BOOL, bool(v))


def array(item_type: ValueType, values: Sequence) -> Value:
    return Value(ValueType.ARRAY, values, item_type)


_U64 = struct.Struct("<Q")


def string_bytes(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def array_bytes(item_type: ValueType, values: Sequence) -> bytes:
    head = struct.pack("<IQ", item_type, len(values))
    if item_type == ValueType.STRING:  # u64 length + UTF-8 bytes each, interleaved in one join
        raws = [v.encode("utf-8") for v in values]
        parts: list[bytes] = [b""] * (2 * len(raws))
        parts[0::2] = map(_U64.pack, map(len, raws))
        parts[1::2] = raws
        return head + b"".join(parts)
    if item_type == ValueType.ARRAY:
        raise ValueError("nested GGUF arrays are not written")
    if isinstance(values, (bytes, bytearray)):
        if item_type != ValueType.UINT8:
            raise ValueError("bytes can only be written as a UINT8 array")
        return head + bytes(values)
    np_type = np.dtype(SCALAR_FORMATS[item_type])
    return head + np.asarray(values, dtype=np_type).tobytes()


def value_bytes(v: Value) -> bytes:
    """Type tag + payload of one metadata value."""
    tag = struct.pack("<I", v.type)
    if v.type == ValueType.STRING:
        return tag + string_bytes(str(v.value))
    if v.type == ValueType.ARRAY:
        assert v.item_type is not None
        return tag + array_bytes(v.item_type, v.value)  # type: ignore[arg-type]
    return tag + struct.pack(SCALAR_FORMATS[v.type], v.value)
