"""Bit packing of integer codes: two nibbles per byte, and compressed-tensors' int32 words.

``pack_int4 / unpack_int4``: unsigned 4-bit values ``[0, 15]`` two per uint8 along the last dim.
``nibble_order='low_first'``: element ``2k`` in bits 0–3 and ``2k+1`` in bits 4–7 of byte ``k``
(MLX, GPTQ and compressed-tensors order); ``'high_first'`` swaps them.

``pack_int32 / unpack_int32``: compressed-tensors ``pack-quantized`` words, bit-exact with
``pack_to_int32`` / ``unpack_from_int32`` (compressed_tensors/compressors/pack_quantized/helpers.py,
0.20.0). Signed codes ``q ∈ [-2^(b-1), 2^(b-1) - 1]`` are offset by ``2^(b-1)`` to unsigned,
then ``32 / b`` consecutive elements along ``packed_dim`` fill one int32, element ``k`` of a
word at bits ``[k·b, (k+1)·b)`` (lowest bits first). A length that is not a multiple of
``32 / b`` is padded with raw zero bits (*after* the offset, as the library does). The word is
the two's-complement int32 of that bit pattern. Only ``b`` dividing 32 (1, 2, 4, 8) is
supported, where the library's dense cross-word packing reduces to this simple form.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from quant import jit

NIBBLE_ORDERS = ("low_first", "high_first")


PACK_ELEMENTS = 1 << 22
"""Codes packed per step by ``pack_int32``."""

def _check_nibble_order(nibble_order: str) -> None:
    if nibble_order not in NIBBLE_ORDERS:
        raise ValueError(f"nibble_order={nibble_order!r}; choose one of {list(NIBBLE_ORDERS)}")


def pack_int4(q: Tensor, nibble_order: str = "low_first") -> Tensor:
    """``[..., n]`` ints in [0, 15] → ``[..., n/2]`` uint8 (n even)."""
    _check_nibble_order(nibble_order)
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dim, got shape {list(q.shape)}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError(f"pack_int4 needs values in [0, 15], got [{int(q.min())}, {int(q.max())}]")
    pairs = q.to(torch.uint8).reshape(*q.shape[:-1], -1, 2)         # [..., n/2, 2]
    lo, hi = (pairs[..., 0], pairs[..., 1]) if nibble_order == "low_first" else (pairs[..., 1], pairs[..., 0])
    return lo | (hi << 4)


def unpack_int4(packed: Tensor, nibble_order: str = "low_first") -> Tensor:
    """``[..., m]`` uint8 → ``[..., 2m]`` uint8 in [0, 15]; inverse of ``pack_int4``."""
    _check_nibble_order(nibble_order)
    lo, hi = packed & 0xF, packed >> 4
    pair = (lo, hi) if nibble_order == "low_first" else (hi, lo)
    return torch.stack(pair, dim=-1).reshape(*packed.shape[:-1], -1)


def _words_per_dim(n: int, bits: int) -> int:
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"int32 packing supports bits in (1, 2, 4, 8), got {bits}")
    per = 32 // bits
    return -(-n // per)


def pack_int32(q: Tensor, bits: int, packed_dim: int = 1) -> Tensor:
    """2-D signed int8 codes → int32 words along ``packed_dim`` (1: ``[r, ceil(c·b/32)]``), a block of rows
    at a time (the int64 temporaries stay at ``PACK_ELEMENTS`` codes, not 8 bytes per code of the tensor)."""
    if bits in (4, 8) and packed_dim == 1 and q.dtype == torch.int8 and sys.byteorder == "little":
        return pack_unsigned(q.contiguous().view(torch.uint8) + (1 << (bits - 1)), bits)  # wraps to u in uint8
    x = q.T if packed_dim == 0 else q                               # [rows, n]
    rows, n = x.shape
    per, words = 32 // bits, _words_per_dim(n, bits)
    shifts = torch.arange(per, dtype=torch.int64) * bits            # [per]
    out = torch.empty(rows, words, dtype=torch.int32)
    step = max(1, PACK_ELEMENTS // max(1, n))
    for i in range(0, rows, step):
        b = x[i:i + step].to(torch.int64) + (1 << (bits - 1))       # unsigned codes
        b = torch.nn.functional.pad(b, (0, words * per - n)).reshape(b.shape[0], words, per)
        u32 = (b << shifts).sum(dim=-1)                             # [block, words] in [0, 2^32)
        out[i:i + step] = (u32 - ((u32 >> 31) << 32)).to(torch.int32)  # two's complement
    return (out.T if packed_dim == 0 else out).contiguous()


def pack_unsigned(u: Tensor, bits: int) -> Tensor:
    """Unsigned codes ``[rows, n]`` uint8 (4 bits: only the low nibble is read) → int32 words ``[rows, words]``,
    the inverse of :func:`unpack_unsigned` (4 and 8 bits, little-endian): byte ``j`` of a row holds elements ``2j``
    and ``2j + 1`` (4 bits) or ``j``; a short last word is padded with zero bits, as ``pack_int32`` does."""
    rows, n = u.shape
    words = _words_per_dim(n, bits)
    pad = words * (32 // bits) - n
    u = torch.nn.functional.pad(u, (0, pad)) if pad else u.contiguous()
    if bits == 4 and jit.available():
        from quant.codes_jit import pack_nibbles_pairs  # deferred: imports numba

        return pack_nibbles_pairs(u).view(torch.int32)
    if bits == 4:
        u = u & 0xF
        pairs = u.reshape(rows, -1, 2)                              # [rows, 4·words, 2]
        u = pairs[..., 0] | (pairs[..., 1] << 4)
    return u.contiguous().view(torch.int32)


def unpack_unsigned(w: Tensor, bits: int, n: int) -> Tensor | None:
    """The unsigned codes ``[rows, n]`` uint8 of int32 words ``[rows, words]`` packed along rows, for 4 and 8 bits,
    through the words' little-endian bytes (no int64 temporaries): byte ``j`` of a row holds elements ``2j`` (low
    nibble) and ``2j + 1`` (4 bits), or element ``j`` (8 bits). None where that does not apply."""
    if bits not in (4, 8) or sys.byteorder != "little" or w.shape[1] != _words_per_dim(n, bits):
        return None
    b = w.contiguous().view(torch.uint8)                            # [rows, 4·words]
    if bits == 4 and jit.available():
        from quant.codes_jit import unpack_nibbles_pairs  # deferred: imports numba

        return unpack_nibbles_pairs(b, n)
    if bits == 4:
        b = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(w.shape[0], -1)
    return b[:, :n]


def _unpack_bytes(w: Tensor, bits: int, n: int) -> Tensor:
    u = unpack_unsigned(w, bits, n)
    assert u is not None
    return (u.view(torch.int8) ^ -128).view(torch.int8) if bits == 8 else u.view(torch.int8) - (1 << (bits - 1))


def unpack_int32(packed: Tensor, bits: int, n: int, packed_dim: int = 1) -> Tensor:
    """int32 words → 2-D signed int8 codes with ``n`` entries along ``packed_dim``."""
    w = packed.T if packed_dim == 0 else packed                     # [rows, words]
    if w.shape[1] != _words_per_dim(n, bits):
        raise ValueError(f"{w.shape[1]} int32 words cannot hold {n} {bits}-bit values")
    if bits in (4, 8) and packed_dim == 1 and sys.byteorder == "little":
        return _unpack_bytes(w, bits, n)
    u32 = w.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(32 // bits, dtype=torch.int64) * bits     # [per]
    x = (u32[..., None] >> shifts) & ((1 << bits) - 1)              # [rows, words, per]
    x = x.reshape(w.shape[0], -1)[:, :n] - (1 << (bits - 1))
    x = x.to(torch.int8)
    return (x.T if packed_dim == 0 else x).contiguous()
