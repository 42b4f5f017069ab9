"""GGUF K-quants Q4_K, Q5_K, Q6_K: llama.cpp's reference quantizers, vectorized, and dequantizers.

Layout contract (``ggml-common.h``; super-blocks of 256 along the contiguous row, little-endian):

* Q4_K (144 B): ``fp16 d | fp16 dmin | u8 scales[12] | u8 qs[128]``; eight 32-element sub-blocks j with
  6-bit ``sc_j``, ``m_j``: ``x = d*sc_j*q - dmin*m_j``, q in [0, 15]. ``scales``: for j < 4 byte j = sc_j,
  byte j+4 = m_j; for j >= 4 byte j+4 = ``sc_j & 15 | (m_j & 15) << 4`` and the top two bits of sc_j / m_j
  go to bits 6-7 of bytes j-4 / j. ``qs``: per 64 elements, byte l = q[l] | q[l+32] << 4.
* Q5_K (176 B): ``fp16 d | fp16 dmin | u8 scales[12] | u8 qh[32] | u8 qs[128]``; q in [0, 31]; low nibbles
  as Q4_K; bit k of ``qh[l]`` is bit 4 of q[32k + l].
* Q6_K (210 B): ``u8 ql[128] | u8 qh[64] | int8 scales[16] | fp16 d``; sixteen 16-element sub-blocks,
  ``x = d*sc_j*(q-32)``, q in [0, 63]. Per 128-element half h: ``ql[64h + i] = q[i] & 15 | (q[i+64] & 15) << 4``
  (i < 64) and ``qh[32h + l]`` holds bits 4-5 of q[l], q[l+32], q[l+64], q[l+96] at bit 0/2/4/6.

The quantizers follow ``quantize_row_q{4,5,6}_K_ref`` (and, given per-column ``quant_weights`` from an
imatrix, ``quantize_row_q{4,5,6}_K_impl``) with ``make_qkx2_quants`` / ``make_qkx3_quants`` /
``make_qx_quants`` / ``make_qp_quants`` of ggml-quants.c, operation by operation in float32: sums run
left to right, ``nearest_int`` is round-half-to-even (``torch.round``), divisions stay divisions
(``a / b``, never ``a * (1/b)``), square roots are correctly rounded, no fused multiply-adds, and scales
are rounded to fp16 before the final re-quantization. Per-element data are kept element-major
(``[n, blocks]``) so that each sequential sum is a run of adds over all blocks at once.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from quant.gguf_legacy import f16_bytes, f16_from_bytes, pack_nibbles, signed_absmax, split_bytes, unpack_nibbles

QK_K = 256
GROUP_MAX_EPS = float(np.float32(1e-15))
_F32 = np.float32


# ---- float32 primitives matching the C code ----------------------------------------------------


def seq_sum(t: Tensor, dim: int = 0) -> Tensor:
    """``sum += t[i]`` for i = 0..n-1 along ``dim`` in float32, e.g. ``[n, B]`` -> ``[B]``.

    torch's own reductions may reorder (cascade/vectorized sums), so the adds are issued one by one.
    """
    rows = t.unbind(dim)
    acc = rows[0].clone()
    for r in rows[1:]:
        acc.add_(r)
    return acc


def div(a: float, b: Tensor) -> Tensor:
    """float32 ``a / b`` for a scalar numerator (``a / tensor`` in torch multiplies by a reciprocal)."""
    return torch.div(torch.tensor(a, dtype=torch.float32), b)


def nearest_int(v: Tensor) -> Tensor:
    """ggml ``nearest_int``: round half to even (the ``+ 12582912.f`` trick), as float32."""
    return torch.round(v)


def sqrt_f32(v: Tensor) -> Tensor:
    """Correctly rounded float32 ``sqrtf`` (torch's float32 sqrt may be off by one ulp)."""
    return v.double().sqrt().float()


def to_uint8_wrap(v: Tensor) -> Tensor:
    """C conversion of an int (held as float) to ``uint8_t``: modulo 256."""
    return (v.to(torch.int64) & 0xFF).to(torch.uint8)


# ---- scale searches ----------------------------------------------------------------------------


def _weighted_sq_error(w: Tensor, scale: Tensor, level: Tensor, offset: Tensor, x: Tensor, out: Tensor) -> Tensor:
    """``sum_i w_i * (scale*l_i + offset - x_i)^2`` in C order, using ``out`` ``[n, B]`` as scratch: ``[B]``."""
    torch.mul(level, scale, out=out)
    out.add_(offset).sub_(x)
    out.mul_(out).mul_(w)
    return seq_sum(out)


def _affine_levels(x: Tensor, offset: Tensor, iscale: Tensor, nmax: int, out: Tensor) -> Tensor:
    """``clamp(nearest_int(iscale*(x - offset)), 0, nmax)`` into ``out`` ``[n, B]``."""
    torch.sub(x, offset, out=out)
    return out.mul_(iscale).round_().clamp_(0, nmax)


def _qkx2_candidate(
    x: Tensor, w: Tensor, lv: Tensor, sum_w: Tensor, sum_x: Tensor, prods: Tensor, scratch: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted least-squares ``(scale, min)`` for levels ``lv`` (min clipped to <= 0) and its error.

    Returns ``this_scale``, ``this_min`` and ``error`` ``[B]``; NaN where the 2x2 system is singular.
    """
    wl = prods[:, 0]  # prods: [n, 3, B], so each sequential add works on 3*B contiguous floats
    torch.mul(w, lv, out=wl)
    torch.mul(wl, lv, out=prods[:, 1])
    torch.mul(wl, x, out=prods[:, 2])
    sum_l, sum_l2, sum_xl = seq_sum(prods)  # each [B]
    det = sum_w * sum_l2 - sum_l * sum_l
    this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
    this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
    clip = this_min > 0
    this_scale = torch.where(clip, sum_xl / sum_l2, this_scale)
    this_min = torch.where(clip, torch.zeros_like(this_min), this_min)
    err = _weighted_sq_error(w, this_scale, lv, this_min, x, scratch)
    return this_scale, this_min, torch.where(det > 0, err, torch.full_like(err, float("nan")))


def make_qkx2_quants(
    x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Affine search of ggml ``make_qkx2_quants`` (MSE, ``use_mad = false``), per block.

    ``x``, ``w``: float32 ``[n, B]`` (element-major). Returns ``scale [B]``, ``the_min [B]`` (>= 0, the
    value subtracted) and levels ``L`` float32 ``[n, B]`` in [0, nmax], ``x ~ scale*L - the_min``. As in C,
    each candidate grid is built from the best min found so far. (``make_qkx3_quants``, used with an
    imatrix, is the same search with other grid constants.)
    """
    mn, mx = x.amin(0).clamp(max=0), x.amax(0)  # [B]
    sum_w, sum_x = seq_sum(w), seq_sum(w * x)
    scratch, lv, prods = torch.empty_like(x), torch.empty_like(x), x.new_empty((x.shape[0], 3, x.shape[1]))
    iscale = div(float(nmax), mx - mn)
    scale = div(1.0, iscale)
    levels = _affine_levels(x, mn, iscale, nmax, torch.empty_like(x))
    best = _weighted_sq_error(w, scale, levels, mn, x, scratch)
    cur_min = mn
    for step in range(nstep + 1):
        grid = float(_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax))
        _affine_levels(x, cur_min, div(grid, mx - cur_min), nmax, lv)
        this_scale, this_min, err = _qkx2_candidate(x, w, lv, sum_w, sum_x, prods, scratch)
        better = err < best  # False where err is NaN (singular system)
        torch.where(better, lv, levels, out=levels)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        cur_min = torch.where(better, this_min, cur_min)
    flat = mx == mn
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    levels.masked_fill_(flat, 0)
    return scale, torch.where(flat, mn, cur_min).neg(), levels


def _qx_candidate(
    x: Tensor, wx: Tensor, w: Tensor, iscale: Tensor, nmax: int, lv: Tensor, prods: Tensor
) -> tuple[Tensor, Tensor]:
    """Levels in [-nmax, nmax-1] for one ``iscale`` (into ``lv``) and ``sum (w*x)*l``, ``sum (w*l)*l``."""
    torch.mul(iscale, x, out=lv)
    lv.round_().clamp_(-nmax, nmax - 1)
    torch.mul(wx, lv, out=prods[:, 0])  # prods: [n, 2, B]
    torch.mul(w, lv, out=prods[:, 1])
    prods[:, 1].mul_(lv)
    sumlx, suml2 = seq_sum(prods)
    return sumlx, suml2


def make_qx_quants(x: Tensor, nmax: int, w: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric search of ggml ``make_qx_quants`` (``rmse_type = 1``), per block.

    ``x``: float32 ``[n, B]``; ``w``: error weights (default ``x*x``; the imatrix path passes its own).
    Returns ``scale [B]`` and stored levels ``L`` float32 ``[n, B]`` in [0, 2*nmax-1] (``x ~ scale*(L-nmax)``);
    an all-zero block (``amax < 1e-15``) gives scale 0 and L = 0.
    """
    w = x * x if w is None else w
    wx, lv, prods = w * x, torch.empty_like(x), x.new_empty((x.shape[0], 2, x.shape[1]))
    mx = signed_absmax(x, 0)  # [B]
    sumlx, suml2 = _qx_candidate(x, wx, w, div(float(-nmax), mx), nmax, lv, prods)
    levels = lv + nmax
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        numerator = -(_F32(nmax) + _F32(0.1) * _F32(step))
        sumlx, suml2 = _qx_candidate(x, wx, w, div(float(numerator), mx), nmax, lv, prods)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        torch.where(better, lv + nmax, levels, out=levels)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    zero = mx.abs() < GROUP_MAX_EPS
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, levels.masked_fill_(zero, 0)


def _qp_error(x: Tensor, w: Tensor, scale: Tensor, levels: Tensor) -> Tensor:
    """``sum_i (w_i*(x_i - scale*l_i)) * (x_i - scale*l_i)`` in C order: ``[n, S]`` -> ``[S]``."""
    diff = x - scale * levels
    return seq_sum(w * diff * diff)


def make_qp_quants(x: Tensor, nmax: int, w: Tensor) -> tuple[Tensor, Tensor]:
    """ggml ``make_qp_quants``: non-negative values ``x`` ``[n, S]`` -> (scale ``[S]``, levels ``[n, S]`` in [0, nmax]).

    An ``iscale`` search over ``(nmax + 0.1*is)/max``, is in [-4, 4], then up to five passes of
    coordinate descent over the elements in order, each step kept only if it raises ``sumlx^2/suml2``.
    """
    mx = x.amax(0)
    mx = torch.where(mx > 0, mx, torch.zeros_like(mx))  # C: MAX(max, x[i]) from 0
    iscale = div(float(nmax), mx)
    best = _qp_error(x, w, div(1.0, iscale), nearest_int(iscale * x))
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_is = div(float(_F32(0.1) * _F32(step) + _F32(nmax)), mx)
        err = _qp_error(x, w, div(1.0, iscale_is), nearest_int(iscale_is * x).clamp_(max=nmax))
        better = err < best
        best = torch.where(better, err, best)
        iscale = torch.where(better, iscale_is, iscale)
    levels = nearest_int(iscale * x).clamp_(max=nmax)
    wx = w * x
    sumlx, suml2 = seq_sum(wx * levels), seq_sum(w * levels * levels)
    for _ in range(5):  # a pass without a change leaves the state as it was, so no early exit is needed
        for i in range(x.shape[0]):
            li = levels[i]
            slx, sl2 = sumlx - wx[i] * li, suml2 - w[i] * li * li
            new_l = nearest_int(x[i] * sl2 / slx).clamp_(max=nmax)
            slx_new, sl2_new = slx + wx[i] * new_l, sl2 + w[i] * new_l * new_l
            take = (slx > 0) & (sl2 > 0) & (new_l != li) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            levels[i] = torch.where(take, new_l, li)
            sumlx, suml2 = torch.where(take, slx_new, sumlx), torch.where(take, sl2_new, suml2)
    zero = mx < GROUP_MAX_EPS
    scale = torch.where((suml2 > 0) & ~zero, sumlx / suml2, torch.zeros_like(sumlx))
    return scale, levels.masked_fill_(zero, 0)


# ---- Q4_K / Q5_K -----------------------------------------------------------------------------


def _superblocks(w: Tensor) -> Tensor:
    """float ``[rows, cols]`` -> float32 ``[rows, cols // 256, 256]``."""
    rows, cols = w.shape
    if cols % QK_K:
        raise ValueError(f"row length {cols} is not a multiple of the K-quant block size {QK_K}")
    return w.to(torch.float32).reshape(rows, cols // QK_K, QK_K)


def _ref_weights(x: Tensor) -> Tensor:
    """Q4_K/Q5_K ref weights ``av_x + |x_i|`` with ``av_x = sqrtf(sum x^2 / 32)``: ``[32, B]`` -> ``[32, B]``."""
    av_x = sqrt_f32(seq_sum(x * x) / 32)
    return av_x + x.abs()


def _quantize_6bit(values: Tensor) -> tuple[Tensor, Tensor]:
    """Sub-block scales (or mins) ``[S, 8]`` -> (6-bit codes uint8, fp16 super-scale ``max/63``)."""
    vmax = values.amax(-1)
    vmax = torch.where(vmax > 0, vmax, torch.zeros_like(vmax))  # C: starts at +0, `if (v > max) max = v`
    inv = torch.where(vmax > 0, div(63.0, vmax), torch.zeros_like(vmax))
    codes = to_uint8_wrap(nearest_int(inv.unsqueeze(-1) * values)).clamp_(max=63)
    return codes, (vmax / 63).to(torch.float16)


def _requantize_affine(x: Tensor, levels: Tensor, d: Tensor, dmin: Tensor, sc: Tensor, m: Tensor, nmax: int) -> Tensor:
    """``L = clamp(nearest_int((x + dmin*m)/(d*sc)), 0, nmax)``; sub-blocks with ``d*sc == 0`` keep ``levels``.

    ``x``, ``levels``: ``[S, 8, 32]``; ``d``, ``dmin``: fp16 ``[S]``; ``sc``, ``m``: uint8 ``[S, 8]``.
    """
    dq = (d.to(torch.float32).unsqueeze(-1) * sc.to(torch.float32)).unsqueeze(-1)  # [S, 8, 1]
    dm = (dmin.to(torch.float32).unsqueeze(-1) * m.to(torch.float32)).unsqueeze(-1)
    lv = nearest_int((x + dm) / dq).clamp_(0, nmax)
    return torch.where(dq != 0, lv, levels)


def _column_weights(qw: Tensor, rows: int, n: int) -> Tensor:
    """Per-column importance ``[cols]`` -> element-major ``[n, rows*cols/n]`` matching ``x.reshape(-1, n).T``."""
    return qw.to(torch.float32).reshape(-1, n).T.repeat(1, rows)


def _imatrix_weights(xs: Tensor, xt: Tensor, qw: Tensor) -> Tensor:
    """``_impl`` weights ``qw_i * sqrtf(sigma2 + x_i^2)``, ``sigma2 = 2*sum(x^2)/256`` per super-block: ``[32, B]``."""
    flat = xs.reshape(-1, QK_K).T  # [256, S]
    sigma2 = (2 * seq_sum(flat * flat)) / QK_K  # [S]
    sigma2 = sigma2.repeat_interleave(QK_K // 32)  # [B]
    return _column_weights(qw, xs.shape[0], 32) * sqrt_f32(xt * xt + sigma2)


def choose_qk_affine(
    w: Tensor, nmax: int, search: tuple[float, float, int], quant_weights: Tensor | None = None
) -> tuple[Tensor, ...]:
    """Q4_K (nmax 15) / Q5_K (nmax 31) choice for float ``[rows, cols]``, as ``quantize_row_q*_K_ref``.

    ``search`` = ``(rmin, rdelta, nstep)`` of the reference path. With per-column ``quant_weights``
    (an imatrix) it follows ``quantize_row_q*_K_impl`` instead: weights ``qw*sqrt(sigma2 + x^2)``, the
    ``(-0.9, 0.05, 36)`` grid, and ``make_qp_quants`` for the 6-bit scales and mins.
    Returns ``d``, ``dmin`` fp16 ``[rows, nsb]``, ``sc``, ``m`` uint8 ``[rows, nsb, 8]`` (6-bit) and codes
    ``q`` uint8 ``[rows, nsb, 256]`` in [0, nmax]; ``x ~ d*sc_j*q - dmin*m_j``.
    """
    xs = _superblocks(w)  # [R, nsb, 256]
    rows, nsb = xs.shape[:2]
    xt = xs.reshape(-1, 32).T.contiguous()  # [32, B], B = R*nsb*8
    if quant_weights is None:
        scale, the_min, levels = make_qkx2_quants(xt, _ref_weights(xt), nmax, *search)
        sc, d = _quantize_6bit(scale.reshape(-1, 8))  # [S, 8], [S]
        m, dmin = _quantize_6bit(the_min.reshape(-1, 8))
    else:
        wt = _imatrix_weights(xs, xt, quant_weights)
        scale, the_min, levels = make_qkx2_quants(xt, wt, nmax, -0.9, 0.05, 36)
        sw = seq_sum(wt).reshape(-1, 8).T  # [8, S]
        d_block, ls = make_qp_quants(scale.reshape(-1, 8).T.contiguous(), 63, sw)
        m_block, lm = make_qp_quants(the_min.reshape(-1, 8).T.contiguous(), 63, sw)
        sc, m = ls.T.to(torch.uint8).clamp_(max=63), lm.T.to(torch.uint8).clamp_(max=63)
        d, dmin = d_block.to(torch.float16), m_block.to(torch.float16)
    lv = _requantize_affine(xs.reshape(-1, 8, 32), levels.T.reshape(-1, 8, 32), d, dmin, sc, m, nmax)
    q = lv.to(torch.uint8).reshape(rows, nsb, QK_K)
    return d.reshape(rows, nsb), dmin.reshape(rows, nsb), sc.reshape(rows, nsb, 8), m.reshape(rows, nsb, 8), q


def pack_k_scales(sc: Tensor, m: Tensor) -> Tensor:
    """Eight 6-bit scales and mins ``[..., 8]`` -> the 12 ``scales`` bytes of Q4_K/Q5_K."""
    sc, m = sc.to(torch.uint8), m.to(torch.uint8)
    low = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)  # bytes 0-3
    mid = m[..., :4] | ((m[..., 4:] >> 4) << 6)  # bytes 4-7
    high = (sc[..., 4:] & 0x0F) | ((m[..., 4:] & 0x0F) << 4)  # bytes 8-11
    return torch.cat([low, mid, high], dim=-1)


def unpack_k_scales(s: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`pack_k_scales` (ggml ``get_scale_min_k4``): ``[..., 12]`` -> sc, m ``[..., 8]``."""
    low, mid, high = s[..., :4], s[..., 4:8], s[..., 8:]
    sc = torch.cat([low & 0x3F, (high & 0x0F) | ((low >> 6) << 4)], dim=-1)
    m = torch.cat([mid & 0x3F, (high >> 4) | ((mid >> 6) << 4)], dim=-1)
    return sc, m


def _gather_bits(bits: Tensor, step: int) -> Tensor:
    """0/1 uint8 ``[..., k, 32]`` -> ``[..., 32]`` with bit ``step*i`` of byte l = ``bits[..., i, l]``."""
    shifts = torch.arange(0, step * bits.shape[-2], step, dtype=torch.uint8).unsqueeze(-1)  # [k, 1]
    return (bits << shifts).sum(-2, dtype=torch.uint8)  # distinct bits: sum == or


def pack_q4_k(d: Tensor, dmin: Tensor, sc: Tensor, m: Tensor, q: Tensor) -> Tensor:
    """d, dmin ``[R, nsb]``; sc, m ``[R, nsb, 8]``; q in [0, 15] ``[R, nsb, 256]`` -> uint8 ``[R, nsb*144]``."""
    qs = pack_nibbles(q.to(torch.uint8).reshape(*q.shape[:-1], 4, 64)).flatten(-2)  # [R, nsb, 128]
    out = torch.cat([f16_bytes(d), f16_bytes(dmin), pack_k_scales(sc, m), qs], dim=-1)
    return out.reshape(out.shape[0], -1)


def pack_q5_k(d: Tensor, dmin: Tensor, sc: Tensor, m: Tensor, q: Tensor) -> Tensor:
    """As :func:`pack_q4_k` with q in [0, 31] -> uint8 ``[R, nsb*176]``."""
    q = q.to(torch.uint8)
    qh = _gather_bits((q >> 4).reshape(*q.shape[:-1], 8, 32) & 1, 1)  # [R, nsb, 32]
    qs = pack_nibbles(q.reshape(*q.shape[:-1], 4, 64)).flatten(-2)
    out = torch.cat([f16_bytes(d), f16_bytes(dmin), pack_k_scales(sc, m), qh, qs], dim=-1)
    return out.reshape(out.shape[0], -1)


def _dequantize_affine_k(d: Tensor, dmin: Tensor, scales: Tensor, q: Tensor) -> Tensor:
    """``x = (d*sc_j)*q - dmin*m_j`` for fp16 bytes d, dmin ``[R, nsb, 2]`` and codes ``[R, nsb, 256]``."""
    sc, m = unpack_k_scales(scales)  # [R, nsb, 8]
    d1 = (f16_from_bytes(d).unsqueeze(-1) * sc.to(torch.float32)).unsqueeze(-1)  # [R, nsb, 8, 1]
    m1 = (f16_from_bytes(dmin).unsqueeze(-1) * m.to(torch.float32)).unsqueeze(-1)
    x = d1 * q.reshape(*q.shape[:-1], 8, 32).to(torch.float32) - m1
    return x.reshape(x.shape[0], -1)


def dequantize_q4_k(raw: Tensor) -> Tensor:
    """uint8 ``[rows, nsb*144]`` -> float32 ``[rows, nsb*256]``."""
    d, dmin, scales, qs = split_bytes(raw, 144, [2, 2, 12, 128])
    q = unpack_nibbles(qs.reshape(*qs.shape[:-1], 4, 32)).flatten(-2)  # [R, nsb, 256]
    return _dequantize_affine_k(d, dmin, scales, q)


def dequantize_q5_k(raw: Tensor) -> Tensor:
    """uint8 ``[rows, nsb*176]`` -> float32 ``[rows, nsb*256]``."""
    d, dmin, scales, qh, qs = split_bytes(raw, 176, [2, 2, 12, 32, 128])
    low = unpack_nibbles(qs.reshape(*qs.shape[:-1], 4, 32)).flatten(-2)  # [R, nsb, 256]
    high = (qh.unsqueeze(-2) >> torch.arange(8, dtype=torch.uint8).unsqueeze(-1)) & 1  # [R, nsb, 8, 32]
    return _dequantize_affine_k(d, dmin, scales, low | (high.flatten(-2) << 4))


def quantize_q4_k(w: Tensor, quant_weights: Tensor | None = None) -> Tensor:
    """float ``[rows, cols]`` -> Q4_K bytes (``quantize_q4_K``: ref path, or ``_impl`` with an imatrix)."""
    return pack_q4_k(*choose_qk_affine(w, 15, (-1.0, 0.1, 20), quant_weights))


def quantize_q5_k(w: Tensor, quant_weights: Tensor | None = None) -> Tensor:
    """float ``[rows, cols]`` -> Q5_K bytes (``quantize_q5_K``: ref path, or ``_impl`` with an imatrix)."""
    return pack_q5_k(*choose_qk_affine(w, 31, (-0.5, 0.1, 15), quant_weights))


# ---- Q6_K ------------------------------------------------------------------------------------


def choose_q6_k(w: Tensor, quant_weights: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Q6_K choice for float ``[rows, cols]`` (``quantize_row_q6_K_ref``; ``_impl`` with ``quant_weights``).

    The imatrix path differs only in the error weights of ``make_qx_quants``: ``qw`` instead of ``x*x``.

    Returns ``d`` fp16 ``[rows, nsb]``, ``sc`` int8 ``[rows, nsb, 16]`` and codes ``q`` uint8
    ``[rows, nsb, 256]`` in [0, 63]; ``x ~ d*sc_j*(q-32)``. A super-block whose sub-block scales are all
    below 1e-15 in magnitude is all zero bytes (d = 0, sc = 0, q = 0).
    """
    xs = _superblocks(w)  # [R, nsb, 256]
    rows, nsb = xs.shape[:2]
    xt = xs.reshape(-1, 16).T.contiguous()  # [16, B]
    qw = None if quant_weights is None else _column_weights(quant_weights, rows, 16)
    scale, levels = make_qx_quants(xt, 32, qw)
    scales = scale.reshape(-1, 16)  # [S, 16]
    smax = signed_absmax(scales, -1)  # [S]
    zero = smax.abs() < GROUP_MAX_EPS
    iscale = div(-128.0, smax)
    d = div(1.0, iscale).to(torch.float16)
    sc = nearest_int(iscale.unsqueeze(-1) * scales).clamp_(max=127)
    sc = ((sc.to(torch.int64) + 128) & 0xFF) - 128  # C int8_t conversion
    dq = (d.to(torch.float32).unsqueeze(-1) * sc.to(torch.float32)).unsqueeze(-1)  # [S, 16, 1]
    lv = nearest_int(xs.reshape(-1, 16, 16) / dq).clamp_(-32, 31) + 32
    lv = torch.where(dq != 0, lv, levels.T.reshape(-1, 16, 16))
    d = torch.where(zero, torch.zeros_like(d), d)
    sc = torch.where(zero.unsqueeze(-1), torch.zeros_like(sc), sc).to(torch.int8)
    lv = torch.where(zero.reshape(-1, 1, 1), torch.zeros_like(lv), lv)
    return d.reshape(rows, nsb), sc.reshape(rows, nsb, 16), lv.to(torch.uint8).reshape(rows, nsb, QK_K)


def pack_q6_k(d: Tensor, sc: Tensor, q: Tensor) -> Tensor:
    """d ``[R, nsb]``, sc int8 ``[R, nsb, 16]``, q in [0, 63] ``[R, nsb, 256]`` -> uint8 ``[R, nsb*210]``."""
    q = q.to(torch.uint8)
    halves = q.reshape(*q.shape[:-1], 2, 128)
    ql = pack_nibbles(halves).flatten(-2)  # [R, nsb, 128]
    qh = _gather_bits((halves >> 4).reshape(*q.shape[:-1], 2, 4, 32) & 3, 2).flatten(-2)  # [R, nsb, 64]
    out = torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), f16_bytes(d)], dim=-1)
    return out.reshape(out.shape[0], -1)


def dequantize_q6_k(raw: Tensor) -> Tensor:
    """uint8 ``[rows, nsb*210]`` -> float32 ``[rows, nsb*256]``: ``x = (d*sc_j)*(q-32)``."""
    ql, qh, scales, d = split_bytes(raw, 210, [128, 64, 16, 2])
    low = unpack_nibbles(ql.reshape(*ql.shape[:-1], 2, 64))  # [R, nsb, 2, 128]
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8).unsqueeze(-1)  # [4, 1]
    high = (qh.reshape(*qh.shape[:-1], 2, 1, 32) >> shifts) & 3  # [R, nsb, 2, 4, 32]
    q = (low | (high.flatten(-2) << 4)).to(torch.float32) - 32  # [R, nsb, 2, 128]
    dl = f16_from_bytes(d).unsqueeze(-1) * scales.contiguous().view(torch.int8).to(torch.float32)  # [R, nsb, 16]
    x = dl.unsqueeze(-1) * q.reshape(*q.shape[:-2], 16, 16)
    return x.reshape(x.shape[0], -1)


def quantize_q6_k(w: Tensor, quant_weights: Tensor | None = None) -> Tensor:
    """float ``[rows, cols]`` -> Q6_K bytes (``quantize_q6_K``: ref path, or ``_impl`` with an imatrix)."""
    return pack_q6_k(*choose_q6_k(w, quant_weights))
