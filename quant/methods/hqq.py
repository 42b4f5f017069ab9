"""Half-quadratic quantization (HQQ): calibration-free proximal refinement of the qparams.

Algorithm (mobiusml/hqq ``hqq/core/optimize.py`` ``optimize_weights_proximal_legacy``; survey
../shared/spec/QUANT_FORMATS.md §2.2): starting from min/max qparams, alternate

    q  = round(clamp(w/s + z))            x̂ = (q - z)·s
    e  = shrink_lp(w - x̂, β, p)           (the sparse, heavy-tailed part of the error)
    z  = mean(q - (w - e)/s)              (asymmetric: only the zero-point moves, s stays min/max)

with ``p = 0.7, β = 10, β ← 1.01·β`` and a per-group early stop as soon as ``mean|w - x̂|``
stops improving (the best iterate is kept). For symmetric specs there is no zero-point, so the
same step refits the scale instead: ``s = argmin Σ (w - e - s·q)²``.

Projection onto the compressed-tensors layout (integer zero-point, ``quant/qparams.py``):
HQQ's float zero is rounded to an integer code, the scale is refit by (importance-weighted)
least squares to the resulting codes, and a group keeps the min/max start wherever that has the
lower weighted squared error. Vectorized over all groups; the loop is over the ≤ 20 iterations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quant.methods.mse import group_weights, lsq_scale, sq_err
from quant.methods.registry import ROW_CHUNK, by_row_chunks, register_quantizer
from quant.qparams import finish_scale, group_len, grouped, qrange, quantize, scale_dtype_for
from quant.spec import QuantSpec

_TINY = 1e-30


def shrink_lp(x: Tensor, beta: float, p: float) -> Tensor:
    """Generalized soft-threshold ``sign(x)·relu(|x| - |x|^(p-1)/β)`` (0 stays 0)."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.pow(p - 1) / beta)


def _codes(x: Tensor, s: Tensor, z: Tensor, bits: int) -> Tensor:
    """Float codes ``round(clamp(x/s + z))``, ``x [out, G, g]``, ``s, z [out, G]``."""
    qmin, qmax = qrange(bits)
    return torch.round(torch.clamp(x / s[..., None] + z[..., None], qmin, qmax))


def _proximal(
    x: Tensor, s: Tensor, z: Tensor, bits: int, symmetric: bool,
    iters: int, p: float, beta: float, kappa: float,
) -> tuple[Tensor, Tensor]:
    """HQQ iterations on float ``(s, z)`` ``[out, G]``; returns the best iterate per group."""
    best_err, best_s, best_z = torch.full_like(s, float("inf")), s, z
    active = torch.ones_like(s, dtype=torch.bool)
    for _ in range(iters):
        q = _codes(x, s, z, bits)                                            # [out, G, g]
        err = (x - (q - z[..., None]) * s[..., None]).abs().mean(-1)         # [out, G]
        active = active & (err < best_err)
        best_err = torch.where(active, err, best_err)
        best_s, best_z = torch.where(active, s, best_s), torch.where(active, z, best_z)
        if not bool(active.any()):
            break
        target = x - shrink_lp(x - (q - z[..., None]) * s[..., None], beta, p)
        if symmetric:
            s_new = lsq_scale(target, q, None)
            s = torch.where(active & (s_new > 0), s_new, s)
        else:
            z = torch.where(active, (q - target / s[..., None]).mean(-1), z)
        beta *= kappa
    return best_s, best_z


def _project(x: Tensor, wt: Tensor | None, s: Tensor, z: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Integer zero, least-squares scale for its codes, and the weighted error ``[out, G]``."""
    qmin, qmax = qrange(bits)
    z = torch.round(torch.clamp(z, qmin, qmax))
    d = _codes(x, s, z, bits) - z[..., None]
    s_fit = lsq_scale(x, d, wt)
    s = torch.where(s_fit > 0, s_fit, s)
    return s, z, sq_err(x, s[..., None] * d, wt)


@register_quantizer("hqq")
def hqq(
    w: Tensor, spec: QuantSpec, *, hessian: Tensor | None = None, importance: Tensor | None = None,
    scale_dtype: torch.dtype | None = None, iters: int = 20, lp_norm: float = 0.7,
    beta: float = 10.0, kappa: float = 1.01, row_chunk: int = ROW_CHUNK,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """HQQ qparams in the integer zero-point layout; never worse than min/max per group (weighted L2)."""
    if w.shape[0] > row_chunk:
        opts = dict(scale_dtype=scale_dtype, iters=iters, lp_norm=lp_norm, beta=beta, kappa=kappa)
        return by_row_chunks(hqq, w, spec, importance, row_chunk, **opts)
    qmin, qmax = qrange(spec.bits)
    g = group_len(w.shape[1], spec.group_size)
    x = grouped(w, g)                                                        # [out, G, g]
    wt = group_weights(importance, tuple(w.shape), g)
    mn, mx = x.amin(-1).clamp(max=0.0), x.amax(-1).clamp(min=0.0)
    if spec.symmetric:
        s0, z0 = (torch.maximum(-mn, mx) / ((qmax - qmin) / 2)).clamp_min(_TINY), torch.zeros_like(mn)
    else:
        s0 = ((mx - mn) / (qmax - qmin)).clamp_min(_TINY)
        z0 = torch.clamp(qmin - mn / s0, qmin, qmax)
    s1, z1 = _proximal(x, s0, z0, spec.bits, spec.symmetric, iters, lp_norm, beta, kappa)
    s1, z1, err1 = _project(x, wt, s1, z1, spec.bits)
    z0 = torch.round(z0)
    err0 = sq_err(x, s0[..., None] * (_codes(x, s0, z0, spec.bits) - z0[..., None]), wt)
    keep = err1 < err0
    s, z = torch.where(keep, s1, s0), torch.where(keep, z1, z0)
    scale = finish_scale(s, scale_dtype or scale_dtype_for(w.dtype))
    zero = None if spec.symmetric else z.to(torch.int8)
    return quantize(w, scale, zero, spec.bits), scale, zero
