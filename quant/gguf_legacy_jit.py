"""Compiled (numba) Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 quantizers: the same bytes as :mod:`quant.gguf_legacy`.

Each kernel does, per 32-element block, the float32 operations of the torch port (``choose_*`` in
:mod:`quant.gguf_legacy`; for the imatrix variants ``make_qx_quants`` / ``make_qkx2_quants`` of
:mod:`quant.gguf_kquants` as :mod:`quant.gguf_imatrix` calls them) in the same order: ``d = amax/127``
(Q8_0), ``signed_absmax/-8`` (Q4_0), ``(max-min)/15`` (Q4_1), ...; codes from the float32 ``id = 1/d`` of
the *unrounded* scale, ``roundf`` as ``x + copysign(0.49999997f, x)`` truncated (Q8_0) and
``(int)(x*id + offset)`` clamped to the top code (the others); only the stored scales are rounded to fp16
(:func:`_f16_bits`). Sequential sums start from their first term as ``seq_sum`` does, ``np.rint`` is
``nearest_int`` (half to even), ``np.sqrt`` on float32 is correctly rounded; every float constant is a
``np.float32`` and nothing is fused or reordered (no ``fastmath``).

Speed (one thread, 9216x2304 float32, AMD EPYC znver4 with AVX-512; torch port ~150-300 M params/s, gguf-py
~90-210): Q8_0 ~1200, Q4_0 ~1000, Q5_0 ~900, Q4_1 ~800, Q5_1 ~750 M params/s; imatrix Q4_0 ~110, Q4_1 ~40
(torch ~7 / ~4). On an AVX2-only znver1: Q8_0 ~720 (from bfloat16 ~600, ~270 before its rewrite), Q4_0 ~190,
Q5_0 / Q4_1 / Q5_1 ~150 — those four still pay numba's int64 widening (see :func:`_q8_0_kernel`). How: the per-block max / min are integer reductions over the float bits (``|x|`` bits for Q8_0,
the order-preserving key ``b ^ ((b >> 31) & 0x7fffffff)`` for a signed max and min), which vectorize where
a float max without ``nnan`` stays a serial chain; the per-block loops run to a block length ``qk`` passed
at run time (always 32) — with a constant trip count LLVM unrolls them into scalar code, as numba leaves
its SLP vectorizer off, while the loop vectorizer turns run-time loops into SIMD; normal-range fp16
scales are rounded with integer ops. The imatrix searches run on tiles of blocks transposed
element-major, so each step of a block's sequential sum is one SIMD pass across the tile's blocks.

Where the torch port's bytes hang on what a per-block loop cannot reproduce with certainty — a NaN's sign
or payload, torch's float -> int conversion of NaN/inf (blocks with NaN/inf, or a ``1/d`` that overflows
in a block of subnormals), or which of ``+0.0`` / ``-0.0`` torch's vectorized ``amax``/``amin`` returns
when a block's extreme is a zero present with both signs — the kernel still writes its own result for the
block (a non-finite fp16 scale wherever the block has a NaN/inf, so the codec's scale check catches it)
and marks the row; the wrapper then returns the torch function's result for the whole input instead.
Ordinary weights never take that path; a finite block whose scale overflows fp16 is not marked (its
scale is inf, as torch's).

Kernels are serial and release the GIL (:func:`quant.jit.kernel`): one call quantizes a run of whole rows;
callers run chunks of rows on threads. Arguments: ``x`` / ``xb`` the flat float32 input and its int32 view,
``nb`` blocks a row, ``qk`` = 32, ``out`` the flat uint8 output, ``flags[r] = 1`` marks row r.

Each kernel writes its own block loop, preamble included, instead of sharing helper kernels that take the
scratch arrays: through a call LLVM loses the no-alias facts about them and stops vectorizing (measured on
the K-quant kernels: 5x slower).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from quant import gguf_imatrix as im
from quant import gguf_legacy as lg
from quant import jit
from quant.jit import kernel
from quant.jit_fp16 import f16_bits, f16_round, f32_bits_of, f32_from_bits, f32_to_bits

QK = 32

_ABS_MASK = 0x7FFFFFFF
_INF_BITS = 0x7F800000  # |x| bits: > this is NaN, == this is inf
_KEY_NEG_INF = -2139095041  # order key of -inf (0xff800000 ^ 0x7fffffff as int32); below it: -NaN
_KEY_NEG_ZERO = -1  # order key of -0.0 (+0.0 has key 0)
_NEG_ZERO_BITS = -2147483648  # 0x80000000 as int32
_HALF_BELOW = np.nextafter(np.float32(0.5), np.float32(0))  # 0.49999997f
_GROUP_MAX_EPS = np.float32(1e-15)

# make_qx_quants (Q4_0 imatrix, nmax 8) iscale numerators: -nmax, then -(nmax + 0.1f*is), is = -9..9, is != 0
_QX_NUMERATORS = np.array(
    [np.float32(-8.0)] + [-(np.float32(8) + np.float32(0.1) * np.float32(s)) for s in range(-9, 10) if s != 0],
    dtype=np.float32,
)
# make_qkx2_quants (Q4_1 imatrix: nmax 15, rmin -0.9, rdelta 0.05, nstep 36) grid: rmin + rdelta*is + nmax
_QKX_GRID = np.array(
    [np.float32(-0.9) + np.float32(0.05) * np.float32(s) + np.float32(15) for s in range(37)], dtype=np.float32
)


# ---- scalar helpers ----------------------------------------------------------------------------------


@kernel
def _cvt_i8(v):  # noqa: ANN001,ANN201 - numba kernel
    """torch's float32 -> int8 (x86 ``cvttss2si``, then the low byte): truncation toward zero, modulo 256,
    and 0 for NaN, inf and |v| >= 2**31."""
    f = float(v)
    if not (f > -2147483648.0 and f < 2147483648.0):
        return 0
    q = np.int64(f) & 0xFF
    return q - 256 if q >= 128 else q


@kernel
def _bits_to_f32(bits, si, sf):  # noqa: ANN001,ANN201 - numba kernel
    """The float32 with IEEE bits ``bits``, through a one-element int32 array ``si`` and its float32 view ``sf``."""
    si[0] = bits
    return sf[0]


@kernel
def _f16_bits(v, si, sf):  # noqa: ANN001,ANN201 - numba kernel
    """IEEE half bits of float32 ``v`` rounded to the nearest fp16 value (ties to even).

    Where the result is a normal half (``2**-14 <= |v| < 65520``) it is the float32 bits re-biased and
    rounded at bit 13 (``+ 0xfff + lsb``; equal to numpy's ``astype(float16)`` on every float32 of that
    range, both signs — checked exhaustively); zeros, subnormal halves, overflow to inf and NaN go
    through :func:`quant.jit_fp16.f16_round` / :func:`quant.jit_fp16.f16_bits`.
    """
    sf[0] = v
    b = si[0]
    if _is_normal_half(b):
        return _normal_half_bits(b)
    return f16_bits(f16_round(v))


@kernel
def _is_normal_half(b):  # noqa: ANN001,ANN201 - numba kernel
    """Whether the float32 with bits ``b`` (int32) rounds to a normal fp16 value (``2**-14 <= |v| < 65520``)."""
    a = b & np.int32(_ABS_MASK)
    return (a >= 0x38800000) & (a < 0x477FF000)


@kernel
def _normal_half_bits(b):  # noqa: ANN001,ANN201 - numba kernel
    """fp16 bits of the float32 with bits ``b`` (int32) where :func:`_is_normal_half`: re-biased, rounded at bit 13."""
    a = b & np.int32(_ABS_MASK)
    return np.int32(((b >> 16) & 0x8000) | (((a - 0x38000000) + 0xFFF + ((a >> 13) & 1)) >> 13))


@kernel
def _put_f16(out, p, v, si, sf):  # noqa: ANN001,ANN201 - numba kernel
    """Round float32 ``v`` to fp16 and store it little-endian at ``out[p:p+2]``."""
    bits = _f16_bits(v, si, sf)
    out[p] = bits & 0xFF
    out[p + 1] = (bits >> 8) & 0xFF


@kernel
def _key_to_f32(k, si, sf):  # noqa: ANN001,ANN201 - numba kernel
    """Inverse of the order key ``b ^ ((b >> 31) & 0x7fffffff)`` (the map is an involution), as float32."""
    k = np.int64(k)
    return _bits_to_f32(k ^ ((k >> 31) & _ABS_MASK), si, sf)


@kernel
def _max_min_keys(xbs, qk):  # noqa: ANN001,ANN201 - numba kernel
    """Order keys of the max and the min of a block given as its float32 bits ``xbs`` (int32).

    The key ``b ^ ((b >> 31) & 0x7fffffff)`` is monotonic in the float value with ``-0.0 < +0.0``;
    NaNs land above +inf (sign bit clear) or below -inf (sign bit set).
    """
    kmax = np.int32(-2147483648)
    kmin = np.int32(2147483647)
    for j in range(qk):
        v = xbs[j]
        k = v ^ ((v >> np.int32(31)) & np.int32(_ABS_MASK))
        kmax = max(kmax, k)
        kmin = min(kmin, k)
    return kmax, kmin


@kernel
def _has_bits(xbs, qk, bits):  # noqa: ANN001,ANN201 - numba kernel
    """Whether some element of the block ``xbs`` (float32 bits as int32) has exactly the bits ``bits``."""
    for j in range(qk):
        if xbs[j] == bits:
            return True
    return False


@kernel
def _nonfinite_keys(kmax, kmin):  # noqa: ANN001,ANN201 - numba kernel
    """Whether the block with these max/min keys holds a NaN or an inf."""
    return kmax >= _INF_BITS or kmin <= _KEY_NEG_INF


@kernel
def _zero_extreme_both_signs(xbs, qk, kmax, kmin):  # noqa: ANN001,ANN201 - numba kernel
    """Whether the block's max or min is a zero while both +0.0 and -0.0 occur (torch's pick is open)."""
    if kmin == _KEY_NEG_ZERO and _has_bits(xbs, qk, 0):  # min is -0.0 and a +0.0 is there
        return True
    return kmax == 0 and _has_bits(xbs, qk, _NEG_ZERO_BITS)  # max is +0.0 and a -0.0 is there


@kernel
def _torch_max_min(kmax, kmin, si, sf):  # noqa: ANN001,ANN201 - numba kernel
    """The block max and min as torch's ``amax``/``amin`` give them: both the canonical NaN if a NaN is there."""
    if kmax > _INF_BITS or kmin < _KEY_NEG_INF:
        nan = np.float32(np.nan)
        return nan, nan
    return _key_to_f32(kmax, si, sf), _key_to_f32(kmin, si, sf)


