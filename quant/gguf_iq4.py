"""GGUF IQ4_NL and IQ4_XS: llama.cpp's non-linear 4-bit quantizer, vectorized, and the dequantizers.

Layout contract (``ggml-common.h``; blocks along the contiguous row, little-endian):

* IQ4_NL (18 B per 32): ``fp16 d | u8 qs[16]``; ``x = d * KVALUES[q]``, ``qs[j] = q[j] | q[j+16] << 4``.
* IQ4_XS (136 B per 256): ``fp16 d | u16 scales_h | u8 scales_l[4] | u8 qs[128]``; eight 32-element
  sub-blocks j with a 6-bit ``ls_j``: ``x = (d * (ls_j - 32)) * KVALUES[q]``. The low nibble of ``ls_j`` is
  nibble ``j % 2`` of ``scales_l[j // 2]``, its top two bits are bits ``2j, 2j+1`` of ``scales_h``; ``qs``
  holds sub-block j in bytes ``16j .. 16j+15``, nibbles as IQ4_NL.

Both quantizers follow ``quantize_iq4_nl`` / ``quantize_iq4_xs`` of ggml-quants.c, which always run
``quantize_row_iq4_nl_impl`` with ``ntry = 7`` (the ``_ref`` row functions are not what llama-quantize calls):

1. error weights ``x²``, or with an imatrix ``qw_j * sqrtf(sigma2 + x_j²)``, ``sigma2 = 2·Σx²/n`` over
   the block (IQ4_NL, n = 32) or super-block (IQ4_XS, n = 256);
2. per 32-block with ``amax >= 1e-15`` (``max`` = the first element of largest magnitude): codes for
   ``id = 1/(max/127)``, then for ``id = (itry - 127)/max``, itry in [-7, 7]; each maps ``id·x`` to the
   nearest codebook entry (:func:`best_index`) and gives the weighted least-squares scale
   ``sumqx/sumq2``; the candidate with the largest ``sumqx²/sumq2`` wins (the first one on ties);
3. IQ4_NL stores that scale as fp16 and re-maps ``x / scale`` (the float32 scale, not the fp16 one);
   IQ4_XS sets ``d = -max_scale/32`` (the first block scale of largest magnitude), ``ls_j =
   clamp(nearest_int(scale_j/d), -32, 31) + 32`` and re-maps ``x / (d·(ls_j-32))``, again with the
   float32 ``d``; a zero scale maps every element to code 8 (``KVALUES[8] = 1``).

Arithmetic as in C, in float32: sums run left to right from ``0.0f``, ``nearest_int`` rounds half to
even, divisions stay divisions, ``sqrtf`` is correctly rounded, no fused multiply-adds. Per-element data
are element-major (``[32, blocks]``) so that each sequential add works on all blocks at once.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor

from quant.gguf_kquants import GROUP_MAX_EPS, div, seq_sum, sqrt_f32, to_uint8_wrap
from quant.gguf_legacy import (
    f16_bytes,
    f16_from_bytes,
    pack_nibbles,
    signed_absmax,
    split_bytes,
    unpack_nibbles,
)

QK4_NL, QK_K = 32, 256
NTRY = 7
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
"""ggml ``kvalues_iq4nl``: the codebook, ascending."""
MIDPOINTS = tuple((a + b) / 2 for a, b in pairwise(KVALUES))
"""The 15 points where :func:`best_index` moves to the next code (multiples of 1/2, exact in float32)."""
HALF_LO, HALF_HI = -232, 203
"""The range of ``floor(2·al)`` over which the code changes (``2·MIDPOINTS`` runs from -231 to 202)."""


def _values() -> Tensor:
    """The codebook as float32 [16] (made per call: no torch work at import, which would start torch's thread
    pool in every process that imports the registry, fork-based runners included)."""
    return torch.tensor(KVALUES, dtype=torch.float32)


def _code_of_half() -> Tensor:
    """int64 [436]: the code of every ``floor(2·al)`` in [HALF_LO, HALF_HI]."""
    return torch.searchsorted(2 * torch.tensor(MIDPOINTS), torch.arange(HALF_LO, HALF_HI + 1.0), right=True)


def _half_index(al: Tensor) -> Tensor:
    """``floor(2·al)`` clamped to [HALF_LO, HALF_HI] (NaN: HALF_HI), minus HALF_LO: int64, flattened."""
    h = (al * 2).clamp_(HALF_LO, HALF_HI).nan_to_num_(HALF_HI).floor_()
    return h.to(torch.int64).sub_(HALF_LO).reshape(-1)


def best_index(al: Tensor) -> Tensor:
    """ggml ``best_index_int8(16, kvalues_iq4nl, al)`` elementwise: float32 ``[...]`` -> int64 codes.

    C returns 0 for ``al <= -127``, 15 for ``al >= 113``, else bisects to the bracketing pair (lo, hi)
    and takes lo iff ``al - lo < hi - al`` in float32. For these integer codes both differences are
    exact at the midpoint m and at its float32 neighbours (their ulp is no larger than m's), and they
    are monotone in ``al``, so the code is hi exactly when ``al >= m``: the code is the number of
    midpoints <= al. Every midpoint is a multiple of 1/2, so that count depends only on ``floor(2·al)``
    (``2·al`` is exact): a 436-entry table gives it. A NaN gives 15, as in C, where every comparison
    fails. tests/test_gguf_iq4.py checks this against the C expression.
    """
    return torch.index_select(_code_of_half(), 0, _half_index(al)).reshape(al.shape)


def codebook_value(al: Tensor) -> Tensor:
    """``KVALUES[best_index(al)]`` as float32, in one table lookup."""
    return torch.index_select(_values()[_code_of_half()], 0, _half_index(al)).reshape(al.shape)


def _sums(x: Tensor, w: Tensor, iscale: Tensor) -> tuple[Tensor, Tensor]:
    """``sumqx = Σ (w·q)·x``, ``sumq2 = Σ (w·q)·q`` from ``0.0f``, with ``q = codebook_value(iscale·x)``.

    ``x``, ``w``: ``[32, B]``; ``iscale``: ``[B]``. (``seq_sum`` starts from the first term, C from +0.0:
    the two differ only where ``seq_sum`` gives -0.0, which ``+ 0.0`` turns into C's +0.0.)
    """
    q = codebook_value(iscale * x)  # [32, B]
    wq = w * q
    return seq_sum(wq * x).add_(0.0), seq_sum(wq.mul_(q)).add_(0.0)


def block_scales(x: Tensor, w: Tensor) -> Tensor:
    """Float32 scale per 32-block: the search of ``quantize_row_iq4_nl_impl`` (``ntry = 7``).

    ``x``, ``w``: element-major float32 ``[32, B]`` (values and error weights). Returns ``[B]``; 0 where
    ``amax < 1e-15`` or no candidate has ``sumq2 > 0``.
    """
    mx = signed_absmax(x, 0)  # [B]: the first element of largest magnitude
    sumqx, sumq2 = _sums(x, w, div(1.0, -mx / KVALUES[0]))
    d = torch.where(sumq2 > 0, sumqx / sumq2, torch.zeros_like(sumqx))
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        sumqx, sumq2 = _sums(x, w, div(float(itry + KVALUES[0]), mx))
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / sumq2, d)
        best = torch.where(better, d * sumqx, best)
    return torch.where(mx.abs() < GROUP_MAX_EPS, torch.zeros_like(d), d)


def _inverse(d: Tensor) -> Tensor:
    """``d ? 1/d : 0.f`` elementwise (a true float32 division)."""
    return torch.where(d != 0, div(1.0, d), torch.zeros_like(d))


def _element_major(x: Tensor) -> Tensor:
    """``[rows, cols]`` -> ``[32, rows·cols/32]``: one column per 32-block, in row order."""
    return x.reshape(-1, QK4_NL).T.contiguous()


def _error_weights(x: Tensor, quant_weights: Tensor | None, super_block: int) -> Tensor:
    """Element-major weights ``[32, B]`` of float32 ``x [rows, cols]``: ``x²``, or with per-column
    ``quant_weights [cols]`` ``qw_j·sqrtf(sigma2 + x_j²)``, ``sigma2 = Σx²·(2/n)`` per ``n``-element
    super-block."""
    xt = _element_major(x)
    if quant_weights is None:
        return xt * xt
    flat = x.reshape(-1, super_block).T.contiguous()  # [n, S]
    sigma2 = seq_sum(flat * flat).mul_(2.0 / super_block)  # [S]; C: sigma2 *= 2.f/n (a power of two)
    sigma2 = sigma2.repeat_interleave(super_block // QK4_NL)  # [B]
    qw = quant_weights.to(torch.float32).reshape(-1, QK4_NL).T.repeat(1, x.shape[0])  # [32, B]
    return qw * sqrt_f32(xt * xt + sigma2)


def _check_cols(cols: int, block: int, name: str) -> None:
    if cols % block:
        raise ValueError(f"row length {cols} is not a multiple of the {name} block size {block}")


# ---- IQ4_NL ----------------------------------------------------------------------------------


def choose_iq4_nl(w: Tensor, quant_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """float ``[rows, cols]`` -> (d fp16 ``[rows, nb]``, codes uint8 ``[rows, nb, 32]`` in [0, 15])."""
    x = w.to(torch.float32)
    rows, cols = x.shape
    _check_cols(cols, QK4_NL, "IQ4_NL")
    xt = _element_major(x)  # [32, B]
    d = block_scales(xt, _error_weights(x, quant_weights, QK4_NL))  # [B]
    q = best_index(_inverse(d) * xt).to(torch.uint8)  # [32, B]
    return d.to(torch.float16).reshape(rows, -1), q.T.reshape(rows, -1, QK4_NL)


def pack_iq4_nl(d: Tensor, q: Tensor) -> Tensor:
    """d ``[R, nb]``, q in [0, 15] ``[R, nb, 32]`` -> uint8 ``[R, nb*18]``."""
    out = torch.cat([f16_bytes(d), pack_nibbles(q.to(torch.uint8))], dim=-1)
    return out.reshape(out.shape[0], -1)


def dequantize_iq4_nl(raw: Tensor) -> Tensor:
    """uint8 ``[rows, nb*18]`` -> float32 ``[rows, nb*32]``: ``x = d * KVALUES[q]``."""
    d, qs = split_bytes(raw, 18, [2, 16])
    x = f16_from_bytes(d).unsqueeze(-1) * _values()[unpack_nibbles(qs).long()]  # [R, nb, 32]
    return x.reshape(x.shape[0], -1)


def quantize_iq4_nl(w: Tensor, quant_weights: Tensor | None = None) -> Tensor:
    """float ``[rows, cols]`` -> IQ4_NL bytes (``quantize_iq4_nl``, with or without an imatrix)."""
    return pack_iq4_nl(*choose_iq4_nl(w, quant_weights))


# ---- IQ4_XS ----------------------------------------------------------------------------------


def choose_iq4_xs(w: Tensor, quant_weights: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """float ``[rows, cols]`` -> (d fp16 ``[rows, nsb]``, ``ls`` uint8 ``[rows, nsb, 8]`` in [0, 63],
    codes uint8 ``[rows, nsb, 256]`` in [0, 15]); ``x ~ d*(ls_j-32)*KVALUES[q]``."""
    x = w.to(torch.float32)
    rows, cols = x.shape
    _check_cols(cols, QK_K, "IQ4_XS")
    xt = _element_major(x)  # [32, B], B = 8*S
    scales = block_scales(xt, _error_weights(x, quant_weights, QK_K)).reshape(-1, 8)  # [S, 8]
    max_scale = signed_absmax(scales, -1)  # [S]
    max_scale = torch.where(max_scale != 0, max_scale, torch.zeros_like(max_scale))  # C starts from +0.0
    d = -max_scale / 32  # [S]; -0.0 for an all-zero super-block, as in C
    ls = torch.round(_inverse(d).unsqueeze(-1) * scales).clamp_(-32, 31)  # [S, 8], nearest_int
    inv = _inverse(d.unsqueeze(-1) * ls).reshape(-1)  # [B]
    q = best_index(inv * xt).to(torch.uint8)  # [32, B]
    shape = (rows, cols // QK_K)
    ls = to_uint8_wrap(ls + 32)  # C's int -> uint8_t (a NaN scale, from x² overflowing, gives 0)
    return d.to(torch.float16).reshape(shape), ls.reshape(*shape, 8), q.T.reshape(*shape, QK_K)


def pack_iq4_xs(d: Tensor, ls: Tensor, q: Tensor) -> Tensor:
    """d ``[R, nsb]``, ls in [0, 63] ``[R, nsb, 8]``, q ``[R, nsb, 256]`` -> uint8 ``[R, nsb*136]``."""
    ls = ls.to(torch.int32)
    scales_l = (ls[..., 0::2] & 15) | ((ls[..., 1::2] & 15) << 4)  # [R, nsb, 4]
    scales_h = ((ls >> 4) << torch.arange(0, 16, 2, dtype=torch.int32)).sum(-1, keepdim=True)  # [R, nsb, 1]
    scales_h = torch.cat([scales_h & 0xFF, scales_h >> 8], dim=-1)  # little-endian u16
    qs = pack_nibbles(q.to(torch.uint8).reshape(*q.shape[:-1], 8, 32)).flatten(-2)  # [R, nsb, 128]
    out = torch.cat([f16_bytes(d), scales_h.to(torch.uint8), scales_l.to(torch.uint8), qs], dim=-1)
    return out.reshape(out.shape[0], -1)


def dequantize_iq4_xs(raw: Tensor) -> Tensor:
    """uint8 ``[rows, nsb*136]`` -> float32 ``[rows, nsb*256]``: ``x = (d*(ls_j-32)) * KVALUES[q]``."""
    d, scales_h, scales_l, qs = split_bytes(raw, 136, [2, 2, 4, 128])
    high = scales_h.to(torch.int32)
    high = (high[..., :1] | (high[..., 1:] << 8)) >> torch.arange(0, 16, 2, dtype=torch.int32)  # [R, nsb, 8]
    low = unpack_nibbles(scales_l.unsqueeze(-1)).flatten(-2)  # [R, nsb, 8]: (lo0, hi0), (lo1, hi1), ...
    ls = low.to(torch.int32) | ((high & 3) << 4)
    dl = f16_from_bytes(d).unsqueeze(-1) * (ls - 32).to(torch.float32)  # [R, nsb, 8]
    codes = unpack_nibbles(qs.reshape(*qs.shape[:-1], 8, 16)).long()  # [R, nsb, 8, 32]
    x = dl.unsqueeze(-1) * _values()[codes]
    return x.reshape(x.shape[0], -1)


def quantize_iq4_xs(w: Tensor, quant_weights: Tensor | None = None) -> Tensor:
    """float ``[rows, cols]`` -> IQ4_XS bytes (``quantize_iq4_xs``, with or without an imatrix)."""
    return pack_iq4_xs(*choose_iq4_xs(w, quant_weights))
