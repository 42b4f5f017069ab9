"""GGUF K-quants Q2_K and Q3_K: llama.cpp's quantizers, vectorized, and the dequantizers.

Layout contract (``ggml-common.h``; super-blocks of 256 along the contiguous row, little-endian), both
with sixteen 16-element sub-blocks j and 2-bit low codes packed as: per 128-element half h, bits
``2k, 2k+1`` of ``qs[32h + l]`` hold element ``128h + 32k + l`` (k = 0..3, l < 32):

* Q2_K (84 B): ``u8 scales[16] | u8 qs[64] | fp16 d | fp16 dmin``; ``scales[j] = sc_j | m_j << 4`` (4 bits
  each), ``x = d*sc_j*q - dmin*m_j``, q in [0, 3].
* Q3_K (110 B): ``u8 hmask[32] | u8 qs[64] | u8 scales[12] | fp16 d``; 6-bit ``ls_j``, ``x = d*(ls_j-32)*(q-4)``,
  q in [0, 7]: its low two bits in ``qs``, bit 2 of element e in bit ``e // 32`` of ``hmask[e % 32]``. The low
  nibble of ``ls_j`` is nibble ``j // 8`` of ``scales[j % 8]``, its top two bits are bits ``2(j // 4)`` of
  ``scales[8 + j % 4]``.

The quantizers follow ``quantize_q2_K`` / ``quantize_q3_K`` of ggml-quants.c: without importance weights
``quantize_row_q2_K_ref`` (``make_qkx2_quants`` with weights ``|x|`` and absolute error, 4-bit RTN of the
sub-block scales and mins against ``max/15``) and ``quantize_row_q3_K_ref`` (``make_q3_quants``: RTN, then
five passes of coordinate descent; 6-bit scales against ``-max/32``); with per-column ``quant_weights``
``quantize_row_q2_K_impl`` (``make_qkx3_quants`` weighted by ``qw*sqrtf(sigma2 + x²)``, ``make_qp_quants``
for the scales and mins) and ``quantize_row_q3_K_impl`` (``make_qx_quants`` twice). Every float32
operation is the C one in the same order, as in :mod:`quant.gguf_kquants`: sums left to right,
divisions kept, correctly rounded square roots, no fused multiply-adds, scales rounded to fp16 before the
final re-quantization. ``nearest_int`` is ggml's bit trick (:func:`nearest_int`), so values past its
assert (|v| > 4194303, compiled out in release builds) give C's codes too.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from quant.gguf_kquants import (
    GROUP_MAX_EPS,
    QK_K,
    div,
    make_qx_quants,
    seq_sum,
    sqrt_f32,
)
from quant.gguf_legacy import f16_bytes, f16_from_bytes, split_bytes

SUB = 16
"""Elements per sub-block (both types)."""
_MAGIC = 12582912.0  # 1.5 * 2**23: adding it leaves the rounded integer in the low mantissa bits


def nearest_int(v: Tensor) -> Tensor:
    """ggml ``nearest_int`` of float32 ``v``, as float32: ``(bits(v + 12582912.f) & 0x7fffff) - 0x400000``.

    Round half to even for |v| <= 4194303 (what ``torch.round`` gives); beyond, and for inf / NaN (NaN
    gives 0), the same out-of-range integers as C, whose ``assert`` on the range is compiled out.
    """
    bits = (v + _MAGIC).view(torch.int32)
    return ((bits & 0x7FFFFF) - 0x400000).to(torch.float32)


def _wrap(v: Tensor, signed: bool = False) -> Tensor:
    """C conversion of an integral float32 to ``uint8_t`` (or ``int8_t``): modulo 256, as int64."""
    u = v.to(torch.int64) & 0xFF
    return ((u + 128) & 0xFF) - 128 if signed else u


def _superblocks(w: Tensor) -> Tensor:
    """float ``[rows, cols]`` -> float32 ``[rows, cols // 256, 256]``."""
    rows, cols = w.shape
    if cols % QK_K:
        raise ValueError(f"row length {cols} is not a multiple of the K-quant block size {QK_K}")
    return w.to(torch.float32).reshape(rows, cols // QK_K, QK_K)


def imatrix_weights(xs: Tensor, xt: Tensor, qw: Tensor, scale: float) -> Tensor:
    """``qw_i * sqrtf(sigma2 + x_i²)`` with ``sigma2 = (scale*Σx²)/256`` per super-block (Q2_K: scale 1,
    Q3_K: 2): ``xs [R, nsb, 256]``, element-major ``xt [16, B]`` -> ``[16, B]``."""
    flat = xs.reshape(-1, QK_K).T  # [256, S]
    sumx2 = seq_sum(flat * flat)  # [S]
    sigma2 = (sumx2 * scale if scale != 1 else sumx2) / QK_K
    qwt = qw.to(torch.float32).reshape(-1, SUB).T.repeat(1, xs.shape[0])  # [16, B]
    return qwt * sqrt_f32(xt * xt + sigma2.repeat_interleave(QK_K // SUB))


# ---- Q2_K ------------------------------------------------------------------------------------


def _error(w: Tensor, scale: Tensor, levels: Tensor, offset: Tensor, x: Tensor, mad: bool) -> Tensor:
    """``sum_i w_i * e_i`` in C order, ``e = |d|`` (``mad``) or ``d*d``, ``d = scale*l_i + offset - x_i``:
    ``[n, B]`` -> ``[B]``."""
    d = (levels * scale).add_(offset).sub_(x)
    return seq_sum((d.abs_() if mad else d.mul_(d)).mul_(w))


def make_qkx_quants(
    x: Tensor, w: Tensor, nmax: int, grid: tuple[float, float, int], mad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """ggml ``make_qkx2_quants`` (``mad``: absolute error) / ``make_qkx3_quants`` (squared error), per block.

    ``x``, ``w``: float32 ``[n, B]`` (element-major); ``grid = (rmin, rdelta, nstep)``. Returns ``scale [B]``,
    ``the_min [B]`` (the value subtracted) and levels float32 ``[n, B]`` in [0, nmax], ``x ~ scale*L - the_min``.
    Each candidate grid is built from the best min found so far, as in C.
    """
    rmin, rdelta, nstep = grid
    mn, mx = x.amin(0), x.amax(0)
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)  # C: if (min > 0) min = 0
    sum_w, sum_x = seq_sum(w), seq_sum(w * x)
    iscale = div(float(nmax), mx - mn)
    scale = div(1.0, iscale)
    levels = nearest_int(iscale * (x - mn)).clamp_(0, nmax)
    best = _error(w, scale, levels, mn, x, mad)
    cur_min = mn
    for step in range(nstep + 1):
        g = float(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax))
        lv = nearest_int(div(g, mx - cur_min) * (x - cur_min)).clamp_(0, nmax)
        wl = w * lv
        sum_l, sum_l2, sum_xl = seq_sum(wl), seq_sum(wl * lv), seq_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clip = this_min > 0
        this_scale = torch.where(clip, sum_xl / sum_l2, this_scale)
        this_min = torch.where(clip, torch.zeros_like(this_min), this_min)
        err = _error(w, this_scale, lv, this_min, x, mad)
        better = (det > 0) & (err < best)  # False where err is NaN
        levels = torch.where(better, lv, levels)
        best = torch.where(better, err, best)
        scale, cur_min = torch.where(better, this_scale, scale), torch.where(better, this_min, cur_min)
    flat = mx == mn
    return torch.where(flat, 0.0, scale), -torch.where(flat, mn, cur_min), levels.masked_fill_(flat, 0)


def _quantize_4bit(values: Tensor) -> tuple[Tensor, Tensor]:
    """Sub-block scales (or mins) ``[S, 16]`` -> (codes ``nearest_int(15/max * v)`` int64, fp16 ``max/15``);
    ``max`` over the positive values (C: from 0, ``if (v > max)``), codes 0 and d 0 where there are none."""
    vmax = torch.where(values > 0, values, 0.0).amax(-1)  # [S]
    codes = nearest_int(div(15.0, vmax).unsqueeze(-1) * values).to(torch.int64)
    return torch.where((vmax > 0).unsqueeze(-1), codes, 0), torch.where(vmax > 0, vmax / 15, 0.0).to(torch.float16)


def _wsq(w: Tensor, x: Tensor, scale: Tensor, levels: Tensor) -> Tensor:
    """``sum_i (w_i*d_i)*d_i``, ``d = x_i - scale*l_i``, in C order: ``[n, S]`` -> ``[S]``."""
    d = x - scale * levels
    return seq_sum(w * d * d)


def make_qp_quants(x: Tensor, nmax: int, w: Tensor) -> tuple[Tensor, Tensor]:
    """ggml ``make_qp_quants``, its ``uint8_t L[]`` included: ``x``, ``w`` ``[n, S]`` -> (scale ``[S]``, the
    stored levels int64 ``[n, S]`` in [0, 255]).

    A search over ``iscale = (nmax + 0.1*is)/max``, is in [-4, 4], then up to five passes of coordinate
    descent, each step kept only if it raises ``sumlx²/suml2``. A negative ``x`` (a sub-block scale the
    least-squares fit made negative) gives a negative level, which C stores modulo 256 in ``L`` and then
    reads back as such; the sums use the unwrapped value where C does. ``max`` is C's
    ``MAX(max, x_i)`` from 0.
    """
    mx = torch.zeros_like(x[0])
    for xi in x:
        mx = torch.where(mx > xi, mx, xi)
    iscale = div(float(nmax), mx)
    best = _wsq(w, x, div(1.0, iscale), nearest_int(iscale * x).to(torch.int64).bitwise_and_(0xFF))
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_is = div(float(np.float32(0.1) * np.float32(step) + np.float32(nmax)), mx)
        err = _wsq(w, x, div(1.0, iscale_is), nearest_int(iscale_is * x).clamp_(max=nmax))
        better = err < best
        best, iscale = torch.where(better, err, best), torch.where(better, iscale_is, iscale)
    lv = nearest_int(iscale * x).clamp_(max=nmax)  # [n, S], the int l of C (may be negative)
    wx = w * x
    sumlx, suml2 = seq_sum(wx * lv), seq_sum(w * lv * lv)
    stored = lv.to(torch.int64) & 0xFF  # L[i] = l
    for _ in range(5):
        for i in range(x.shape[0]):
            li = stored[i].to(torch.float32)
            slx, sl2 = sumlx - wx[i] * li, suml2 - w[i] * li * li
            new_l = nearest_int(x[i] * sl2 / slx).clamp_(max=nmax)
            slx_new, sl2_new = slx + wx[i] * new_l, sl2 + w[i] * new_l * new_l
            take = (slx > 0) & (sl2 > 0) & (new_l != li) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            stored[i] = torch.where(take, new_l.to(torch.int64) & 0xFF, stored[i])
            sumlx, suml2 = torch.where(take, slx_new, sumlx), torch.where(take, sl2_new, suml2)
    zero = mx < GROUP_MAX_EPS  # C returns 0 with L = 0 before the search
    return torch.where((suml2 > 0) & ~zero, sumlx / suml2, 0.0), stored.masked_fill_(zero, 0)


def choose_q2_k(w: Tensor, quant_weights: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Q2_K choice for float ``[rows, cols]``: ``quantize_row_q2_K_ref``, or ``_impl`` with ``quant_weights``.

    Returns ``d``, ``dmin`` fp16 ``[rows, nsb]``, the ``scales`` bytes uint8 ``[rows, nsb, 16]`` and codes
    uint8 ``[rows, nsb, 256]`` in [0, 3].
    """
    xs = _superblocks(w)  # [R, nsb, 256]
    rows, nsb = xs.shape[:2]
    xt = xs.reshape(-1, SUB).T.contiguous()  # [16, B], B = R*nsb*16
    if quant_weights is None:
        scale, the_min, levels = make_qkx_quants(xt, xt.abs(), 3, (-0.5, 0.1, 15), mad=True)
        ls, d = _quantize_4bit(scale.reshape(-1, SUB))  # [S, 16], [S]
        lm, dmin = _quantize_4bit(the_min.reshape(-1, SUB))
    else:
        wt = imatrix_weights(xs, xt, quant_weights, 1.0)
        scale, the_min, levels = make_qkx_quants(xt, wt, 3, (-0.9, 0.05, 36), mad=False)
        sw = seq_sum(wt).reshape(-1, SUB).T  # [16, S]
        d, ls = make_qp_quants(scale.reshape(-1, SUB).T.contiguous(), 15, sw)
        dmin, lm = make_qp_quants(the_min.reshape(-1, SUB).T.contiguous(), 15, sw)
        ls, lm, d, dmin = ls.T, lm.T, d.to(torch.float16), dmin.to(torch.float16)
    scales = (ls & 0xFF) | ((lm << 4) & 0xFF)  # [S, 16]: C stores sc, then |= m << 4 into the uint8
    dq = d.to(torch.float32).unsqueeze(-1) * (scales & 0xF).to(torch.float32)  # [S, 16]
    dm = dmin.to(torch.float32).unsqueeze(-1) * (scales >> 4).to(torch.float32)
    x = xs.reshape(-1, SUB, SUB)  # [S, 16, 16]
    lv = nearest_int((x + dm.unsqueeze(-1)) / dq.unsqueeze(-1)).clamp_(0, 3)
    lv = torch.where((dq != 0).unsqueeze(-1), lv, levels.T.reshape(-1, SUB, SUB))  # C: if (!d) continue
    shape = (rows, nsb)
    scales, codes = scales.to(torch.uint8).reshape(*shape, SUB), lv.to(torch.uint8).reshape(*shape, QK_K)
    return d.reshape(shape), dmin.reshape(shape), scales, codes


def pack_2bit(q: Tensor) -> Tensor:
    """uint8 codes ``[..., 256]`` (low 2 bits used) -> ``qs [..., 64]``: per 128-element half h, bits
    ``2k, 2k+1`` of byte ``32h + l`` = element ``128h + 32k + l``."""
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8).unsqueeze(-1)  # [4, 1]
    parts = (q.to(torch.uint8).reshape(*q.shape[:-1], 2, 4, 32) & 3) << shifts  # [..., 2, 4, 32]
    return parts.sum(-2, dtype=torch.uint8).flatten(-2)  # distinct bits: sum == or


def unpack_2bit(qs: Tensor) -> Tensor:
    """Inverse of :func:`pack_2bit`: ``[..., 64]`` -> ``[..., 256]``."""
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8).unsqueeze(-1)  # [4, 1]
    return ((qs.reshape(*qs.shape[:-1], 2, 1, 32) >> shifts) & 3).flatten(-3)


def pack_q2_k(d: Tensor, dmin: Tensor, scales: Tensor, q: Tensor) -> Tensor:
    """d, dmin ``[R, nsb]``; scales ``[R, nsb, 16]``; q in [0, 3] ``[R, nsb, 256]`` -> uint8 ``[R, nsb*84]``."""
    out = torch.cat([scales.to(torch.uint8), pack_2bit(q), f16_bytes(d), f16_bytes(dmin)], dim=-1)
    return out.reshape(out.shape[0], -1)


def dequantize_q2_k(raw: Tensor) -> Tensor:
    """uint8 ``[rows, nsb*84]`` -> float32 ``[rows, nsb*256]``: ``x = (d*sc_j)*q - dmin*m_j``."""
    scales, qs, d, dmin = split_bytes(raw, 84, [16, 64, 2, 2])
    dl = (f16_from_bytes(d).unsqueeze(-1) * (scales & 0xF).to(torch.float32)).unsqueeze(-1)  # [R, nsb, 16, 1]
    ml = (f16_from_bytes(dmin).unsqueeze(-1) * (scales >> 4).to(torch.float32)).unsqueeze(-1)
    q = unpack_2bit(qs).to(torch.float32).reshape(*qs.shape[:-1], SUB, SUB)
    x = dl * q - ml
    return x.reshape(x.shape[0], -1)


def quantize_q2_k(w: Tensor, quant_weights: Tensor | None = None) -> Tensor:
    """float ``[rows, cols]`` -> Q2_K bytes (``quantize_q2_K``: ref path, or ``_impl`` with an imatrix)."""
    return pack_q2_k(*choose_q2_k(w, quant_weights))


# ---- Q3_K ------------------------------------------------------------------------------------


def make_q3_quants(x: Tensor, nmax: int = 4) -> tuple[Tensor, Tensor]:
    """ggml ``make_q3_quants(n, nmax, x, L, do_rmse=true)``, per block: float32 ``x [n, B]`` -> (scale ``[B]``,
    levels float32 ``[n, B]`` in [0, 2*nmax-1]; 0 for an all-zero block, amax < 1e-15).

    RTN against ``-nmax/max``, then up to five passes of coordinate descent over the elements in order
    (weights ``x²``), each change kept only if it raises ``sumlx²/suml2``; a pass that changes nothing
    leaves the state as it was, so all five run.
    """
    mx = signed_first_absmax(x, 0)  # [B]
    lv = nearest_int(div(float(-nmax), mx) * x).clamp_(-nmax, nmax - 1)  # [n, B]
    w = x * x
    wx = w * x
    sumlx, suml2 = seq_sum(wx * lv), seq_sum(w * lv * lv)
    for _ in range(5):
        for i in range(x.shape[0]):
            li = lv[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new_l = nearest_int(x[i] * sl2 / slx).clamp_(-nmax, nmax - 1)
            slx_new, sl2_new = slx + wx[i] * new_l, sl2 + w[i] * new_l * new_l
            better = slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new
            take = (slx > 0) & (new_l != li) & (sl2_new > 0) & better
            lv[i] = torch.where(take, new_l, li)
            sumlx, suml2 = torch.where(take, slx_new, sumlx), torch.where(take, sl2_new, suml2)
    zero = mx.abs() < GROUP_MAX_EPS
    scale = torch.where((suml2 > 0) & ~zero, sumlx / suml2, 0.0)
    return scale, lv.add_(nmax).masked_fill_(zero, 0)


def signed_first_absmax(x: Tensor, dim: int) -> Tensor:
    """C's ``if (fabsf(v) > amax) { amax = fabsf(v); max = v; }`` from 0 along ``dim``: the first element
    of largest magnitude, NaNs skipped, +0.0 when none is nonzero."""
    a = x.abs()
    a = torch.where(a > 0, a, 0.0)  # NaN -> 0: never taken
    first = x.gather(dim, a.argmax(dim, keepdim=True)).squeeze(dim)  # argmax: the first maximal index
    return torch.where(a.amax(dim) > 0, first, 0.0)


def choose_q3_k(w: Tensor, quant_weights: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Q3_K choice for float ``[rows, cols]``: ``quantize_row_q3_K_ref``, or ``_impl`` with ``quant_weights``.

    Returns ``d`` fp16 ``[rows, nsb]``, 6-bit scales ``ls`` uint8 ``[rows, nsb, 16]`` (``d*(ls-32)`` per
    sub-block) and codes uint8 ``[rows, nsb, 256]`` in [0, 7] (``x ~ d*(ls_j-32)*(q-4)``).
    """
    xs = _superblocks(w)
    rows, nsb = xs.shape[:2]
    xt = xs.reshape(-1, SUB).T.contiguous()  # [16, B]
    if quant_weights is None:
        scale, levels = make_q3_quants(xt)
        scales = scale.reshape(-1, SUB)  # [S, 16]
        max_scale = signed_first_absmax(scales, -1)  # [S]
        iscale = div(-32.0, max_scale).unsqueeze(-1)
        ls = _wrap(nearest_int(iscale * scales), signed=True).clamp_(-32, 31) + 32  # int8_t l, then clamp
        ls = torch.where((max_scale != 0).unsqueeze(-1), ls, 0)  # C: if (max_scale) ... else all zero
        d = torch.where(max_scale != 0, div(1.0, iscale.squeeze(-1)), 0.0).to(torch.float16)
    else:
        wt = imatrix_weights(xs, xt, quant_weights, 2.0)
        scale, levels = make_qx_quants(xt, 4, wt)
        sw = seq_sum(wt).reshape(-1, SUB).T  # [16, S]
        d_block, ls = make_qx_quants(scale.reshape(-1, SUB).T.contiguous(), 32, sw)
        ls, d = ls.T.to(torch.int64), d_block.to(torch.float16)
    dq = (d.to(torch.float32).unsqueeze(-1) * (ls - 32).to(torch.float32)).unsqueeze(-1)  # [S, 16, 1]
    lv = nearest_int(xs.reshape(-1, SUB, SUB) / dq).clamp_(-4, 3) + 4
    lv = torch.where(dq != 0, lv, levels.T.reshape(-1, SUB, SUB))  # C: if (!d) continue
    shape = (rows, nsb)
    return d.reshape(shape), ls.to(torch.uint8).reshape(*shape, SUB), lv.to(torch.uint8).reshape(*shape, QK_K)


def pack_q3_k(d: Tensor, ls: Tensor, q: Tensor) -> Tensor:
    """d ``[R, nsb]``, ls in [0, 63] ``[R, nsb, 16]``, q in [0, 7] ``[R, nsb, 256]`` -> uint8 ``[R, nsb*110]``."""
    q, ls = q.to(torch.uint8), ls.to(torch.uint8)
    bits = torch.arange(8, dtype=torch.uint8).unsqueeze(-1)  # [8, 1]
    hmask = (((q >> 2) & 1).reshape(*q.shape[:-1], 8, 32) << bits).sum(-2, dtype=torch.uint8)  # [R, nsb, 32]
    low = ls & 0xF
    high = (ls >> 4).reshape(*ls.shape[:-1], 4, 4) << torch.arange(0, 8, 2, dtype=torch.uint8).unsqueeze(-1)
    scales = torch.cat([low[..., :8] | (low[..., 8:] << 4), high.sum(-2, dtype=torch.uint8)], dim=-1)  # [.., 12]
    out = torch.cat([hmask, pack_2bit(q), scales, f16_bytes(d)], dim=-1)
    return out.reshape(out.shape[0], -1)


def unpack_q3_scales(s: Tensor) -> Tensor:
    """The 12 ``scales`` bytes ``[..., 12]`` -> the sixteen 6-bit ``ls_j`` ``[..., 16]`` (uint8)."""
    low = torch.cat([s[..., :8] & 0xF, s[..., :8] >> 4], dim=-1)  # [..., 16]
    high = (s[..., 8:].unsqueeze(-2) >> torch.arange(0, 8, 2, dtype=torch.uint8).unsqueeze(-1)) & 3  # [.., 4, 4]
    return low | (high.flatten(-2) << 4)


def dequantize_q3_k(raw: Tensor) -> Tensor:
    """uint8 ``[rows, nsb*110]`` -> float32 ``[rows, nsb*256]``: ``x = (d*(ls_j-32)) * (q-4)``."""
    hmask, qs, scales, d = split_bytes(raw, 110, [32, 64, 12, 2])
    sc = unpack_q3_scales(scales).to(torch.float32) - 32  # [R, nsb, 16]
    dl = (f16_from_bytes(d).unsqueeze(-1) * sc).unsqueeze(-1)  # [R, nsb, 16, 1]
    high = (hmask.unsqueeze(-2) >> torch.arange(8, dtype=torch.uint8).unsqueeze(-1)) & 1  # [R, nsb, 8, 32]
    q = (unpack_2bit(qs) | (high.flatten(-2) << 2)).to(torch.float32) - 4  # [R, nsb, 256]
    x = dl * q.reshape(*q.shape[:-1], SUB, SUB)
    return x.reshape(x.shape[0], -1)


def quantize_q3_k(w: Tensor, quant_weights: Tensor | None = None) -> Tensor:
    """float ``[rows, cols]`` -> Q3_K bytes (``quantize_q3_K``: ref path, or ``_impl`` with an imatrix)."""
    return pack_q3_k(*choose_q3_k(w, quant_weights))