@kernel
def _signed_absmax(xs, qk, mx, mn):  # noqa: ANN001,ANN201 - numba kernel
    """:func:`quant.gguf_legacy.signed_absmax` of the block ``xs`` from its max and min.

    ``mx if mx >= -mn else mn``; where a nonzero ``mx == -mn`` ties, the first element of that magnitude.
    """
    if mx == -mn and mx != 0:
        for j in range(qk):
            if abs(xs[j]) == mx:
                return xs[j]
    return mx if mx >= -mn else mn


@kernel
def _safe_inverse(d):  # noqa: ANN001,ANN201 - numba kernel
    """``d ? 1.0f/d : 0.0f`` in float32."""
    return np.float32(1) / d if d != 0 else np.float32(0)


@kernel
def _is_finite(v):  # noqa: ANN001,ANN201 - numba kernel
    return abs(v) < np.float32(np.inf)


# ---- Q8_0 --------------------------------------------------------------------------------------------


@kernel
def _q8_0_kernel(xb, nb, qk, out, flags):  # noqa: ANN001,ANN201 - numba kernel
    """Q8_0: ``d = amax/127``, ``q = (int8)(x*id + copysign(0.49999997f, x*id))`` (C ``roundf``).

    ``xb``: the input's bits, float32 as int32, or bfloat16 as uint16 (:func:`quant.jit_fp16.f32_bits_of`),
    so a bfloat16 input is read as it is, without a float32 copy.

    Written for what LLVM vectorizes on AVX2 as on AVX-512 (3x faster than per-block helpers on AVX2):
    elements are indexed directly (a slice per block costs reference-count calls), the ``|x|`` bits stay
    int32 (numba widens ``int32 & int32`` to int64, and AVX2 has no 64-bit max: a compare-and-blend
    chain), bits become floats by a bit cast (not through an array), the bfloat16 shift is a constant
    (a run-time shift count costs a third), and the scales of a row are rounded to fp16 in a separate,
    call-free pass (the rare scale outside the normal fp16 range is redone after it).
    """
    dsc = np.empty(max(nb, 1), np.float32)  # the row's scales
    hs = np.empty(max(nb, 1), np.int32)  # ... as fp16 bits
    half = np.float32(_HALF_BELOW)
    neg_half = -half
    for r in range(flags.shape[0]):
        for b in range(nb):
            o = (r * nb + b) * QK
            p = (r * nb + b) * 34 + 2
            m = np.int32(0)
            for j in range(qk):
                m = max(m, np.int32(f32_bits_of(xb[o + j]) & _ABS_MASK))
            amax = np.float32(np.nan) if m > _INF_BITS else f32_from_bits(m)  # torch: the canonical NaN
            d = amax / np.float32(127)
            idf = np.float32(1) / d if d != 0 else np.float32(0)
            dsc[b] = d
            if m < _INF_BITS and abs(idf) < np.float32(np.inf):
                for j in range(qk):
                    v = f32_from_bits(f32_bits_of(xb[o + j])) * idf
                    out[p + j] = np.int32(v + (half if v >= 0 else neg_half))
            else:  # NaN/inf in the block, or 1/d overflowed (a block of subnormals): torch's conversions
                flags[r] = 1
                for j in range(qk):
                    v = f32_from_bits(f32_bits_of(xb[o + j])) * idf
                    out[p + j] = _cvt_i8(v + (half if v >= 0 else neg_half)) & 0xFF
        normal = True  # every scale is a normal half (not zero, subnormal, overflow, NaN)
        for b in range(nb):  # normal halves as _f16_bits rounds them
            db = f32_to_bits(dsc[b])
            hs[b] = _normal_half_bits(db)
            normal &= _is_normal_half(db)
        if not normal:
            for b in range(nb):
                if not _is_normal_half(f32_to_bits(dsc[b])):
                    hs[b] = f16_bits(f16_round(dsc[b]))
        for b in range(nb):
            p = (r * nb + b) * 34
            out[p] = hs[b] & 0xFF
            out[p + 1] = (hs[b] >> 8) & 0xFF


