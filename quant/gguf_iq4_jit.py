"""Compiled (numba) IQ4_NL and IQ4_XS quantizers: the same bytes as :mod:`quant.gguf_iq4`, faster.

One kernel does, per 32-block, the float32 operations of the torch port in the same order (and so those
of llama.cpp's ``quantize_row_iq4_nl_impl``): sums from ``0.0f`` left to right, ``np.rint`` for
``nearest_int``, divisions kept as divisions, ``np.sqrt`` on float32 (correctly rounded), no fused
multiply-adds (no ``fastmath``). The codebook look-up (:func:`quant.gguf_iq4.best_index`) compares with
the 15 midpoints: the code is how many are <= ``al``, and ``KVALUES[code]`` a sum of steps, which LLVM
vectorizes where a table look-up would be a gather (about 3x slower here). Where a NaN shows up (non-finite input, which the codec rejects first,
or ``x*x`` overflowing for |x| > 1.8e19) it follows the torch port: the largest magnitude is NaN once a
NaN is seen (torch's ``amax``/``amin``), a NaN maps to code 15, and a NaN scale is stored as 6-bit 0.

As the K-quant kernels (:mod:`quant.gguf_kquants_jit`), a tile of blocks is transposed element-major
(``[element, block]``) so that each step of a sequential sum is one pass over the blocks of the tile,
which LLVM vectorizes across blocks while every block keeps its own left-to-right order.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from quant.gguf_iq4 import KVALUES, MIDPOINTS, NTRY, QK4_NL, QK_K
from quant.jit import kernel
from quant.jit_fp16 import f16_bits, f16_round

TYPE_SIZE = {"IQ4_NL": 18, "IQ4_XS": 136}
_TILE = 128  # 32-blocks per tile: 16 IQ4_XS super-blocks
_MID = np.array(MIDPOINTS, np.float32)  # module-level arrays: numba compiles them in as constants
_STEP = np.diff(np.array(KVALUES, np.float32))


@kernel
def _code(al):  # noqa: ANN001,ANN201 - numba kernel
    """:func:`quant.gguf_iq4.best_index` of one float32: the number of midpoints <= ``al`` (NaN: 15)."""
    c = 0
    for k in range(15):
        if not al < _MID[k]:
            c += 1
    return c


@kernel
def _put_f16(out, o, h):  # noqa: ANN001,ANN201 - numba kernel
    """Store the fp16 value ``h`` (a float32 holding it) little-endian at ``out[o:o+2]``."""
    bits = f16_bits(h)
    out[o] = bits & 0xFF
    out[o + 1] = (bits >> 8) & 0xFF


@kernel
def _absmax_signed(v, first, n):  # noqa: ANN001,ANN201 - numba kernel
    """The first of ``v[first:first+n]`` of largest magnitude (NaN once one is seen, as the torch port's
    ``signed_absmax``); +0.0 when all are zero."""
    amax = np.float32(0)
    out = np.float32(0)
    for k in range(n):
        x = v[first + k]
        a = abs(x)
        if a > amax or a != a:
            amax = a
            out = x
    return out


@kernel
def _iq4_kernel(x, qw, use_qw, cols, xs, out):  # noqa: ANN001,ANN201,C901,PLR0912,PLR0915
    """IQ4_NL (``xs`` False) / IQ4_XS bytes of ``x`` (float32, whole rows of ``cols`` flattened) into
    ``out`` (uint8); ``qw``: per-column importances when ``use_qw``."""
    NB = _TILE
    nb_all = x.size // 32
    nb_row = cols // 32
    f0 = np.float32(0)
    eps = np.float32(1e-15)
    v0 = np.float32(KVALUES[0])

    xt = np.empty(32 * NB, np.float32)  # [element, block]
    wt = np.empty(32 * NB, np.float32)
    mx = np.empty(NB, np.float32)
    isc = np.empty(NB, np.float32)
    sqx = np.empty(NB, np.float32)
    sq2 = np.empty(NB, np.float32)
    d = np.empty(NB, np.float32)
    best = np.empty(NB, np.float32)
    sig = np.empty(NB, np.float32)
    q = np.empty(32 * NB, np.uint8)  # codes, element-major

    for b0 in range(0, nb_all, NB):
        nb = min(NB, nb_all - b0)
        base = b0 * 32
        for b in range(nb):
            for i in range(32):
                xt[i * NB + b] = x[base + b * 32 + i]

        # ---- error weights: x², or qw·sqrtf(sigma2 + x²), sigma2 = Σx²·(2/n) over the (super-)block
        if use_qw:
            if xs:
                for s in range(nb // 8):
                    o = base + s * 256
                    acc = f0
                    for k in range(256):
                        v = x[o + k]
                        acc += v * v
                    acc *= np.float32(2.0 / 256)
                    for j in range(8):
                        sig[8 * s + j] = acc
            else:
                for b in range(nb):
                    sig[b] = f0
                for i in range(32):
                    o = i * NB
                    for b in range(nb):
                        v = xt[o + b]
                        sig[b] += v * v
                for b in range(nb):
                    sig[b] *= np.float32(2.0 / 32)
            for b in range(nb):
                col0 = ((b0 + b) % nb_row) * 32
                s2 = sig[b]
                for i in range(32):
                    v = xt[i * NB + b]
                    wt[i * NB + b] = qw[col0 + i] * np.sqrt(s2 + v * v)
        else:
            for i in range(32 * NB):
                v = xt[i]
                wt[i] = v * v

        # ---- scale search: 1/(max/127), then (itry - 127)/max for itry in [-7, 7]
        for b in range(nb):  # max: the first element of largest magnitude, NaN once a NaN is seen
            best[b] = f0  # |max| so far
            mx[b] = f0
        for i in range(32):
            o = i * NB
            for b in range(nb):
                v = xt[o + b]
                a = abs(v)
                big = a > best[b] or a != a
                best[b] = a if big else best[b]
                mx[b] = v if big else mx[b]
        for b in range(nb):
            isc[b] = np.float32(1) / (-mx[b] / v0)
        for c in range(2 * NTRY + 2):
            if c > 0:
                num = np.float32(c - 1 - NTRY) + v0
                for b in range(nb):
                    isc[b] = num / mx[b]
            for b in range(nb):
                sqx[b] = f0
                sq2[b] = f0
            for i in range(32):
                o = i * NB
                for b in range(nb):
                    v = xt[o + b]
                    al = isc[b] * v
                    qv = v0  # KVALUES[best_index(al)] as a sum of steps: no table look-up, so it vectorizes
                    for k in range(15):
                        qv += f0 if al < _MID[k] else _STEP[k]
                    wq = wt[o + b] * qv
                    sqx[b] += wq * v
                    sq2[b] += wq * qv
            if c == 0:
                for b in range(nb):
                    dd = sqx[b] / sq2[b] if sq2[b] > f0 else f0
                    d[b] = dd
                    best[b] = dd * sqx[b]
            else:
                for b in range(nb):
                    if sq2[b] > f0 and sqx[b] * sqx[b] > best[b] * sq2[b]:
                        dd = sqx[b] / sq2[b]
                        d[b] = dd
                        best[b] = dd * sqx[b]
        for b in range(nb):
            if abs(mx[b]) < eps:
                d[b] = f0

        # ---- the inverse scale each block's codes are taken with (IQ4_XS: its 6-bit scales, packed here)
        if xs:
            for s in range(nb // 8):
                o = (b0 // 8 + s) * 136
                ms = _absmax_signed(d, 8 * s, 8)
                dsup = -ms / np.float32(32)
                idsup = np.float32(1) / dsup if dsup != f0 else f0
                sh = 0
                for j in range(8):
                    l = np.rint(idsup * d[8 * s + j])
                    if l < np.float32(-32):
                        l = np.float32(-32)
                    if l > np.float32(31):
                        l = np.float32(31)
                    dl = dsup * l
                    isc[8 * s + j] = np.float32(1) / dl if dl != f0 else f0
                    ls = np.int64(l) + 32 if l == l else 0  # a NaN: 0, as the torch port's uint8 wrap
                    if j % 2 == 0:
                        out[o + 4 + j // 2] = ls & 15
                    else:
                        out[o + 4 + j // 2] |= (ls & 15) << 4
                    sh |= (ls >> 4) << (2 * j)
                _put_f16(out, o, f16_round(dsup))
                out[o + 2] = sh & 0xFF
                out[o + 3] = (sh >> 8) & 0xFF
        else:
            for b in range(nb):
                dd = d[b]
                isc[b] = np.float32(1) / dd if dd != f0 else f0
                _put_f16(out, (b0 + b) * 18, f16_round(dd))

        # ---- codes: best_index(inverse scale * x), the number of midpoints <= it; then the nibbles
        for i in range(32):
            o = i * NB
            for b in range(nb):
                al = isc[b] * xt[o + b]
                c = 0
                for k in range(15):
                    c += 0 if al < _MID[k] else 1
                q[o + b] = c
        for b in range(nb):
            gb = b0 + b
            o = (gb // 8) * 136 + 8 + (gb % 8) * 16 if xs else gb * 18 + 2
            for i in range(16):
                out[o + i] = q[i * NB + b] | (q[(i + 16) * NB + b] << 4)


# ---- wrappers ------------------------------------------------------------------------------------


def _quantize(qtype: str, w: Tensor, quant_weights: Tensor | None) -> Tensor:
    block = QK_K if qtype == "IQ4_XS" else QK4_NL
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    if cols % block:
        raise ValueError(f"row length {cols} is not a multiple of the {qtype} block size {block}")
    x = w.detach().to(torch.float32).contiguous().reshape(-1).numpy()
    qw = np.zeros(1, np.float32)
    if quant_weights is not None:
        qw = quant_weights.detach().to(torch.float32).contiguous().reshape(-1).numpy()
        if qw.size != cols:
            raise ValueError(f"quant_weights has {qw.size} values for rows of {cols}")
    out = np.empty(rows * (cols // block) * TYPE_SIZE[qtype], np.uint8)
    if out.size:
        _iq4_kernel(x, qw, quant_weights is not None, cols, qtype == "IQ4_XS", out)
    return torch.from_numpy(out).reshape(rows, cols // block * TYPE_SIZE[qtype])


def quantize_iq4_nl(w: Tensor, quant_weights: Tensor | None = None) -> Tensor:
    """float ``[rows, cols]`` -> IQ4_NL bytes ``[rows, cols/32*18]``, as the torch port's."""
    return _quantize("IQ4_NL", w, quant_weights)


def quantize_iq4_xs(w: Tensor, quant_weights: Tensor | None = None) -> Tensor:
    """float ``[rows, cols]`` -> IQ4_XS bytes ``[rows, cols/256*136]``, as the torch port's."""
    return _quantize("IQ4_XS", w, quant_weights)
