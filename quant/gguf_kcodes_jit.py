"""Compiled (numba) reads of K-quant codes: the same integers as ``quant.gguf_kcodes``' torch code, in one pass.

In torch, taking a Q4_K/Q5_K/Q6_K tensor apart is a dozen whole-tensor temporaries (nibble ``cat``s, the 6-bit
scale bytes re-assembled on ``[…, 4]`` slices). These kernels read each block's bytes once and write the codes
``u`` (one a byte) and the sub-block scale integers (Q4_K/Q5_K: 6-bit ``sc`` and ``m``; Q6_K's int8 scales are
a plain view); the float32 products ``d·sc``, ``dmin·m`` stay in torch, so the arithmetic is the torch path's.
Layouts: ``quant/gguf_kquants.py``'s module docstring (``get_scale_min_k4`` of ggml-quants.c for the scales).
Serial, GIL released (:func:`quant.jit.kernel`); tests/test_transcode_kquants.py checks them against the torch
code on random blocks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from quant.jit import kernel


@kernel
def _q45(raw: np.ndarray, five: bool, u: np.ndarray, sc: np.ndarray, m: np.ndarray) -> None:
    ts = 176 if five else 144
    qs0 = 48 if five else 16
    for b in range(sc.shape[0]):
        o, e = b * ts, b * 256
        for j in range(8):  # get_scale_min_k4: bytes 4..15 of the block
            if j < 4:
                sc[b, j] = raw[o + 4 + j] & 63
                m[b, j] = raw[o + 8 + j] & 63
            else:
                sc[b, j] = (raw[o + 8 + j] & 0xF) | ((raw[o + j] >> 6) << 4)
                m[b, j] = (raw[o + 8 + j] >> 4) | ((raw[o + 4 + j] >> 6) << 4)
        for c in range(4):  # 64 codes a chunk: byte l holds code l (low nibble) and code l + 32 (high)
            for l in range(32):
                x = raw[o + qs0 + c * 32 + l]
                lo, hi = x & 0xF, x >> 4
                if five:  # bit k of qh[l] is bit 4 of code 32k + l
                    h = raw[o + 16 + l]
                    lo |= ((h >> (2 * c)) & 1) << 4
                    hi |= ((h >> (2 * c + 1)) & 1) << 4
                u[e + c * 64 + l] = lo
                u[e + c * 64 + 32 + l] = hi


@kernel
def _q6(raw: np.ndarray, u: np.ndarray) -> None:
    for b in range(u.size // 256):
        o, e = b * 210, b * 256
        for h in range(2):  # per 128-code half: ql[64h + i], qh[32h + l] (bits 4-5 of four codes)
            ql, qh, base = o + 64 * h, o + 128 + 32 * h, e + 128 * h
            for l in range(32):
                a, c, q = raw[ql + l], raw[ql + 32 + l], raw[qh + l]
                u[base + l] = (a & 0xF) | ((q & 3) << 4)
                u[base + 32 + l] = (c & 0xF) | (((q >> 2) & 3) << 4)
                u[base + 64 + l] = (a >> 4) | (((q >> 4) & 3) << 4)
                u[base + 96 + l] = (c >> 4) | (((q >> 6) & 3) << 4)


def q45_parts(raw: Tensor, five: bool, n_blocks: int) -> tuple[Tensor, Tensor, Tensor]:
    """Q4_K/Q5_K bytes → codes uint8 ``[n_blocks·256]``, ``sc`` and ``m`` uint8 ``[n_blocks, 8]``."""
    u = np.empty(n_blocks * 256, dtype=np.uint8)
    sc, m = np.empty((n_blocks, 8), dtype=np.uint8), np.empty((n_blocks, 8), dtype=np.uint8)
    _q45(raw.contiguous().reshape(-1).numpy(), five, u, sc, m)
    return torch.from_numpy(u), torch.from_numpy(sc), torch.from_numpy(m)


def q6_codes(raw: Tensor, n_blocks: int) -> Tensor:
    """Q6_K bytes → codes uint8 ``[n_blocks·256]`` in [0, 63]."""
    u = np.empty(n_blocks * 256, dtype=np.uint8)
    _q6(raw.contiguous().reshape(-1).numpy(), u)
    return torch.from_numpy(u)