# ---- Q4_0 / Q5_0 -------------------------------------------------------------------------------------


@kernel
def _symmetric_kernel(x, xb, nb, qk, half_levels, five, out, flags):  # noqa: ANN001,ANN201,PLR0913,PLR0912,C901 - numba kernel
    """Q4_0 (``half_levels`` 8) / Q5_0 (16, ``five``): ``d = signed_absmax/-half``,
    ``q = min(2*half - 1, (int)(x*id + half + 0.5))``."""
    si = np.empty(1, np.int32)
    sf = si.view(np.float32)
    size = 22 if five else 18
    qs_at = 6 if five else 2
    neg_half = np.float32(-half_levels)
    offset = np.float32(half_levels) + np.float32(0.5)
    top = np.int32(2 * half_levels - 1)
    hq = qk // 2
    for r in range(flags.shape[0]):
        for b in range(nb):
            o = (r * nb + b) * QK
            p = (r * nb + b) * size
            xs = x[o:o + QK]
            xbs = xb[o:o + QK]
            qs = out[p + qs_at:p + qs_at + QK // 2]
            kmax, kmin = _max_min_keys(xbs, qk)
            mx, mn = _torch_max_min(kmax, kmin, si, sf)
            if kmax == 0 and kmin == _KEY_NEG_ZERO:  # all zeros of both signs: torch's amax gives d's sign
                flags[r] = 1
            d = _signed_absmax(xs, qk, mx, mn) / neg_half
            idf = _safe_inverse(d)
            _put_f16(out, p, d, si, sf)
            qh = np.int64(0)
            if not _nonfinite_keys(kmax, kmin) and _is_finite(idf):
                if five:
                    for j in range(hq):
                        lo = min(np.int32(xs[j] * idf + offset), top)
                        hi = min(np.int32(xs[j + hq] * idf + offset), top)
                        qs[j] = (lo & 15) | ((hi & 15) << 4)
                        qh |= (np.int64((lo >> 4) & 1) << j) | (np.int64((hi >> 4) & 1) << (j + hq))
                else:
                    for j in range(hq):
                        lo = min(np.int32(xs[j] * idf + offset), top)
                        hi = min(np.int32(xs[j + hq] * idf + offset), top)
                        qs[j] = lo | (hi << 4)
            else:  # NaN/inf in the block, or 1/d overflowed: torch's conversions, clamp, uint8 view
                flags[r] = 1
                for j in range(hq):
                    lo = min(_cvt_i8(xs[j] * idf + offset), top) & 0xFF
                    hi = min(_cvt_i8(xs[j + hq] * idf + offset), top) & 0xFF
                    qs[j] = (lo & 15) | ((hi & 15) << 4)
                    qh |= (np.int64((lo >> 4) & 1) << j) | (np.int64((hi >> 4) & 1) << (j + hq))
            if five:
                for k in range(4):
                    out[p + 2 + k] = (qh >> (8 * k)) & 0xFF


# ---- Q4_1 / Q5_1 -------------------------------------------------------------------------------------


@kernel
def _affine_kernel(x, xb, nb, qk, top, five, out, flags):  # noqa: ANN001,ANN201,PLR0913,PLR0912,C901 - numba kernel
    """Q4_1 (``top`` 15) / Q5_1 (31, ``five``): ``d = (max-min)/top``, ``m = min``,
    ``q = min(top, (int)((x-min)*id + 0.5))``."""
    si = np.empty(1, np.int32)
    sf = si.view(np.float32)
    size = 24 if five else 20
    qs_at = 8 if five else 4
    ftop = np.float32(top)
    itop = np.int32(top)
    rnd = np.float32(0.5)
    hq = qk // 2
    for r in range(flags.shape[0]):
        for b in range(nb):
            o = (r * nb + b) * QK
            p = (r * nb + b) * size
            xs = x[o:o + QK]
            xbs = xb[o:o + QK]
            qs = out[p + qs_at:p + qs_at + QK // 2]
            kmax, kmin = _max_min_keys(xbs, qk)
            mx, mn = _torch_max_min(kmax, kmin, si, sf)
            if kmin == _KEY_NEG_ZERO and _has_bits(xbs, qk, 0):  # min: a zero of both signs, m's sign open
                flags[r] = 1
            d = (mx - mn) / ftop
            idf = _safe_inverse(d)
            _put_f16(out, p, d, si, sf)
            _put_f16(out, p + 2, mn, si, sf)
            qh = np.int64(0)
            if not _nonfinite_keys(kmax, kmin) and _is_finite(d) and _is_finite(idf):
                if five:
                    for j in range(hq):
                        lo = min(np.int32((xs[j] - mn) * idf + rnd), itop)
                        hi = min(np.int32((xs[j + hq] - mn) * idf + rnd), itop)
                        qs[j] = (lo & 15) | ((hi & 15) << 4)
                        qh |= (np.int64((lo >> 4) & 1) << j) | (np.int64((hi >> 4) & 1) << (j + hq))
                else:
                    for j in range(hq):
                        lo = min(np.int32((xs[j] - mn) * idf + rnd), itop)
                        hi = min(np.int32((xs[j + hq] - mn) * idf + rnd), itop)
                        qs[j] = lo | (hi << 4)
            else:  # NaN/inf, max-min overflowed, or 1/d did: torch's conversions
                flags[r] = 1
                for j in range(hq):
                    lo = min(_cvt_i8((xs[j] - mn) * idf + rnd), itop) & 0xFF
                    hi = min(_cvt_i8((xs[j + hq] - mn) * idf + rnd), itop) & 0xFF
                    qs[j] = (lo & 15) | ((hi & 15) << 4)
                    qh |= (np.int64((lo >> 4) & 1) << j) | (np.int64((hi >> 4) & 1) << (j + hq))
            if five:
                for k in range(4):
                    out[p + 4 + k] = (qh >> (8 * k)) & 0xFF


# ---- imatrix: Q4_0 (make_qx_quants) and Q4_1 (make_qkx2_quants) ---------------------------------------
#
# The searches run on tiles of up to _TILE blocks of a row, transposed element-major (``xt[i*_TILE + t]``
# = element i of block t, as the torch port lays out the whole tensor): each step of a block's sequential
# sum is then one pass over the tile's blocks, which LLVM vectorizes while every block keeps its own
# left-to-right order. A candidate's levels are a function of (offset, iscale), so the best candidate is
# remembered by those two numbers and its levels recomputed once at the end.

_TILE = 64


@kernel
def _row_sigma2(xr, cols):  # noqa: ANN001,ANN201 - numba kernel
    """``seq_sum(x*x) / cols`` over the row ``xr`` (float32, left to right from the first term)."""
    s = xr[0] * xr[0]
    for j in range(1, cols):
        s += xr[j] * xr[j]
    return s / np.float32(cols)


@kernel
def _load_tile(x, o0, qws, n, qk, sigma2, xt, wt):  # noqa: ANN001,ANN201,PLR0913 - numba kernel
    """Transpose ``n`` blocks from ``x[o0:]`` into ``xt`` and their weights ``qw * sqrtf(sigma2 + x^2)`` into ``wt``."""
    for t in range(n):
        xs = x[o0 + t * QK:o0 + (t + 1) * QK]
        qs = qws[t * QK:(t + 1) * QK]
        for i in range(qk):
            v = xs[i]
            xt[i * _TILE + t] = v
            wt[i * _TILE + t] = qs[i] * np.sqrt(sigma2 + v * v)


@kernel
def _put_levels(qs, lv, t, hq):  # noqa: ANN001,ANN201 - numba kernel
    """Nibble-pack block ``t``'s float levels ``lv[i*_TILE + t]`` (torch's ``to(uint8)``: NaN -> 0, modulo
    256) into ``qs``; False if a level is not finite."""
    finite = True
    for j in range(hq):
        lo = lv[j * _TILE + t]
        hi = lv[(j + hq) * _TILE + t]
        qs[j] = (_cvt_i8(lo) & 15) | ((_cvt_i8(hi) & 15) << 4)
        finite = finite and _is_finite(lo) and _is_finite(hi)
    return finite


@kernel
def _qx_levels(xt, n, qk, isc, lv):  # noqa: ANN001,ANN201 - numba kernel
    """``lv = clamp(rint(iscale*x), -8, 7) + 8`` for the tile (the stored Q4_0 levels)."""
    lo = np.float32(-8)
    hi = np.float32(7)
    for i in range(qk):
        o = i * _TILE
        for t in range(n):
            v = np.rint(isc[t] * xt[o + t])
            if v < lo:
                v = lo
            elif v > hi:
                v = hi
            lv[o + t] = v + np.float32(8)


@kernel
def _q4_0_imatrix_kernel(x, xb, qw, nb, qk, numerators, out, flags):  # noqa: ANN001,ANN201,PLR0913,PLR0912,PLR0915,C901 - numba kernel
    """Q4_0 with an importance matrix: ``make_qx_quants(32, 8, x, weights)`` (rmse_type 1) per block, weights
    ``qw * sqrtf(sigma2 + x^2)``, ``sigma2 = sum(x^2)/cols`` per row."""
    si = np.empty(1, np.int32)
    sf = si.view(np.float32)
    xt = np.empty(QK * _TILE, np.float32)
    wt = np.empty(QK * _TILE, np.float32)
    wxt = np.empty(QK * _TILE, np.float32)
    lv = np.empty(QK * _TILE, np.float32)
    mxs = np.empty(_TILE, np.float32)
    isc = np.empty(_TILE, np.float32)
    best_isc = np.empty(_TILE, np.float32)
    sumlx = np.empty(_TILE, np.float32)
    suml2 = np.empty(_TILE, np.float32)
    scale = np.empty(_TILE, np.float32)
    best = np.empty(_TILE, np.float32)
    cols = nb * QK
    lo = np.float32(-8)
    hi = np.float32(7)
    zero = np.float32(0)
    for r in range(flags.shape[0]):
        sigma2 = _row_sigma2(x[r * cols:(r + 1) * cols], cols)
        for b0 in range(0, nb, _TILE):
            n = min(_TILE, nb - b0)
            o0 = r * cols + b0 * QK
            for t in range(n):
                o = o0 + t * QK
                kmax, kmin = _max_min_keys(xb[o:o + QK], qk)
                if _nonfinite_keys(kmax, kmin):
                    flags[r] = 1
                mx, mn = _torch_max_min(kmax, kmin, si, sf)
                mxs[t] = _signed_absmax(x[o:o + QK], qk, mx, mn)
            _load_tile(x, o0, qw[b0 * QK:], n, qk, sigma2, xt, wt)
            for k in range(qk * _TILE):
                wxt[k] = wt[k] * xt[k]
            for c in range(numerators.shape[0]):
                for t in range(n):
                    isc[t] = numerators[c] / mxs[t]
                for i in range(qk):  # levels clamp(rint(iscale*x), -8, 7); seq sums of (w*x)*l and (w*l)*l
                    o = i * _TILE
                    for t in range(n):
                        v = np.rint(isc[t] * xt[o + t])
                        if v < lo:
                            v = lo
                        elif v > hi:
                            v = hi
                        a = wxt[o + t] * v
                        q = (wt[o + t] * v) * v
                        if i == 0:
                            sumlx[t] = a
                            suml2[t] = q
                        else:
                            sumlx[t] += a
                            suml2[t] += q
                if c == 0:
                    for t in range(n):
                        s = sumlx[t] / suml2[t] if suml2[t] != 0 else zero
                        scale[t] = s
                        best[t] = s * sumlx[t]
                        best_isc[t] = isc[t]
                else:
                    for t in range(n):
                        if suml2[t] > 0 and sumlx[t] * sumlx[t] > best[t] * suml2[t]:
                            s = sumlx[t] / suml2[t]
                            scale[t] = s
                            best[t] = s * sumlx[t]
                            best_isc[t] = isc[t]
            _qx_levels(xt, n, qk, best_isc, lv)
            for t in range(n):
                p = (r * nb + b0 + t) * 18
                if abs(mxs[t]) < _GROUP_MAX_EPS:  # all (near) zero: scale +0, levels 0
                    _put_f16(out, p, zero, si, sf)
                    out[p + 2:p + 18] = 0
                    continue
                if not _is_finite(scale[t]):
                    flags[r] = 1
                _put_f16(out, p, scale[t], si, sf)
                if not _put_levels(out[p + 2:p + 18], lv, t, qk // 2):
                    flags[r] = 1


@kernel
def _affine_levels(xt, n, qk, offset, isc, lv):  # noqa: ANN001,ANN201,PLR0913 - numba kernel
    """``lv = clamp(rint((x - offset)*iscale), 0, 15)`` for the tile (a NaN stays NaN, as torch's clamp)."""
    lo = np.float32(0)
    hi = np.float32(15)
    for i in range(qk):
        o = i * _TILE
        for t in range(n):
            v = np.rint((xt[o + t] - offset[t]) * isc[t])
            if v < lo:
                v = lo
            elif v > hi:
                v = hi
            lv[o + t] = v


@kernel
def _weighted_sq_error(xt, wt, lv, n, qk, scale, offset, err):  # noqa: ANN001,ANN201,PLR0913 - numba kernel
    """``err[t] = seq_sum(((l*scale + offset) - x)^2 * w)`` over each block of the tile."""
    for i in range(qk):
        o = i * _TILE
        for t in range(n):
            e = (lv[o + t] * scale[t] + offset[t]) - xt[o + t]
            s = (e * e) * wt[o + t]
            if i == 0:
                err[t] = s
            else:
                err[t] += s


@kernel
def _q4_1_imatrix_kernel(x, xb, qw, nb, qk, grid, out, flags):  # noqa: ANN001,ANN201,PLR0913,PLR0912,PLR0915,C901 - numba kernel
    """Q4_1 with an importance matrix: ``make_qkx2_quants`` (nmax 15, the -0.9/0.05/36 grid) per block as the
    torch port runs it, weights as for Q4_0; ``m = -the_min``."""
    si = np.empty(1, np.int32)
    sf = si.view(np.float32)
    xt = np.empty(QK * _TILE, np.float32)
    wt = np.empty(QK * _TILE, np.float32)
    lv = np.empty(QK * _TILE, np.float32)
    mx = np.empty(_TILE, np.float32)
    mn = np.empty(_TILE, np.float32)
    sum_w = np.empty(_TILE, np.float32)
    sum_x = np.empty(_TILE, np.float32)
    isc = np.empty(_TILE, np.float32)
    scale = np.empty(_TILE, np.float32)
    best = np.empty(_TILE, np.float32)
    cur_min = np.empty(_TILE, np.float32)
    lv_min = np.empty(_TILE, np.float32)  # the best levels are clamp(rint((x - lv_min)*lv_isc), 0, 15)
    lv_isc = np.empty(_TILE, np.float32)
    s_l = np.empty(_TILE, np.float32)
    s_l2 = np.empty(_TILE, np.float32)
    s_xl = np.empty(_TILE, np.float32)
    t_sc = np.empty(_TILE, np.float32)
    t_mn = np.empty(_TILE, np.float32)
    ok = np.empty(_TILE, np.bool_)
    err = np.empty(_TILE, np.float32)
    cols = nb * QK
    zero = np.float32(0)
    for r in range(flags.shape[0]):
        sigma2 = _row_sigma2(x[r * cols:(r + 1) * cols], cols)
        for b0 in range(0, nb, _TILE):
            n = min(_TILE, nb - b0)
            o0 = r * cols + b0 * QK
            for t in range(n):
                xbs = xb[o0 + t * QK:o0 + (t + 1) * QK]
                kmax, kmin = _max_min_keys(xbs, qk)
                if _nonfinite_keys(kmax, kmin) or _zero_extreme_both_signs(xbs, qk, kmax, kmin):
                    flags[r] = 1  # (a zero extreme of both signs: torch's amax/amin picks the sign)
                a, c = _torch_max_min(kmax, kmin, si, sf)
                if c > zero:  # amin.clamp(max=0): +0.0 above zero; keeps -0.0 and NaN
                    c = zero
                mx[t] = a
                mn[t] = c
            _load_tile(x, o0, qw[b0 * QK:], n, qk, sigma2, xt, wt)
            for i in range(qk):
                o = i * _TILE
                for t in range(n):
                    w = wt[o + t]
                    if i == 0:
                        sum_w[t] = w
                        sum_x[t] = w * xt[o + t]
                    else:
                        sum_w[t] += w
                        sum_x[t] += w * xt[o + t]
            for t in range(n):
                isc[t] = np.float32(15) / (mx[t] - mn[t])
                scale[t] = np.float32(1) / isc[t]
                cur_min[t] = mn[t]
                lv_min[t] = mn[t]
                lv_isc[t] = isc[t]
            _affine_levels(xt, n, qk, mn, isc, lv)
            _weighted_sq_error(xt, wt, lv, n, qk, scale, mn, best)
            for step in range(grid.shape[0]):
                for t in range(n):
                    isc[t] = grid[step] / (mx[t] - cur_min[t])
                _affine_levels(xt, n, qk, cur_min, isc, lv)
                for i in range(qk):
                    o = i * _TILE
                    for t in range(n):
                        lt = lv[o + t]
                        wl = wt[o + t] * lt
                        if i == 0:
                            s_l[t] = wl
                            s_l2[t] = wl * lt
                            s_xl[t] = wl * xt[o + t]
                        else:
                            s_l[t] += wl
                            s_l2[t] += wl * lt
                            s_xl[t] += wl * xt[o + t]
                for t in range(n):
                    det = sum_w[t] * s_l2[t] - s_l[t] * s_l[t]
                    ts = (sum_w[t] * s_xl[t] - sum_x[t] * s_l[t]) / det
                    tm = (s_l2[t] * sum_x[t] - s_l[t] * s_xl[t]) / det
                    if tm > 0:
                        ts = s_xl[t] / s_l2[t]
                        tm = zero
                    t_sc[t] = ts
                    t_mn[t] = tm
                    ok[t] = det > 0  # else the torch port's error is NaN: never better
                _weighted_sq_error(xt, wt, lv, n, qk, t_sc, t_mn, err)
                for t in range(n):
                    if ok[t] and err[t] < best[t]:
                        best[t] = err[t]
                        scale[t] = t_sc[t]
                        lv_min[t] = cur_min[t]
                        lv_isc[t] = isc[t]
                        cur_min[t] = t_mn[t]
            _affine_levels(xt, n, qk, lv_min, lv_isc, lv)
            for t in range(n):
                p = (r * nb + b0 + t) * 20
                if mx[t] == mn[t]:  # flat block: scale +0, levels 0, m = min
                    _put_f16(out, p, zero, si, sf)
                    _put_f16(out, p + 2, mn[t], si, sf)
                    out[p + 4:p + 20] = 0
                    continue
                if not (_is_finite(scale[t]) and _is_finite(cur_min[t])):
                    flags[r] = 1
                _put_f16(out, p, scale[t], si, sf)
                _put_f16(out, p + 2, cur_min[t], si, sf)
                if not _put_levels(out[p + 4:p + 20], lv, t, qk // 2):
                    flags[r] = 1


# ---- wrappers ----------------------------------------------------------------------------------------


def _as_rows(w: Tensor, keep_bf16: bool = False) -> Tensor:
    """float ``[rows, cols]`` -> float32 (or, with ``keep_bf16``, a bfloat16 input as it is) contiguous CPU
    ``[rows, cols]``; ``cols`` a multiple of 32."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D [rows, cols] tensor, got shape {tuple(w.shape)}")
    if w.shape[1] % QK:
        raise ValueError(f"row length {w.shape[1]} is not a multiple of the block size {QK}")
    dtype = torch.bfloat16 if keep_bf16 and w.dtype == torch.bfloat16 else torch.float32
    return w.detach().to(device="cpu", dtype=dtype).contiguous()


def _importance(quant_weights: Tensor, cols: int) -> np.ndarray:
    """Per-column importances as float32 ``[cols]`` numpy."""
    qw = quant_weights.detach().to(device="cpu", dtype=torch.float32).contiguous().reshape(-1)
    if qw.numel() != cols:
        raise ValueError(f"quant_weights has {qw.numel()} values for rows of {cols}")
    return qw.numpy()


_TYPE_SIZE = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24}


def _output(x: Tensor, name: str, out: Tensor | None) -> Tensor:
    """``out`` checked to be a contiguous uint8 ``[rows, row_bytes]`` for ``x``; a new one when None."""
    shape = (x.shape[0], x.shape[1] // QK * _TYPE_SIZE[name[:4]])
    if out is None:
        return torch.empty(shape, dtype=torch.uint8)
    if out.dtype != torch.uint8 or tuple(out.shape) != shape or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(f"out must be a contiguous CPU uint8 tensor of shape {shape}")
    return out


def _launch(name: str, x: Tensor, qw: np.ndarray | None = None, out: Tensor | None = None) -> tuple[Tensor, np.ndarray]:
    """Run the kernel of ``name`` (``"q4_0"``, ..., ``"q4_0_imatrix"``) on float32 contiguous ``x``
    (Q8_0: or bfloat16), into ``out`` when given.

    Returns the bytes ``[rows, row_bytes]`` and the per-row fallback marks, before any fallback.
    """
    rows, cols = x.shape
    nb = cols // QK
    out = _output(x, name, out)
    flags = np.zeros(rows, dtype=np.uint8)
    if rows == 0 or cols == 0:
        return out, flags
    o = out.numpy().reshape(-1)
    if x.dtype == torch.bfloat16:
        if name != "q8_0":  # pragma: no cover - _quantize converts for the other kernels
            raise TypeError(f"the {name} kernel takes float32")
        _q8_0_kernel(x.view(torch.int16).numpy().view(np.uint16).reshape(-1), nb, QK, o, flags)
        return out, flags
    xn = x.numpy().reshape(-1)
    xb = xn.view(np.int32)
    if name == "q8_0":
        _q8_0_kernel(xb, nb, QK, o, flags)
    elif name in ("q4_0", "q5_0"):
        _symmetric_kernel(xn, xb, nb, QK, 8 if name == "q4_0" else 16, name == "q5_0", o, flags)
    elif name in ("q4_1", "q5_1"):
        _affine_kernel(xn, xb, nb, QK, 15 if name == "q4_1" else 31, name == "q5_1", o, flags)
    elif name == "q4_0_imatrix":
        _q4_0_imatrix_kernel(xn, xb, qw, nb, QK, _QX_NUMERATORS, o, flags)
    elif name == "q4_1_imatrix":
        _q4_1_imatrix_kernel(xn, xb, qw, nb, QK, _QKX_GRID, o, flags)
    else:  # pragma: no cover
        raise KeyError(name)
    return out, flags


def _quantize(name: str, w: Tensor, ref: Callable[[Tensor], Tensor], qw: np.ndarray | None = None,
              out: Tensor | None = None) -> Tensor:
    """The kernel's bytes (in ``out`` when given); if it marked a row, the torch function ``ref`` on the
    whole input instead.

    The whole input, not the marked rows alone: for a NaN, or for a zero extreme of both signs, torch's
    bytes can depend on where the block sits in the tensor (vectorized body or scalar tail of its
    reductions and element-wise ops), so only the same call on the same tensor reproduces them.
    """
    if not jit.available():  # pragma: no cover - the codec only calls these when numba is there
        res = ref(w)
        return res if out is None else out.copy_(res)
    x = _as_rows(w, keep_bf16=name == "q8_0")
    out, flags = _launch(name, x, qw, out)
    return out.copy_(ref(x.float())) if flags.any() else out


def quantize_q8_0(w: Tensor, out: Tensor | None = None) -> Tensor:
    """float ``[rows, cols]`` -> Q8_0 bytes ``[rows, cols//32*34]`` (= :func:`quant.gguf_legacy.quantize_q8_0`).

    A bfloat16 input is read as it is (no float32 copy of it is made). ``out``: a contiguous uint8 tensor of
    that shape to write into (as every plain quantizer here takes)."""
    return _quantize("q8_0", w, lg.quantize_q8_0, out=out)


def quantize_q4_0(w: Tensor, out: Tensor | None = None) -> Tensor:
    """float ``[rows, cols]`` -> Q4_0 bytes ``[rows, cols//32*18]`` (= :func:`quant.gguf_legacy.quantize_q4_0`)."""
    return _quantize("q4_0", w, lg.quantize_q4_0, out=out)


def quantize_q4_1(w: Tensor, out: Tensor | None = None) -> Tensor:
    """float ``[rows, cols]`` -> Q4_1 bytes ``[rows, cols//32*20]`` (= :func:`quant.gguf_legacy.quantize_q4_1`)."""
    return _quantize("q4_1", w, lg.quantize_q4_1, out=out)


def quantize_q5_0(w: Tensor, out: Tensor | None = None) -> Tensor:
    """float ``[rows, cols]`` -> Q5_0 bytes ``[rows, cols//32*22]`` (= :func:`quant.gguf_legacy.quantize_q5_0`)."""
    return _quantize("q5_0", w, lg.quantize_q5_0, out=out)


def quantize_q5_1(w: Tensor, out: Tensor | None = None) -> Tensor:
    """float ``[rows, cols]`` -> Q5_1 bytes ``[rows, cols//32*24]`` (= :func:`quant.gguf_legacy.quantize_q5_1`)."""
    return _quantize("q5_1", w, lg.quantize_q5_1, out=out)


def quantize_q4_0_imatrix(w: Tensor, quant_weights: Tensor) -> Tensor:
    """Q4_0 bytes with per-column importances (= :func:`quant.gguf_imatrix.quantize_q4_0_imatrix`)."""
    qw = _importance(quant_weights, w.shape[-1])
    return _quantize("q4_0_imatrix", w, lambda rows: im.quantize_q4_0_imatrix(rows, quant_weights), qw)


def quantize_q5_0_imatrix(w: Tensor, quant_weights: Tensor) -> Tensor:
    """Q5_0 bytes with per-column importances: the torch port (no compiled kernel for it yet)."""
    return im.quantize_q5_0_imatrix(_as_rows(w), quant_weights)


def quantize_q5_1_imatrix(w: Tensor, quant_weights: Tensor) -> Tensor:
    """Q5_1 bytes with per-column importances: the torch port (no compiled kernel for it yet)."""
    return im.quantize_q5_1_imatrix(_as_rows(w), quant_weights)


def quantize_q4_1_imatrix(w: Tensor, quant_weights: Tensor) -> Tensor:
    """Q4_1 bytes with per-column importances (= :func:`quant.gguf_imatrix.quantize_q4_1_imatrix`)."""
    qw = _importance(quant_weights, w.shape[-1])
    return _quantize("q4_1_imatrix", w, lambda rows: im.quantize_q4_1_imatrix(rows, quant_weights), qw)
