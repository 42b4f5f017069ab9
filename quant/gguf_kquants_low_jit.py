"""Compiled (numba) Q2_K and Q3_K quantizers: the same bytes as :mod:`quant.gguf_kquants_low`, faster.

Each kernel does, per super-block, the float32 operations of the torch port in the same order (and so
those of llama.cpp's ``quantize_row_q{2,3}_K_ref`` / ``_impl``): sequential sums that start from their
first term, ggml's ``nearest_int`` bit trick (:func:`_nint`, as the torch port's ``nearest_int``), divisions
kept as divisions, ``np.sqrt`` on float32 (correctly rounded), no fused multiply-adds (no ``fastmath``),
scales rounded to fp16 (:func:`quant.jit_fp16.f16_round`) before the final re-quantization, and C's
modulo-256 integer conversions (``make_qp_quants``' ``uint8_t`` levels included). ``make_qx_quants`` uses
``np.rint`` as the torch port uses ``torch.round`` (the same for its bounded arguments). Inputs that
``quantize_tensor`` refuses (NaN / inf, or values whose fp16 scales overflow) may give other bytes than the torch
port; nothing else does.

As in :mod:`quant.gguf_kquants_jit`, a tile of super-blocks is transposed element-major
(``[element, sub-block]``) so that each step of a sequential sum is one pass over the sub-blocks of the
tile, which LLVM vectorizes while every sub-block keeps its own left-to-right order.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from quant.jit import kernel
from quant.jit_fp16 import f16_bits, f16_round, f32_to_bits

QK_K = 256
TYPE_SIZE = {"Q2_K": 84, "Q3_K": 110}
_TILE = 16  # super-blocks per tile: 256 sub-blocks of 16


@kernel
def _nint(v):  # noqa: ANN001,ANN201 - numba kernel
    """ggml ``nearest_int`` of a float32, as float32: ``(bits(v + 12582912.f) & 0x7fffff) - 0x400000``."""
    b = f32_to_bits(np.float32(v + np.float32(12582912.0)))
    return np.float32((b & 0x7FFFFF) - 0x400000)


@kernel
def _i64(v):  # noqa: ANN001,ANN201 - numba kernel
    """float -> int64 as torch converts: truncation, INT64_MIN for NaN, inf or out of range."""
    f = float(v)
    if not (f >= -9.223372036854775808e18 and f < 9.223372036854775808e18):
        return np.int64(-9223372036854775807 - 1)
    return np.int64(f)


@kernel
def _put_f16(out, o, h):  # noqa: ANN001,ANN201 - numba kernel
    """Store fp16 value ``h`` (a float32 holding it) little-endian at ``out[o:o+2]``."""
    bits = f16_bits(h)
    out[o] = bits & 0xFF
    out[o + 1] = (bits >> 8) & 0xFF


@kernel
def _pack_2bit(q, out, o):  # noqa: ANN001,ANN201 - numba kernel
    """The 64 ``qs`` bytes of 256 codes (low two bits) at ``out[o:o+64]``."""
    for h in range(2):
        for l in range(32):
            e = 128 * h + l
            out[o + 32 * h + l] = (q[e] & 3) | ((q[e + 32] & 3) << 2) | ((q[e + 64] & 3) << 4) \
                | ((q[e + 96] & 3) << 6)


@kernel
def _transpose_and_weights(x, qw, use_qw, nsb_row, s0, ns, sigma_scale, xt, wt, sig, NB):  # noqa: ANN001,ANN201,N803,E501
    """Copy super-blocks ``s0 .. s0+ns`` element-major into ``xt`` and fill ``wt`` with the imatrix weights
    ``qw*sqrt(sigma2 + x²)``, ``sigma2 = (sigma_scale*Σx²)/256``, when ``use_qw`` (else leave ``wt``)."""
    base = s0 * 256
    for b in range(16 * ns):
        for i in range(16):
            xt[i * NB + b] = x[base + b * 16 + i]
    if not use_qw:
        return
    for s in range(ns):
        o = base + s * 256
        acc = x[o] * x[o]
        for k in range(1, 256):
            v = x[o + k]
            acc += v * v
        sig[s] = (acc * np.float32(sigma_scale) if sigma_scale != 1 else acc) / np.float32(256)
    for b in range(16 * ns):
        col0 = ((s0 + b // 16) % nsb_row) * 256 + (b % 16) * 16
        s2 = sig[b // 16]
        for i in range(16):
            v = xt[i * NB + b]
            wt[i * NB + b] = qw[col0 + i] * np.sqrt(v * v + s2)


@kernel
def _make_qp(xv, w, xo, n, nmax, lv):  # noqa: ANN001,ANN201,C901 - numba kernel
    """:func:`quant.gguf_kquants_low.make_qp_quants` on ``xv[xo:xo+n]``, weights ``w[xo:xo+n]``: returns the
    scale and writes the stored (``uint8_t``) levels to ``lv[0:n]``."""
    fn = np.float32(nmax)
    f0 = np.float32(0)
    mx = f0
    for i in range(n):
        v = xv[xo + i]
        mx = mx if mx > v else v
    iscale = fn / mx
    sc1 = np.float32(1) / iscale
    best = f0
    for i in range(n):
        d = xv[xo + i] - sc1 * np.float32(_i64(_nint(iscale * xv[xo + i])) & 0xFF)
        e = (w[xo + i] * d) * d
        best = e if i == 0 else best + e
    for step in range(-4, 5):
        if step == 0:
            continue
        isi = (np.float32(0.1) * np.float32(step) + fn) / mx
        si = np.float32(1) / isi
        err = f0
        for i in range(n):
            l = _nint(isi * xv[xo + i])
            d = xv[xo + i] - si * (fn if l > fn else l)
            e = (w[xo + i] * d) * d
            err = e if i == 0 else err + e
        if err < best:
            best = err
            iscale = isi
    sumlx = f0
    suml2 = f0
    for i in range(n):
        l = _nint(iscale * xv[xo + i])
        l = fn if l > fn else l
        lv[i] = _i64(l) & 0xFF
        a = (w[xo + i] * xv[xo + i]) * l
        b = (w[xo + i] * l) * l
        sumlx = a if i == 0 else sumlx + a
        suml2 = b if i == 0 else suml2 + b
    for _ in range(5):
        for i in range(n):
            wi = w[xo + i]
            xi = xv[xo + i]
            li = np.float32(lv[i])
            slx = sumlx - (wi * xi) * li
            sl2 = suml2 - (wi * li) * li
            if slx > f0 and sl2 > f0:
                nl = _nint((xi * sl2) / slx)
                nl = fn if nl > fn else nl
                if nl != li:
                    slx_new = slx + (wi * xi) * nl
                    sl2_new = sl2 + (wi * nl) * nl
                    if (slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new:
                        lv[i] = _i64(nl) & 0xFF
                        sumlx = slx_new
                        suml2 = sl2_new
    if mx < np.float32(1e-15):
        for i in range(n):
            lv[i] = 0
        return f0
    return sumlx / suml2 if suml2 > f0 else f0


# ---- Q2_K ----------------------------------------------------------------------------------------


@kernel
def _q2_k_kernel(x, qw, use_qw, nsb_row, out):  # noqa: ANN001,ANN201,C901,PLR0912,PLR0915
    """Q2_K bytes of ``x`` (float32, whole rows flattened) into ``out`` (uint8); ``qw``: per-column
    importances when ``use_qw`` (``nsb_row`` super-blocks per row, for the column index)."""
    T = _TILE
    NB = 16 * T
    n_sb = x.size // 256
    f0 = np.float32(0)
    fn = np.float32(3)
    mad = not use_qw
    if use_qw:  # make_qkx3_quants' grid, else make_qkx2_quants' (ref path)
        g_rmin, g_rdelta, g_nstep = np.float32(-0.9), np.float32(0.05), 36
    else:
        g_rmin, g_rdelta, g_nstep = np.float32(-0.5), np.float32(0.1), 15

    xt = np.empty(16 * NB, np.float32)
    wt = np.empty(16 * NB, np.float32)
    la = np.empty(16 * NB, np.float32)
    mn = np.empty(NB, np.float32)
    mx = np.empty(NB, np.float32)
    sum_w = np.empty(NB, np.float32)
    sum_x = np.empty(NB, np.float32)
    isc = np.empty(NB, np.float32)
    cmin = np.empty(NB, np.float32)
    scale = np.empty(NB, np.float32)
    best = np.empty(NB, np.float32)
    lv_isc = np.empty(NB, np.float32)  # the best levels are clamp(nint((x - lv_min) * lv_isc))
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
    ls = np.empty(16, np.int64)
    lm = np.empty(16, np.int64)
    scb = np.empty(16, np.int64)
    q = np.empty(256, np.int64)

    for s0 in range(0, n_sb, T):
        ns = min(T, n_sb - s0)
        nb = 16 * ns
        _transpose_and_weights(x, qw, use_qw, nsb_row, s0, ns, 1.0, xt, wt, sig, NB)
        if not use_qw:
            for i in range(16 * NB):
                wt[i] = abs(xt[i])

        # ---- make_qkx2/3_quants: min, max (NaN-propagating, as torch's amin/amax), sum_w, sum_x
        for b in range(nb):
            v = xt[b]
            w = wt[b]
            mn[b] = v
            mx[b] = v
            sum_w[b] = w
            sum_x[b] = w * v
        for i in range(1, 16):
            o = i * NB
            for b in range(nb):
                v = xt[o + b]
                w = wt[o + b]
                a = mn[b]
                mn[b] = v if (v < a or v != v) else a
                a = mx[b]
                mx[b] = v if (v > a or v != v) else a
                sum_w[b] += w
                sum_x[b] += w * v
        for b in range(nb):
            m = f0 if mn[b] > f0 else mn[b]
            mn[b] = m
            iscale = fn / (mx[b] - m)
            isc[b] = iscale
            scale[b] = np.float32(1) / iscale
            cmin[b] = m
            lv_isc[b] = iscale
            lv_min[b] = m
        for i in range(16):
            o = i * NB
            for b in range(nb):
                v = xt[o + b]
                l = _nint((v - mn[b]) * isc[b])
                l = f0 if l < f0 else (fn if l > fn else l)
                d = l * scale[b] + mn[b] - v
                e = (abs(d) if mad else d * d) * wt[o + b]
                best[b] = e if i == 0 else best[b] + e

        for step in range(g_nstep + 1):
            grid = g_rmin + g_rdelta * np.float32(step) + fn
            for b in range(nb):
                isc[b] = grid / (mx[b] - cmin[b])
            for i in range(16):
                o = i * NB
                for b in range(nb):
                    v = xt[o + b]
                    l = _nint((v - cmin[b]) * isc[b])
                    l = f0 if l < f0 else (fn if l > fn else l)
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
            for i in range(16):
                o = i * NB
                for b in range(nb):
                    d = la[o + b] * t_sc[b] + t_mn[b] - xt[o + b]
                    e = (abs(d) if mad else d * d) * wt[o + b]
                    err[b] = e if i == 0 else err[b] + e
            for b in range(nb):
                if det[b] > f0 and err[b] < best[b]:
                    best[b] = err[b]
                    scale[b] = t_sc[b]
                    lv_isc[b] = isc[b]
                    lv_min[b] = cmin[b]
                    cmin[b] = t_mn[b]
        for b in range(nb):
            if mx[b] == mn[b]:
                scale[b] = f0
                the_min[b] = -mn[b]
            else:
                the_min[b] = -cmin[b]

        # ---- per super-block: 4-bit scales and mins, requantization, packing
        for s in range(ns):
            b0 = 16 * s
            o = (s0 + s) * 84
            if use_qw:  # make_qp_quants weighted by sw[j] = seq_sum(weights), which is sum_w
                d = f16_round(_make_qp(scale, sum_w, b0, 16, 15, ls))
                dmin = f16_round(_make_qp(the_min, sum_w, b0, 16, 15, lm))
                for j in range(16):
                    scb[j] = ls[j] | ((lm[j] << 4) & 0xFF)
            else:
                vmax = f0
                mmax = f0
                for j in range(16):
                    v = scale[b0 + j]
                    vmax = v if v > vmax else vmax
                    v = the_min[b0 + j]
                    mmax = v if v > mmax else mmax
                inv = np.float32(15) / vmax
                minv = np.float32(15) / mmax
                for j in range(16):
                    c = _i64(_nint(inv * scale[b0 + j])) if vmax > f0 else 0
                    cm = _i64(_nint(minv * the_min[b0 + j])) if mmax > f0 else 0
                    scb[j] = (c & 0xFF) | ((cm << 4) & 0xFF)
                d = f16_round(vmax / np.float32(15)) if vmax > f0 else f0
                dmin = f16_round(mmax / np.float32(15)) if mmax > f0 else f0
            for j in range(16):
                b = b0 + j
                dq = d * np.float32(scb[j] & 15)
                dm = dmin * np.float32(scb[j] >> 4)
                for i in range(16):
                    v = xt[i * NB + b]
                    if dq != f0:
                        l = _nint((v + dm) / dq)
                    elif mx[b] == mn[b]:
                        l = f0
                    else:  # C: if (!d) continue -- the search's levels
                        l = _nint((v - lv_min[b]) * lv_isc[b])
                    q[16 * j + i] = _i64(f0 if l < f0 else (fn if l > fn else l))
                out[o + j] = scb[j]
            _pack_2bit(q, out, o + 16)
            _put_f16(out, o + 80, d)
            _put_f16(out, o + 82, dmin)


# ---- Q3_K ----------------------------------------------------------------------------------------


@kernel
def _make_qx_scalar(xv, w, xo, n, nmax, lv):  # noqa: ANN001,ANN201,C901 - numba kernel
    """The torch port's ``make_qx_quants`` (``gguf_kquants``, rmse_type 1, weights ``w``) on ``xv[xo:xo+n]``:
    returns the scale and writes the levels (``+nmax``, 0 for an all-zero block) to ``lv[0:n]``."""
    fn = np.float32(nmax)
    f0 = np.float32(0)
    amax = f0
    mxv = f0
    for i in range(n):  # the first of largest magnitude; NaN once one is seen, as torch's amax/amin
        v = xv[xo + i]
        a = abs(v)
        if a > amax or a != a:
            amax = a
            mxv = v
    best_isc = np.float32(-fn) / mxv
    scale = f0
    best = f0
    for step in range(-10, 10):  # -10: the first guess -nmax/max; then -(nmax + 0.1*step)/max, step != 0
        if step == 0:
            continue
        iscale = best_isc if step == -10 else -(fn + np.float32(0.1) * np.float32(step)) / mxv
        sumlx = f0
        suml2 = f0
        for i in range(n):
            l = np.rint(iscale * xv[xo + i])
            l = -fn if l < -fn else l
            l = fn - np.float32(1) if l > fn - np.float32(1) else l
            a = (w[xo + i] * xv[xo + i]) * l
            b = (w[xo + i] * l) * l
            sumlx = a if i == 0 else sumlx + a
            suml2 = b if i == 0 else suml2 + b
        if step == -10:
            scale = sumlx / suml2 if suml2 != f0 else f0
            best = scale * sumlx
        elif suml2 > f0 and sumlx * sumlx > best * suml2:
            scale = sumlx / suml2
            best = scale * sumlx
            best_isc = iscale
    zero = amax < np.float32(1e-15)
    for i in range(n):
        l = np.rint(best_isc * xv[xo + i])
        l = -fn if l < -fn else l
        l = fn - np.float32(1) if l > fn - np.float32(1) else l
        lv[i] = f0 if zero else l + fn
    return f0 if zero else scale


@kernel
def _q3_k_kernel(x, qw, use_qw, nsb_row, out):  # noqa: ANN001,ANN201,C901,PLR0912,PLR0915
    """Q3_K bytes of ``x`` (float32, whole rows flattened) into ``out`` (uint8); ``qw`` as for Q2_K.

    Without ``qw``: ``make_q3_quants`` per sub-block (RTN, then five passes of coordinate descent); with it,
    ``make_qx_quants`` (19 candidate scales) weighted by ``qw*sqrt(sigma2 + x²)``. Both run over the
    sub-blocks of a tile at once.
    """
    T = _TILE
    NB = 16 * T
    n_sb = x.size // 256
    f0 = np.float32(0)
    fn = np.float32(4)
    fhi = np.float32(3)
    eps = np.float32(1e-15)

    xt = np.empty(16 * NB, np.float32)
    wt = np.empty(16 * NB, np.float32)
    wxt = np.empty(16 * NB, np.float32)
    la = np.empty(16 * NB, np.float32)  # make_q3_quants' levels (signed, in [-4, 3])
    amax = np.empty(NB, np.float32)
    smax = np.empty(NB, np.float32)
    isc = np.empty(NB, np.float32)
    best_isc = np.empty(NB, np.float32)
    scale = np.empty(NB, np.float32)
    best = np.empty(NB, np.float32)
    slx = np.empty(NB, np.float32)
    sl2 = np.empty(NB, np.float32)
    sw = np.empty(NB, np.float32)
    sig = np.empty(T, np.float32)
    lsf = np.empty(16, np.float32)
    ls = np.empty(16, np.int64)
    q = np.empty(256, np.int64)

    for s0 in range(0, n_sb, T):
        ns = min(T, n_sb - s0)
        nb = 16 * ns
        _transpose_and_weights(x, qw, use_qw, nsb_row, s0, ns, 2.0, xt, wt, sig, NB)
        if not use_qw:
            for i in range(16 * NB):
                v = xt[i]
                wt[i] = v * v
        for i in range(16 * NB):
            wxt[i] = wt[i] * xt[i]
        # the first element of largest magnitude: make_q3_quants skips NaN (C), make_qx_quants keeps it (torch)
        for b in range(nb):
            amax[b] = f0
            smax[b] = f0
        for i in range(16):
            o = i * NB
            for b in range(nb):
                v = xt[o + b]
                a = abs(v)
                big = a > amax[b] or (use_qw and a != a)
                amax[b] = a if big else amax[b]
                smax[b] = v if big else smax[b]

        if use_qw:  # ---- make_qx_quants(16, 4, x, L, 1, weights)
            for step in range(-10, 10):
                if step == 0:
                    continue
                num = -fn if step == -10 else -(fn + np.float32(0.1) * np.float32(step))
                for b in range(nb):
                    isc[b] = num / smax[b]
                for i in range(16):
                    o = i * NB
                    for b in range(nb):
                        l = np.rint(isc[b] * xt[o + b])
                        l = -fn if l < -fn else l
                        l = fhi if l > fhi else l
                        a = wxt[o + b] * l
                        c = (wt[o + b] * l) * l
                        slx[b] = a if i == 0 else slx[b] + a
                        sl2[b] = c if i == 0 else sl2[b] + c
                for b in range(nb):
                    if step == -10:
                        s = slx[b] / sl2[b] if sl2[b] != f0 else f0
                        scale[b] = s
                        best[b] = s * slx[b]
                        best_isc[b] = isc[b]
                    elif sl2[b] > f0 and slx[b] * slx[b] > best[b] * sl2[b]:
                        s = slx[b] / sl2[b]
                        scale[b] = s
                        best[b] = s * slx[b]
                        best_isc[b] = isc[b]
            for b in range(nb):
                if amax[b] < eps:
                    scale[b] = f0
            for b in range(nb):  # sw[j]: the sum of the sub-block's weights
                sw[b] = wt[b]
            for i in range(1, 16):
                for b in range(nb):
                    sw[b] += wt[i * NB + b]
        else:  # ---- make_q3_quants(16, 4, x, L, true)
            for b in range(nb):
                isc[b] = -fn / smax[b]
            for i in range(16):
                o = i * NB
                for b in range(nb):
                    l = _nint(isc[b] * xt[o + b])
                    l = -fn if l < -fn else (fhi if l > fhi else l)
                    la[o + b] = l
                    a = wxt[o + b] * l
                    c = (wt[o + b] * l) * l
                    slx[b] = a if i == 0 else slx[b] + a
                    sl2[b] = c if i == 0 else sl2[b] + c
            for _ in range(5):
                for i in range(16):
                    o = i * NB
                    for b in range(nb):
                        v = xt[o + b]
                        w = wt[o + b]
                        wx = wxt[o + b]
                        li = la[o + b]
                        sx = slx[b] - wx * li
                        s2 = sl2[b] - (w * li) * li
                        nl = _nint((v * s2) / sx)
                        nl = -fn if nl < -fn else (fhi if nl > fhi else nl)
                        sxn = sx + wx * nl
                        s2n = s2 + (w * nl) * nl
                        take = sx > f0 and nl != li and s2n > f0 and (sxn * sxn) * sl2[b] > (slx[b] * slx[b]) * s2n
                        la[o + b] = nl if take else li
                        slx[b] = sxn if take else slx[b]
                        sl2[b] = s2n if take else sl2[b]
            for b in range(nb):
                scale[b] = slx[b] / sl2[b] if (sl2[b] > f0 and not amax[b] < eps) else f0

        # ---- per super-block: 6-bit scales, requantization, packing
        for s in range(ns):
            b0 = 16 * s
            o = (s0 + s) * 110
            if use_qw:
                d = f16_round(_make_qx_scalar(scale, sw, b0, 16, 32, lsf))
                for j in range(16):
                    ls[j] = _i64(lsf[j])
            else:
                mxs = f0
                amx = f0
                for j in range(16):  # C: the first of largest magnitude, NaN skipped
                    v = scale[b0 + j]
                    if abs(v) > amx:
                        amx = abs(v)
                        mxs = v
                iscale = np.float32(-32) / mxs
                for j in range(16):
                    c = ((_i64(_nint(iscale * scale[b0 + j])) + 128) & 0xFF) - 128  # int8_t l
                    c = -32 if c < -32 else (31 if c > 31 else c)
                    ls[j] = c + 32 if mxs != f0 else 0
                d = f16_round(np.float32(1) / iscale) if mxs != f0 else f0
            for j in range(16):
                b = b0 + j
                dq = d * np.float32(ls[j] - 32)
                for i in range(16):
                    v = xt[i * NB + b]
                    if dq != f0:
                        l = _nint(v / dq)
                        l = (-fn if l < -fn else (fhi if l > fhi else l)) + fn
                    elif amax[b] < eps:
                        l = f0
                    elif use_qw:  # C: if (!d) continue -- the search's levels
                        l = np.rint(best_isc[b] * v)
                        l = (-fn if l < -fn else (fhi if l > fhi else l)) + fn
                    else:
                        l = la[i * NB + b] + fn
                    q[16 * j + i] = _i64(l)
            for l in range(32):
                h = 0
                for g in range(8):
                    h |= ((q[32 * g + l] >> 2) & 1) << g
                out[o + l] = h
            _pack_2bit(q, out, o + 32)
            for k in range(8):
                out[o + 96 + k] = (ls[k] & 15) | ((ls[k + 8] & 15) << 4)
            for r in range(4):
                out[o + 104 + r] = ((ls[r] >> 4) & 3) | (((ls[r + 4] >> 4) & 3) << 2) \
                    | (((ls[r + 8] >> 4) & 3) << 4) | (((ls[r + 12] >> 4) & 3) << 6)
            _put_f16(out, o + 108, d)


# ---- wrappers ------------------------------------------------------------------------------------


def _quantize(qtype: str, w: Tensor, quant_weights: Tensor | None) -> Tensor:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    if cols % QK_K:
        raise ValueError(f"row length {cols} is not a multiple of the K-quant block size {QK_K}")
    x = w.detach().to(torch.float32).contiguous().reshape(-1).numpy()
    qw = np.zeros(1, np.float32)
    if quant_weights is not None:
        qw = quant_weights.detach().to(torch.float32).contiguous().reshape(-1).numpy()
        if qw.size != cols:
            raise ValueError(f"quant_weights has {qw.size} values for rows of {cols}")
    out = np.empty(rows * (cols // QK_K) * TYPE_SIZE[qtype], np.uint8)
    if out.size:
        run = _q2_k_kernel if qtype == "Q2_K" else _q3_k_kernel
        run(x, qw, quant_weights is not None, cols // QK_K, out)
    return torch.from_numpy(out).reshape(rows, cols // QK_K * TYPE_SIZE[qtype])


def quantize_q2_k(w: Tensor, quant_weights: Tensor | None = None) -> Tensor:
    """float ``[rows, cols]`` -> Q2_K bytes ``[rows, cols/256*84]``, as the torch port's."""
    return _quantize("Q2_K", w, quant_weights)


def quantize_q3_k(w: Tensor, quant_weights: Tensor | None = None) -> Tensor:
    """float ``[rows, cols]`` -> Q3_K bytes ``[rows, cols/256*110]``, as the torch port's."""
    return _quantize("Q3_K", w, quant_weights)
