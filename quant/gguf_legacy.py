"""GGUF 32-element block types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (quantize, pack, unpack, dequantize).

Layout contract (``ggml-common.h``; bytes little-endian, blocks along the contiguous row):

* ``w``: float32 ``[rows, cols]``, ``cols % 32 == 0``; block ``b`` of a row holds ``w[r, 32*b : 32*b+32]``.
* raw bytes: uint8 ``[rows, cols // 32 * type_size]``, block after block.
* Q8_0 (34 B): ``fp16 d | int8 q[32]``; ``x = d*q``.
* Q4_0 (18 B): ``fp16 d | u8 qs[16]``; ``qs[j] = q[j] | q[j+16] << 4`` (low nibble = first half); ``x = d*(q-8)``.
* Q4_1 (20 B): ``fp16 d | fp16 m | u8 qs[16]`` (same nibbles); ``x = d*q + m``.
* Q5_0 (22 B): ``fp16 d | u8 qh[4] | u8 qs[16]``; bit j of the little-endian u32 ``qh`` is bit 4 of
  ``q[j]``, ``qs`` holds the low nibbles as in Q4_0; ``x = d*(q-16)``.
* Q5_1 (24 B): ``fp16 d | fp16 m | u8 qh[4] | u8 qs[16]``; ``x = d*q + m``.

Codes ``q`` are the stored unsigned values (Q8_0: signed int8). The ``choose_*`` functions follow
``quantize_row_*_ref`` in ggml-quants.c exactly as gguf-py's ``quants.py`` computes it (float32, no FMA):
Q8_0 ``q = roundf(x * (1/d))`` (round half away from zero), the others ``q = (uint8)(x*id + offset)``
(truncation) clamped to the top code. ``pack_*`` accept any fp16 scales and integer codes, so other
quantizers can choose their own and still write blocks stock llama.cpp decodes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

QK = 32
_HALF_BELOW_T = torch.tensor(float(np.nextafter(np.float32(0.5), np.float32(0))))  # 0.49999997f
_BITS = torch.arange(8, dtype=torch.uint8)
_LOW_BIT_EACH_BYTE = 0x0101010101010101
_LOW_NIBBLE_EACH_BYTE = 0x0F0F0F0F0F0F0F0F


# ---- shared helpers --------------------------------------------------------------------------


def to_blocks(w: Tensor, block: int) -> Tensor:
    """float32 ``[rows, cols]`` -> ``[rows, cols // block, block]`` (a view when possible)."""
    rows, cols = w.shape
    if cols % block:
        raise ValueError(f"row length {cols} is not a multiple of the block size {block}")
    return w.to(torch.float32).reshape(rows, cols // block, block)


def round_half_away(v: Tensor) -> Tensor:
    """C ``roundf`` (ties away from zero) of float32 ``v`` with ``|v| < 127.5``, as int8.

    ``v + copysign(0.49999997f, v)`` is rounded once and the int8 conversion truncates toward
    zero; this equals ``roundf`` for every float32 (the classic ``x + 0.5`` fails at 0.49999997).
    """
    return torch.copysign(_HALF_BELOW_T, v).add_(v).to(torch.int8)


def safe_inverse(d: Tensor) -> Tensor:
    """``d ? 1.0f/d : 0.0f`` elementwise (exact float32 division)."""
    return torch.where(d == 0, torch.zeros_like(d), torch.reciprocal(d))


def per_block(s: Tensor, blocks: Tensor) -> Tensor:
    """Broadcast a per-block value ``[...]`` to ``blocks``' shape ``[..., n]`` (an expanded view)."""
    return s.unsqueeze(-1).expand_as(blocks)


def f16_bytes(x: Tensor) -> Tensor:
    """Values rounded to fp16 (nearest-even) as bytes: ``[...]`` -> uint8 ``[..., 2]``."""
    return x.to(torch.float16).contiguous().unsqueeze(-1).view(torch.uint8)


def f16_from_bytes(b: Tensor) -> Tensor:
    """uint8 ``[..., 2]`` -> float32 ``[...]`` (exact)."""
    return b.contiguous().view(torch.float16).squeeze(-1).to(torch.float32)


def pack_nibbles(q: Tensor) -> Tensor:
    """uint8 codes ``[..., n]`` (low 4 bits used, ``n % 16 == 0``) -> ``[..., n/2]``.

    Byte j holds element j in its low nibble and element ``j + n/2`` in its high nibble
    (Q4_0/Q4_1/Q5_x: n = 32; Q4_K/Q5_K: n = 64 per chunk; Q6_K: n = 128 per half).
    Works on 8-byte words: a masked byte shifted left by 4 stays inside its byte.
    """
    q64 = q.contiguous().view(torch.int64) & _LOW_NIBBLE_EACH_BYTE  # [..., n/8]
    half = q64.shape[-1] // 2
    return (q64[..., :half] | (q64[..., half:] << 4)).view(torch.uint8)  # [..., n/2]


def unpack_nibbles(qs: Tensor) -> Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 ``[..., m]`` -> ``[..., 2m]``."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def pack_high_bits(q: Tensor) -> Tensor:
    """Bit 4 of 32 codes -> 4 bytes ``qh`` (bit j of the little-endian u32 = bit 4 of ``q[j]``).

    Per 8-byte word (8 codes, one 0/1 per byte) three shift-or steps gather the 8 bits into byte 0.
    """
    t = (q.contiguous().view(torch.int64) >> 4) & _LOW_BIT_EACH_BYTE  # [..., 4]
    t = t | (t >> 7)
    t = t | (t >> 14)
    t = t | (t >> 28)
    return (t & 0xFF).to(torch.uint8)  # [..., 4]


def unpack_high_bits(qh: Tensor) -> Tensor:
    """uint8 ``[..., 4]`` -> 0/1 uint8 ``[..., 32]``, element j from bit j of the u32."""
    return ((qh.unsqueeze(-1) >> _BITS) & 1).reshape(*qh.shape[:-1], 32)


def split_bytes(raw: Tensor, type_size: int, sizes: list[int]) -> list[Tensor]:
    """uint8 ``[rows, nb*type_size]`` -> per-field views ``[rows, nb, size]``."""
    blocks = raw.reshape(raw.shape[0], -1, type_size)
    return list(torch.split(blocks, sizes, dim=-1))


# ---- choose: scales and integer codes ------------------------------------------------------


def choose_q8_0(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """``[..., 32]`` -> (d fp16 ``[...]``, q int8 ``[..., 32]``): ``d = amax/127``, ``q = roundf(x/d)``."""
    amax = torch.maximum(blocks.amax(-1), -blocks.amin(-1)).abs()  # [...]; abs: -0.0 -> 0.0
    d = amax / 127
    q = round_half_away(blocks * per_block(safe_inverse(d), blocks))
    return d.to(torch.float16), q


def signed_absmax(x: Tensor, dim: int = -1) -> Tensor:
    """The first element of largest magnitude along ``dim``, sign kept (C ``if (amax < fabsf(v))`` loop).

    The max or the min by magnitude; only where ``max == -min`` does the position decide (argmax).
    """
    mx, mn = x.amax(dim), x.amin(dim)
    out = torch.where(mx >= -mn, mx, mn)
    tie = (mx == -mn) & (mx != 0)
    if bool(tie.any()):
        first = x.gather(dim, x.abs().argmax(dim, keepdim=True)).squeeze(dim)
        out = torch.where(tie, first, out)
    return out


def _choose_symmetric(blocks: Tensor, half_levels: int) -> tuple[Tensor, Tensor]:
    """Q4_0 (8) / Q5_0 (16): ``d = max/-half``, ``q = min(2*half-1, (int)(x*id + half + 0.5))``."""
    d = signed_absmax(blocks) / -half_levels  # [...]
    v = (blocks * per_block(safe_inverse(d), blocks)).add_(half_levels + 0.5)  # in [0, 2*half+0.5]
    q = v.to(torch.int8).clamp_(max=2 * half_levels - 1).view(torch.uint8)
    return d.to(torch.float16), q


def _choose_affine(blocks: Tensor, top: int) -> tuple[Tensor, Tensor, Tensor]:
    """Q4_1 (15) / Q5_1 (31): ``d = (max-min)/top``, ``m = min``, ``q = min(top, (int)((x-m)*id + 0.5))``."""
    mn, mx = blocks.amin(-1), blocks.amax(-1)  # [...]
    d = (mx - mn) / top
    v = (blocks - per_block(mn, blocks)).mul_(per_block(safe_inverse(d), blocks)).add_(0.5)
    q = v.to(torch.int8).clamp_(max=top).view(torch.uint8)
    return d.to(torch.float16), mn.to(torch.float16), q


def choose_q4_0(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """``[..., 32]`` -> (d fp16, q uint8 in [0, 15]); the largest-|x| element maps to level 0."""
    return _choose_symmetric(blocks, 8)


def choose_q5_0(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """``[..., 32]`` -> (d fp16, q uint8 in [0, 31])."""
    return _choose_symmetric(blocks, 16)


def choose_q4_1(blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``[..., 32]`` -> (d fp16, m fp16, q uint8 in [0, 15])."""
    return _choose_affine(blocks, 15)


def choose_q5_1(blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``[..., 32]`` -> (d fp16, m fp16, q uint8 in [0, 31])."""
    return _choose_affine(blocks, 31)


# ---- pack: fp16 scales + codes -> block bytes -------------------------------------------------


def _flat(fields: list[Tensor]) -> Tensor:
    """Per-block byte fields ``[rows, nb, k]`` -> ``[rows, nb * sum(k)]``."""
    out = torch.cat(fields, dim=-1)
    return out.reshape(out.shape[0], -1)


def pack_q8_0(d: Tensor, q: Tensor) -> Tensor:
    """d ``[rows, nb]``, q int8 ``[rows, nb, 32]`` -> uint8 ``[rows, nb*34]``."""
    return _flat([f16_bytes(d), q.to(torch.int8).view(torch.uint8)])


def pack_q4_0(d: Tensor, q: Tensor) -> Tensor:
    """d ``[rows, nb]``, q in [0, 15] ``[rows, nb, 32]`` -> uint8 ``[rows, nb*18]``."""
    return _flat([f16_bytes(d), pack_nibbles(q.to(torch.uint8))])


def pack_q4_1(d: Tensor, m: Tensor, q: Tensor) -> Tensor:
    """d, m ``[rows, nb]``, q in [0, 15] -> uint8 ``[rows, nb*20]``."""
    return _flat([f16_bytes(d), f16_bytes(m), pack_nibbles(q.to(torch.uint8))])


def pack_q5_0(d: Tensor, q: Tensor) -> Tensor:
    """d ``[rows, nb]``, q in [0, 31] ``[rows, nb, 32]`` -> uint8 ``[rows, nb*22]``."""
    q = q.to(torch.uint8)
    return _flat([f16_bytes(d), pack_high_bits(q), pack_nibbles(q)])


def pack_q5_1(d: Tensor, m: Tensor, q: Tensor) -> Tensor:
    """d, m ``[rows, nb]``, q in [0, 31] -> uint8 ``[rows, nb*24]``."""
    q = q.to(torch.uint8)
    return _flat([f16_bytes(d), f16_bytes(m), pack_high_bits(q), pack_nibbles(q)])


# ---- unpack + dequantize ---------------------------------------------------------------------


def dequantize_q8_0(raw: Tensor) -> Tensor:
    """uint8 ``[rows, nb*34]`` -> float32 ``[rows, nb*32]``: ``x = q*d``."""
    d, q = split_bytes(raw, 34, [2, 32])
    x = q.contiguous().view(torch.int8).to(torch.float32) * f16_from_bytes(d).unsqueeze(-1)
    return x.reshape(raw.shape[0], -1)


def dequantize_q4_0(raw: Tensor) -> Tensor:
    """uint8 ``[rows, nb*18]`` -> float32 ``[rows, nb*32]``: ``x = d*(q-8)``."""
    d, qs = split_bytes(raw, 18, [2, 16])
    q = unpack_nibbles(qs).to(torch.float32) - 8
    return (f16_from_bytes(d).unsqueeze(-1) * q).reshape(raw.shape[0], -1)


def dequantize_q4_1(raw: Tensor) -> Tensor:
    """uint8 ``[rows, nb*20]`` -> float32: ``x = d*q + m``."""
    d, m, qs = split_bytes(raw, 20, [2, 2, 16])
    x = f16_from_bytes(d).unsqueeze(-1) * unpack_nibbles(qs).to(torch.float32)
    return (x + f16_from_bytes(m).unsqueeze(-1)).reshape(raw.shape[0], -1)


def _five_bit_codes(qh: Tensor, qs: Tensor) -> Tensor:
    """``qh [..., 4]``, ``qs [..., 16]`` -> float32 codes in [0, 31] ``[..., 32]``."""
    return (unpack_nibbles(qs) | (unpack_high_bits(qh) << 4)).to(torch.float32)


def dequantize_q5_0(raw: Tensor) -> Tensor:
    """uint8 ``[rows, nb*22]`` -> float32: ``x = d*(q-16)``."""
    d, qh, qs = split_bytes(raw, 22, [2, 4, 16])
    q = _five_bit_codes(qh, qs) - 16
    return (f16_from_bytes(d).unsqueeze(-1) * q).reshape(raw.shape[0], -1)


def dequantize_q5_1(raw: Tensor) -> Tensor:
    """uint8 ``[rows, nb*24]`` -> float32: ``x = d*q + m``."""
    d, m, qh, qs = split_bytes(raw, 24, [2, 2, 4, 16])
    x = f16_from_bytes(d).unsqueeze(-1) * _five_bit_codes(qh, qs)
    return (x + f16_from_bytes(m).unsqueeze(-1)).reshape(raw.shape[0], -1)


# ---- whole-tensor entry points -----------------------------------------------------------------


def quantize_q8_0(w: Tensor) -> Tensor:
    """float ``[rows, cols]`` -> Q8_0 bytes ``[rows, cols//32*34]``."""
    return pack_q8_0(*choose_q8_0(to_blocks(w, QK)))


def quantize_q4_0(w: Tensor) -> Tensor:
    """float ``[rows, cols]`` -> Q4_0 bytes ``[rows, cols//32*18]``."""
    return pack_q4_0(*choose_q4_0(to_blocks(w, QK)))


def quantize_q4_1(w: Tensor) -> Tensor:
    """float ``[rows, cols]`` -> Q4_1 bytes ``[rows, cols//32*20]``."""
    return pack_q4_1(*choose_q4_1(to_blocks(w, QK)))


def quantize_q5_0(w: Tensor) -> Tensor:
    """float ``[rows, cols]`` -> Q5_0 bytes ``[rows, cols//32*22]``."""
    return pack_q5_0(*choose_q5_0(to_blocks(w, QK)))


def quantize_q5_1(w: Tensor) -> Tensor:
    """float ``[rows, cols]`` -> Q5_1 bytes ``[rows, cols//32*24]``."""
    return pack_q5_1(*choose_q5_1(to_blocks(w, QK)))
