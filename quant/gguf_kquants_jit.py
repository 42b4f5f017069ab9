"""Compiled (numba) Q4_K, Q5_K, Q6_K quantizers: the same bytes as :mod:`quant.gguf_kquants`, faster.

Each kernel does, per super-block, the float32 operations of the torch port in the same order (and so
those of llama.cpp's ``quantize_row_q*_K_ref`` / ``_impl``): sequential sums that start from their first
term (``seq_sum``), ``np.rint`` for ``nearest_int`` (round half to even), divisions kept as divisions,
``np.sqrt`` on float32 (correctly rounded), no fused multiply-adds (no ``fastmath``), scales rounded to
fp16 (:func:`quant.jit_fp16.f16_round`) before the final re-quantization, and C's modulo-256 integer
conversions. Every float constant is a ``np.float32`` so nothing is promoted to float64. Where a NaN
shows up (non-finite input, which the codec rejects first, or ``x*x`` overflowing for |x| > 1.8e19) the
kernels follow the torch port, whose ``amax``/``amin`` propagate NaN, not C's comparisons that skip it.

Speed comes from the layout, not from reordering: a tile of super-blocks is transposed element-major
(``[element, block]``, as the torch port does for the whole tensor), so each step of a sequential sum is
one pass over the blocks of the tile, which LLVM vectorizes across blocks while every block keeps its own
left-to-right order. Scratch arrays are allocated once per kernel call.

Kernels are serial and release the GIL (:func:`quant.jit.kernel`): one call quantizes a run of whole
rows; ``quant.gguf_codec.quantize_tensor`` runs row chunks on threads.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from quant.jit import kernel
from quant.jit_fp16 import f16_bits, f16_round

QK_K = 256
TYPE_SIZE = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
_SEARCH = {"Q4_K": (15, -1.0, 0.1, 20), "Q5_K": (31, -0.5, 0.1, 15)}  # nmax and the ref-path grid

_TILE_AFFINE = 16  # super-blocks per tile: 128 sub-blocks of 32
_TILE_Q6 = 16  # 256 sub-blocks of 16


# ---- scalar helpers ----------------------------------------------------------------------------


@kernel
def _to_i64(v):  # noqa: ANN001,ANN201 - numba kernel
    """float -> int64 as torch/x86 convert: truncation, and INT64_MIN for NaN, inf or out of range."""
    f = float(v)
    if not (f >= -9.223372036854775808e18 and f < 9.223372036854775808e18):
        return np.int64(-9223372036854775807 - 1)
    return np.int64(f)


@kernel
def _u8(v):  # noqa: ANN001,ANN201 - numba kernel
    """C/torch conversion of an integral float to ``uint8_t``: modulo 256 (NaN -> 0)."""
    return _to_i64(v) & 0xFF


@kernel
def _put_f16(out, o, h):  # noqa: ANN001,ANN201 - numba kernel
    """Store fp16 value ``h`` (a float32 holding it) little-endian at ``out[o:o+2]``."""
    bits = f16_bits(h)
    out[o] = bits & 0xFF
    out[o + 1] = (bits >> 8) & 0xFF


@kernel
def _make_qp(xv, w, xo, n, nmax, lv, lo):  # noqa: ANN001,ANN201 - numba kernel
    """``make_qp_quants`` of the torch port on ``xv[xo:xo+n]`` with weights ``w[xo:xo+n]``.

    Writes float levels to ``lv[lo:lo+n]`` (may be negative where x is) and returns the float32 scale.
    """
    fn = np.float32(nmax)
    zero = np.float32(0)
    mx = xv[xo]
    for i in range(1, n):
        v = xv[xo + i]
        if v > mx or v != v:
            mx = v
    if not (mx > zero):
        mx = zero
    if mx < np.float32(1e-15):
        for i in range(n):
            lv[lo + i] = zero
        return zero
    iscale = fn / mx
    sc1 = np.float32(1) / iscale
    best = zero
    for i in range(n):
        v = xv[xo + i]
        d = v - sc1 * np.rint(iscale * v)
        e = (w[xo + i] * d) * d
        best = e if i == 0 else best + e
    for step in range(-4, 5):
        if step == 0:
            continue
        isi = (np.float32(0.1) * np.float32(step) + fn) / mx
        si = np.float32(1) / isi
        err = zero
        for i in range(n):
            v = xv[xo + i]
            q = np.rint(isi * v)
            if q > fn:
                q = fn
            d = v - si * q
            e = (w[xo + i] * d) * d
            err = e if i == 0 else err + e
        if err < best:
            best = err
            iscale = isi
    sumlx = zero
    suml2 = zero
    for i in range(n):
        q = np.rint(iscale * xv[xo + i])
        if q > fn:
            q = fn
        lv[lo + i] = q
        wi = w[xo + i]
        a = (wi * xv[xo + i]) * q
        b = (wi * q) * q
        if i == 0:
            sumlx = a
            suml2 = b
        else:
            sumlx += a
            suml2 += b
    for _ in range(5):
        for i in range(n):
            wi = w[xo + i]
            xi = xv[xo + i]
            wx = wi * xi
            li = lv[lo + i]
            slx = sumlx - wx * li
            sl2 = suml2 - (wi * li) * li
            if slx > zero and sl2 > zero:
                nl = np.rint((xi * sl2) / slx)
                if nl > fn:
                    nl = fn
                if nl != li:
                    slx_new = slx + wx * nl
                    sl2_new = sl2 + (wi * nl) * nl
                    if (slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new:
                        lv[lo + i] = nl
                        sumlx = slx_new
                        suml2 = sl2_new
    if suml2 > zero:
        return sumlx / suml2
    return zero


# ---- Q4_K / Q5_K ---------------------------------------------------------------------------------


@kernel
def _affine_k_kernel(x, qw, use_qw, nsb_row, nmax, rmin, rdelta, nstep, q5, out):  # noqa: ANN001,ANN201,C901,PLR09
    """Q4_K (``q5`` False) / Q5_K bytes of ``x`` (float32, whole rows flattened) into ``out`` (uint8).

    ``qw``: per-column imatrix (``use_qw``), ``nsb_row`` super-blocks per row (for its column index).
    ``nmax``, ``rmin``, ``rdelta``, ``nstep``: the make_qkx2 search of the ref path; with ``qw`` the
    make_qkx3 grid (-0.9, 0.05, 36) of ``quantize_row_q*_K_impl`` replaces the last three.
    """
    T = _TILE_AFFINE
    NB = 8 * T
    bs = 176 if q5 else 144
    n_sb = x.size // 256
    f0 = np.float32(0)
    fn = np.float32(nmax)
    if use_qw:
        g_rmin, g_rdelta, g_nstep = np.float32(-0.9), np.float32(0.05), 36
    else:
        g_rmin, g_rdelta, g_nstep = np.float32(rmin), np.float32(rdelta), nstep

    xt = np.empty(32 * NB, np.float32)  # [element, block]
    wt = np.empty(32 * NB, np.float32)
    la = np.empty(32 * NB, np.float32)  # a candidate's levels
    mn = np.empty(NB, np.float32)
    mx = np.empty(NB, np.float32)
    sum_w = np.empty(NB, np.float32)
    sum_x = np.empty(NB, np.float32)
    isc = np.empty(NB, np.float32)
    cmin = np.empty(NB, np.float32)  # best min so far (<= 0)
    scale = np.empty(NB, np.float32)
    best = np.empty(NB, np.float32)
    lv_isc = np.empty(NB, np.float32)  # the best levels are clamp(rint((x - lv_min) * lv_isc))
    lv_min = np.empty(NB, np.float32)
    s_l = np.empty(NB, np.float32)
    s_l2 = np.empty(NB, np.float32)
    s_xl = np.empty(NB, np.float32)
    t_sc = np.empty(NB, np.float32)
    t_mn = np.empty(NB, np.float32)
    det = np.empty(NB, np.float32)
    err = np.empty(NB, np.float32)
    the_min = np.empty(NB, np.float32)
    sig = np.empty(T, np.float32)
    ls = np.empty(8, np.float32)
    lm = np.empty(8, np.float32)
    sc = np.empty(8, np.int64)
    mc = np.empty(8, np.int64)
    q = np.empty(256, np.int64)

    for s0 in range(0, n_sb, T):
        ns = min(T, n_sb - s0)
        nb = 8 * ns
        base = s0 * 256
        for b in range(nb):
            for i in range(32):
                xt[i * NB + b] = x[base + b * 32 + i]

        # ---- weights
        if use_qw:
            for s in range(ns):
                o = base + s * 256
                acc = x[o] * x[o]
                for k in range(1, 256):
                    v = x[o + k]
                    acc += v * v
                sig[s] = (np.float32(2) * acc) / np.float32(256)
            for b in range(nb):
                col0 = ((s0 + b // 8) % nsb_row) * 256 + (b % 8) * 32
                s2 = sig[b // 8]
                for i in range(32):
                    v = xt[i * NB + b]
                    wt[i * NB + b] = qw[col0 + i] * np.sqrt(v * v + s2)
        else:
            for b in range(nb):
                v = xt[b]
                err[b] = v * v
            for i in range(1, 32):
                o = i * NB
                for b in range(nb):
                    v = xt[o + b]
                    err[b] += v * v
            for b in range(nb):
                err[b] = np.sqrt(err[b] / np.float32(32))
            for i in range(32):
                o = i * NB
                for b in range(nb):
                    wt[o + b] = err[b] + abs(xt[o + b])

        # ---- make_qkx2/3_quants: min, max, sum_w, sum_x
        for b in range(nb):
            v = xt[b]
            w = wt[b]
            mn[b] = v
            mx[b] = v
            sum_w[b] = w
            sum_x[b] = w * v
        for i in range(1, 32):
            o = i * NB
            for b in range(nb):
                v = xt[o + b]
                w = wt[o + b]
                a = mn[b]  # NaN-propagating, as torch's amin/amax
                mn[b] = v if (v < a or v != v) else a
                a = mx[b]
                mx[b] = v if (v > a or v != v) else a
                sum_w[b] += w
                sum_x[b] += w * v
        for b in range(nb):
            m = mn[b]
            if m > f0:
                m = f0
            mn[b] = m
            iscale = fn / (mx[b] - m)
            isc[b] = iscale
            scale[b] = np.float32(1) / iscale
            cmin[b] = m
            lv_isc[b] = iscale
            lv_min[b] = m
        # error of the first guess
        for i in range(32):
            o = i * NB
            for b in range(nb):
                v = xt[o + b]
                l = np.rint((v - mn[b]) * isc[b])
                l = f0 if l < f0 else l
                l = fn if l > fn else l
                d = l * scale[b] + mn[b] - v
                e = (d * d) * wt[o + b]
                if i == 0:
                    best[b] = e
                else:
                    best[b] += e

        for step in range(g_nstep + 1):
            grid = g_rmin + g_rdelta * np.float32(step) + fn
            for b in range(nb):
                isc[b] = grid / (mx[b] - cmin[b])
            for i in range(32):
                o = i * NB
                for b in range(nb):
                    v = xt[o + b]
                    l = np.rint((v - cmin[b]) * isc[b])
                    l = f0 if l < f0 else l
                    l = fn if l > fn else l
                    la[o + b] = l
                    wl = wt[o + b] * l
                    if i == 0:
                        s_l[b] = wl
                        s_l2[b] = wl * l
                        s_xl[b] = wl * v
                    else:
                        s_l[b] += wl
                        s_l2[b] += wl * l
                        s_xl[b] += wl * v
            for b in range(nb):
                sw = sum_w[b]
                sl = s_l[b]
                sl2 = s_l2[b]
                sxl = s_xl[b]
                dt = sw * sl2 - sl * sl
                ts = (sw * sxl - sum_x[b] * sl) / dt
                tm = (sl2 * sum_x[b] - sl * sxl) / dt
                if tm > f0:
                    ts = sxl / sl2
                    tm = f0
                det[b] = dt
                t_sc[b] = ts
                t_mn[b] = tm
            for i in range(32):
                o = i * NB
                for b in range(nb):
                    d = la[o + b] * t_sc[b] + t_mn[b] - xt[o + b]
                    e = (d * d) * wt[o + b]
                    if i == 0:
                        err[b] = e
                    else:
                        err[b] += e
            for b in range(nb):
                if det[b] > f0 and err[b] < best[b]:
                    best[b] = err[b]
                    scale[b] = t_sc[b]
                    lv_isc[b] = isc[b]
                    lv_min[b] = cmin[b]
                    cmin[b] = t_mn[b]
        for b in range(nb):  # a flat block: scale 0, levels 0, the_min = -min
            if mx[b] == mn[b]:
                scale[b] = f0
                the_min[b] = -mn[b]
            else:
                the_min[b] = -cmin[b]

        # ---- per super-block: 6-bit scales, requantization, packing
        for s in range(ns):
            b0 = 8 * s
            o = (s0 + s) * bs
            if use_qw:  # make_qp_quants weighted by sw[j] = seq_sum(weights), which is sum_w
                d_block = _make_qp(scale, sum_w, b0, 8, 63, ls, 0)
                m_block = _make_qp(the_min, sum_w, b0, 8, 63, lm, 0)
                for j in range(8):
                    c = _u8(ls[j])
                    sc[j] = c if c < 63 else 63
                    c = _u8(lm[j])
                    mc[j] = c if c < 63 else 63
                d = f16_round(d_block)
                dmin = f16_round(m_block)
            else:
                vmax = f0
                mmax = f0
                vnan = False
                mnan = False
                for j in range(8):
                    v = scale[b0 + j]
                    if v > vmax:
                        vmax = v
                    vnan = vnan or v != v
                    v = the_min[b0 + j]
                    if v > mmax:
                        mmax = v
                    mnan = mnan or v != v
                if vnan:  # torch: amax is NaN, then where(vmax > 0, vmax, 0)
                    vmax = f0
                if mnan:
                    mmax = f0
                inv = np.float32(63) / vmax if vmax > f0 else f0
                minv = np.float32(63) / mmax if mmax > f0 else f0
                for j in range(8):
                    c = _u8(np.rint(inv * scale[b0 + j]))
                    sc[j] = c if c < 63 else 63
                    c = _u8(np.rint(minv * the_min[b0 + j]))
                    mc[j] = c if c < 63 else 63
                d = f16_round(vmax / np.float32(63))
                dmin = f16_round(mmax / np.float32(63))
            for j in range(8):
                b = b0 + j
                dq = d * np.float32(sc[j])
                dm = dmin * np.float32(mc[j])
                if dq != f0:
                    for i in range(32):
                        l = np.rint((xt[i * NB + b] + dm) / dq)
                        l = f0 if l < f0 else l
                        l = fn if l > fn else l
                        q[32 * j + i] = _u8(l)
                elif mx[b] == mn[b]:
                    for i in range(32):
                        q[32 * j + i] = 0
                else:  # the search's levels
                    for i in range(32):
                        l = np.rint((xt[i * NB + b] - lv_min[b]) * lv_isc[b])
                        l = f0 if l < f0 else l
                        l = fn if l > fn else l
                        q[32 * j + i] = _u8(l)
            _put_f16(out, o, d)
            _put_f16(out, o + 2, dmin)
            for j in range(4):
                out[o + 4 + j] = (sc[j] | ((sc[j + 4] >> 4) << 6)) & 0xFF
                out[o + 8 + j] = (mc[j] | ((mc[j + 4] >> 4) << 6)) & 0xFF
                out[o + 12 + j] = ((sc[j + 4] & 15) | ((mc[j + 4] & 15) << 4)) & 0xFF
            if q5:
                for l in range(32):
                    h = 0
                    for k in range(8):
                        h |= ((q[32 * k + l] >> 4) & 1) << k
                    out[o + 16 + l] = h
                qo = o + 48
            else:
                qo = o + 16
            for g in range(4):
                for l in range(32):
                    out[qo + 32 * g + l] = (q[64 * g + l] & 15) | ((q[64 * g + l + 32] & 15) << 4)


# ---- Q6_K ----------------------------------------------------------------------------------------


@kernel
def _q6_k_kernel(x, qw, use_qw, nsb_row, out):  # noqa: ANN001,ANN201,C901,PLR0912,PLR0915
    """Q6_K bytes of ``x`` (float32, whole rows flattened) into ``out`` (uint8); ``qw`` as above."""
    T = _TILE_Q6
    NB = 16 * T
    n_sb = x.size // 256
    f0 = np.float32(0)
    fn = np.float32(32)
    eps = np.float32(1e-15)

    xt = np.empty(16 * NB, np.float32)
    wt = np.empty(16 * NB, np.float32)
    wxt = np.empty(16 * NB, np.float32)
    amax = np.empty(NB, np.float32)
    smax = np.empty(NB, np.float32)
    isc = np.empty(NB, np.float32)
    best_isc = np.empty(NB, np.float32)
    scale = np.empty(NB, np.float32)
    best = np.empty(NB, np.float32)
    slx = np.empty(NB, np.float32)
    sl2 = np.empty(NB, np.float32)
    q = np.empty(256, np.int64)
    sc = np.empty(16, np.int64)

    for s0 in range(0, n_sb, T):
        ns = min(T, n_sb - s0)
        nb = 16 * ns
        base = s0 * 256
        for b in range(nb):
            for i in range(16):
                xt[i * NB + b] = x[base + b * 16 + i]
        if use_qw:
            for b in range(nb):
                col0 = ((s0 + b // 16) % nsb_row) * 256 + (b % 16) * 16
                for i in range(16):
                    w = qw[col0 + i]
                    wt[i * NB + b] = w
                    wxt[i * NB + b] = w * xt[i * NB + b]
        else:
            for i in range(16):
                o = i * NB
                for b in range(nb):
                    v = xt[o + b]
                    w = v * v
                    wt[o + b] = w
                    wxt[o + b] = w * v
        # first element of largest magnitude (NaN once a NaN is seen, as torch's amax/amin)
        for b in range(nb):
            amax[b] = f0
            smax[b] = f0
        for i in range(16):
            o = i * NB
            for b in range(nb):
                v = xt[o + b]
                a = abs(v)
                big = a > amax[b] or a != a
                amax[b] = a if big else amax[b]
                smax[b] = v if big else smax[b]
        for b in range(nb):
            isc[b] = -fn / smax[b]
            best_isc[b] = isc[b]
        for i in range(16):
            o = i * NB
            for b in range(nb):
                l = np.rint(isc[b] * xt[o + b])
                l = -fn if l < -fn else l
                l = np.float32(31) if l > np.float32(31) else l
                a = wxt[o + b] * l
                c = (wt[o + b] * l) * l
                if i == 0:
                    slx[b] = a
                    sl2[b] = c
                else:
                    slx[b] += a
                    sl2[b] += c
        for b in range(nb):
            s = slx[b] / sl2[b] if sl2[b] != f0 else f0
            scale[b] = s
            best[b] = s * slx[b]
        # The candidates' sums repeat the loop above rather than call a helper kernel: through a call LLVM
        # loses the no-alias facts about these scratch arrays and stops vectorizing (Q6_K 183 -> 37 M/s).
        for step in range(-9, 10):
            if step == 0:
                continue
            num = -(fn + np.float32(0.1) * np.float32(step))
            for b in range(nb):
                isc[b] = num / smax[b]
            for i in range(16):
                o = i * NB
                for b in range(nb):
                    l = np.rint(isc[b] * xt[o + b])
                    l = -fn if l < -fn else l
                    l = np.float32(31) if l > np.float32(31) else l
                    a = wxt[o + b] * l
                    c = (wt[o + b] * l) * l
                    if i == 0:
                        slx[b] = a
                        sl2[b] = c
                    else:
                        slx[b] += a
                        sl2[b] += c
            for b in range(nb):
                lx = slx[b]
                l2 = sl2[b]
                if l2 > f0 and lx * lx > best[b] * l2:
                    s = lx / l2
                    scale[b] = s
                    best[b] = s * lx
                    best_isc[b] = isc[b]
        for b in range(nb):
            if amax[b] < eps:
                scale[b] = f0

        # ---- per super-block
        for s in range(ns):
            b0 = 16 * s
            o = (s0 + s) * 210
            mxs = f0
            amx = f0
            nan = False
            for j in range(16):
                v = scale[b0 + j]
                a = abs(v)
                if a > amx:
                    amx = a
                    mxs = v
                nan = nan or v != v
            if nan:  # torch's signed_absmax (amax/amin) propagates NaN (x*x overflowed): d becomes NaN
                mxs = np.float32(np.nan)
                amx = mxs
            if amx < eps:
                for k in range(210):
                    out[o + k] = 0
                continue
            iscale = np.float32(-128) / mxs
            d = f16_round(np.float32(1) / iscale)
            for j in range(16):
                v = np.rint(iscale * scale[b0 + j])
                if v > np.float32(127):
                    v = np.float32(127)
                sc[j] = ((_to_i64(v) + 128) & 0xFF) - 128
            for j in range(16):
                b = b0 + j
                dq = d * np.float32(sc[j])
                if dq != f0:
                    for i in range(16):
                        l = np.rint(xt[i * NB + b] / dq)
                        l = -fn if l < -fn else l
                        l = np.float32(31) if l > np.float32(31) else l
                        q[16 * j + i] = _u8(l + fn)
                elif amax[b] < eps:
                    for i in range(16):
                        q[16 * j + i] = 0
                else:  # the search's levels
                    for i in range(16):
                        l = np.rint(best_isc[b] * xt[i * NB + b])
                        l = -fn if l < -fn else l
                        l = np.float32(31) if l > np.float32(31) else l
                        q[16 * j + i] = _u8(l + fn)
            for h in range(2):
                for i in range(64):
                    out[o + 64 * h + i] = (q[128 * h + i] & 15) | ((q[128 * h + i + 64] & 15) << 4)
                for l in range(32):
                    out[o + 128 + 32 * h + l] = (
                        ((q[128 * h + l] >> 4) & 3)
                        | (((q[128 * h + l + 32] >> 4) & 3) << 2)
                        | (((q[128 * h + l + 64] >> 4) & 3) << 4)
                        | (((q[128 * h + l + 96] >> 4) & 3) << 6)
                    )
            for j in range(16):
                out[o + 192 + j] = sc[j] & 0xFF
            _put_f16(out, o + 208, d)


# ---- wrappers ------------------------------------------------------------------------------------


def _prepare(w: Tensor, quant_weights: Tensor | None) -> tuple[np.ndarray, np.ndarray, bool, int, int]:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    if cols % QK_K:
        raise ValueError(f"row length {cols} is not a multiple of the K-quant block size {QK_K}")
    x = w.detach().to(torch.float32).contiguous().reshape(-1).numpy()
    if quant_weights is None:
        qw = np.zeros(1, np.float32)
    else:
        qw = quant_weights.detach().to(torch.float32).contiguous().reshape(-1).numpy()
        if qw.size != cols:
            raise ValueError(f"quant_weights has {qw.size} values for rows of {cols}")
    return x, qw, quant_weights is not None, rows, cols


def _run(qtype: str, x: np.ndarray, qw: np.ndarray, use_qw: bool, nsb_row: int, out: np.ndarray) -> None:
    """Quantize the whole rows flattened in ``x`` into ``out`` (both 1-D, contiguous)."""
    if qtype == "Q6_K":
        _q6_k_kernel(x, qw, use_qw, nsb_row, out)
    else:
        nmax, rmin, rdelta, nstep = _SEARCH[qtype]
        _affine_k_kernel(x, qw, use_qw, nsb_row, nmax, rmin, rdelta, nstep, qtype == "Q5_K", out)


def _quantize(qtype: str, w: Tensor, quant_weights: Tensor | None) -> Tensor:
    x, qw, use_qw, rows, cols = _prepare(w, quant_weights)
    out = np.empty(rows * (cols // QK_K) * TYPE_SIZE[qtype], np.uint8)
    if out.size:
        _run(qtype, x, qw, use_qw, cols // QK_K, out)
    return torch.from_numpy(out).reshape(rows, cols // QK_K * TYPE_SIZE[qtype])


def quantize_q4_k(w: Tensor, quant_weights: Tensor | None = None) -> Tensor:
    """float ``[rows, cols]`` -> Q4_K bytes ``[rows, cols/256*144]``, as :func:`quant.gguf_kquants.quantize_q4_k`."""
    return _quantize("Q4_K", w, quant_weights)


def quantize_q5_k(w: Tensor, quant_weights: Tensor | None = None) -> Tensor:
    """float ``[rows, cols]`` -> Q5_K bytes ``[rows, cols/256*176]``, as :func:`quant.gguf_kquants.quantize_q5_k`."""
    return _quantize("Q5_K", w, quant_weights)


def quantize_q6_k(w: Tensor, quant_weights: Tensor | None = None) -> Tensor:
    """float ``[rows, cols]`` -> Q6_K bytes ``[rows, cols/256*210]``, as :func:`quant.gguf_kquants.quantize_q6_k`."""
    return _quantize("Q6_K", w, quant_weights)
