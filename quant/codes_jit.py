"""Compiled (numba) moves of 4-bit codes: the same bytes as the torch code they replace, in one pass.

A transcode (``quant/transcode.py``) moves codes between layouts without decoding them; in torch each move is
a few whole-tensor temporaries (a ``stack`` of nibbles, a ``cat`` of block fields), about 1.3 G codes/s on
one thread. These kernels read each input byte once and write each output byte once:

* :func:`unpack_nibbles_pairs`: bytes holding two codes (low nibble first, compressed-tensors' and MLX's int4
  words read as little-endian bytes) → one code a byte (``quant.pack.unpack_unsigned``), and
  :func:`pack_nibbles_pairs` back (``quant.pack.pack_unsigned``);
* :func:`pack_blocks4`: codes ``[rows, cols]`` + fp16 scale (and offset) bits per 32-group → Q4_0 / Q4_1 blocks
  (``quant.gguf_legacy.pack_q4_0`` / ``pack_q4_1``: ``d | (m) | qs[16]``, ``qs[j] = q[j] | q[j+16] << 4``), and
  :func:`unpack_blocks4` back (``quant.gguf_blocks.codes_from_blocks``).

Serial, GIL released (:func:`quant.jit.kernel`): callers' threads give the parallelism. tests/test_transcode.py
checks both against the torch functions byte for byte. Little-endian only (as ``unpack_unsigned``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from quant.jit import kernel

QK = 32


@kernel
def _unpack_pairs(src: np.ndarray, out: np.ndarray) -> None:
    for i in range(src.size):  # out (uint16, little-endian): byte 2i = low nibble, byte 2i+1 = high nibble
        x = np.uint16(src[i])
        out[i] = (x & np.uint16(0xF)) | ((x >> np.uint16(4)) << np.uint16(8))


@kernel
def _pack4(u: np.ndarray, d: np.ndarray, m: np.ndarray, affine: bool, out: np.ndarray) -> None:
    ts = 20 if affine else 18
    for g in range(d.size):  # one block per group of 32 codes
        o, s = g * ts, g * QK
        out[o] = d[g] & 0xFF
        out[o + 1] = d[g] >> 8
        if affine:
            out[o + 2] = m[g] & 0xFF
            out[o + 3] = m[g] >> 8
            o += 4
        else:
            o += 2
        for j in range(16):
            out[o + j] = (u[s + j] & 0xF) | ((u[s + 16 + j] & 0xF) << 4)


@kernel
def _unpack4(raw: np.ndarray, affine: bool, u: np.ndarray, d: np.ndarray, m: np.ndarray) -> None:
    ts = 20 if affine else 18
    for g in range(d.size):  # one block per group of 32 codes
        o, s = g * ts, g * QK
        d[g] = np.uint16(raw[o]) | (np.uint16(raw[o + 1]) << np.uint16(8))
        if affine:
            m[g] = np.uint16(raw[o + 2]) | (np.uint16(raw[o + 3]) << np.uint16(8))
            o += 4
        else:
            o += 2
        for j in range(16):
            u[s + j] = raw[o + j] & 0xF
            u[s + 16 + j] = raw[o + j] >> 4


@kernel
def _pack_pairs(src: np.ndarray, out: np.ndarray) -> None:
    for i in range(src.size):  # src (uint16, little-endian): codes 2i (low byte) and 2i+1; low nibbles kept
        x = src[i]
        out[i] = np.uint8((x & np.uint16(0xF)) | ((x >> np.uint16(4)) & np.uint16(0xF0)))


def pack_nibbles_pairs(u: Tensor) -> Tensor:
    """uint8 codes ``[rows, 2k]`` (low nibbles used) → ``[rows, k]`` two a byte, low nibble first: the inverse of
    :func:`unpack_nibbles_pairs` (``quant.pack.pack_unsigned``)."""
    out = torch.empty(u.shape[0], u.shape[1] // 2, dtype=torch.uint8)
    _pack_pairs(u.contiguous().numpy().reshape(-1).view(np.uint16), out.numpy().reshape(-1))
    return out


def unpack_blocks4(raw: Tensor, rows: int, cols: int, affine: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Q4_0 (Q4_1 with ``affine``) block bytes of a ``[rows, cols]`` tensor → codes uint8 ``[rows, cols]``, scales
    and offsets float32 ``[rows, cols/32]`` (the fp16 values widened), the inverse of :func:`pack_blocks4`."""
    u = torch.empty(rows, cols, dtype=torch.uint8)
    d = torch.empty(rows, cols // QK, dtype=torch.int16)
    m = torch.empty_like(d) if affine else d
    _unpack4(raw.contiguous().numpy().reshape(-1), affine, u.numpy().reshape(-1), d.numpy().view(np.uint16).reshape(-1),
             m.numpy().view(np.uint16).reshape(-1))
    return u, d.view(torch.float16).float(), m.view(torch.float16).float() if affine else None


def unpack_nibbles_pairs(b: Tensor, cols: int) -> Tensor:
    """uint8 ``[rows, k]`` (two codes a byte, low nibble first) → uint8 codes ``[rows, cols]`` (``cols ≤ 2k``)."""
    rows = b.shape[0]
    out = torch.empty(rows, 2 * b.shape[1], dtype=torch.uint8)
    _unpack_pairs(b.contiguous().numpy().reshape(-1), out.numpy().reshape(-1).view(np.uint16))
    return out[:, :cols] if cols != out.shape[1] else out


def pack_blocks4(u: Tensor, d: Tensor, m: Tensor | None) -> Tensor:
    """Codes ``[rows, cols]`` in [0, 15], fp16 scales ``d`` (and offsets ``m``) ``[rows, cols/32]`` → uint8
    ``[rows, cols/32 · (18 | 20)]``: Q4_0 blocks, or Q4_1 with ``m``."""
    rows, cols = u.shape
    ts = 18 if m is None else 20
    out = torch.empty(rows, cols // QK * ts, dtype=torch.uint8)
    d16 = d.to(torch.float16).contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1)
    m16 = d16 if m is None else m.to(torch.float16).contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1)
    _pack4(u.contiguous().numpy().reshape(-1), d16, m16, m is not None, out.numpy().reshape(-1))
    return out
