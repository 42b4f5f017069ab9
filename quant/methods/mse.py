"""Per-group least-squares search of the scale (and zero-point), after llama.cpp's k-quant search.

The idea is ``make_qkx2_quants`` / ``make_qx_quants`` (ggml/src/ggml-quants.c; survey
../shared/spec/QUANT_FORMATS.md §1.2): try a grid of inverse scales around the min/max one,
round every weight with each candidate, refit the scale (and the offset) to those integer codes
in closed form by weighted least squares, and keep the candidate with the lowest weighted
squared error. Differences forced by the compressed-tensors layout ``x̂ = (q - zero) · scale``:
the zero-point is an *integer* in the code range, so the least-squares offset is rounded to an
integer and the scale refit once more with it fixed (the candidate's own integer zero-point is
tried as well); symmetric scales stay positive (no "max sign" trick).

The error of each weight is weighted by ``|x| + rms(group)`` — llama.cpp's Q4_K reference weighting
(``quantize_row_q4_K_ref``: ``av_x + fabsf(x[l])``), which keeps large weights from being clipped
for a small gain in plain MSE — times the per-column ``importance`` (mean squared input activation,
the imatrix of §1.3) when one is given. Measured on the trained fixture, this is what makes the
search lower the model's KL divergence and not just the weights' MSE.

All groups are searched at once (tensors ``[out, G, g]``); the only Python loop is over the 21
(asymmetric) or 31 (symmetric) grid points. The min/max (RTN) qparams seed the search, so the
result is never worse than ``rtn`` in the weighted squared error (before the scale is cast to its
stored dtype). After the search the codes are re-rounded with the stored scale, which is optimal
per weight.

With ``compiled=True`` (the default) and numba installed (``quant.jit.available()``) the search runs as a
compiled per-group kernel instead, ``quant/methods/mse_jit.py``: the same candidates (``mse_grid.py``) and
selection rule, its sums in float64, row blocks on ``threads`` threads; the torch functions below are the
fallback and its reference (``compiled=False``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from quant import jit
from quant.methods.mse_grid import ASYM_GRID, SYM_GRID, TINY
from quant.methods.registry import ROW_CHUNK, by_row_chunks, register_quantizer
from quant.qparams import finish_scale, group_len, grouped, qrange, quantize, scale_dtype_for
from quant.spec import QuantSpec


def magnitude_weights(x: Tensor) -> Tensor:
    """``|x| + rms(group)`` for grouped ``x [out, G, g]`` (llama.cpp's ``av_x + |x|``)."""
    return x.abs() + x.square().mean(-1, keepdim=True).sqrt()


def group_weights(importance: Tensor | None, shape: tuple[int, int], g: int) -> Tensor | None:
    """Error weights as ``[out, G, g]`` from ``importance`` ``[in]`` (per column) or ``[out, in]``."""
    if importance is None:
        return None
    out_f, in_f = shape
    imp = importance.float()
    if imp.dim() == 1:
        imp = imp.expand(out_f, in_f)
    if tuple(imp.shape) != (out_f, in_f):
        raise ValueError(f"importance has shape {list(importance.shape)}; expected [{in_f}] or [{out_f}, {in_f}]")
    return imp.reshape(out_f, in_f // g, g)


def wsum(x: Tensor, wt: Tensor | None) -> Tensor:
    """Weighted sum over the group dim: ``[out, G, g] → [out, G]``."""
    return (x if wt is None else x * wt).sum(dim=-1)


def sq_err(x: Tensor, xhat: Tensor, wt: Tensor | None) -> Tensor:
    """Weighted squared error per group ``[out, G]``."""
    return wsum((x - xhat).square(), wt)


def lsq_scale(x: Tensor, d: Tensor, wt: Tensor | None) -> Tensor:
    """``argmin_s Σ wt·(x - s·d)²`` per group; 0 where all ``d`` are 0."""
    den = wsum(d * d, wt)
    return torch.where(den > 0, wsum(x * d, wt) / den.clamp_min(TINY), torch.zeros_like(den))


def _moments(x: Tensor, l: Tensor, wt: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """float64 ``[out, G]`` sums ``Σw·l, Σw·l², Σw·l·x`` of codes ``l`` (summed in float32)."""
    wl = l if wt is None else l * wt
    return wl.sum(-1).double(), (wl * l).sum(-1).double(), (wl * x).sum(-1).double()


def _fit(sxx: Tensor, sdx: Tensor, sdd: Tensor) -> tuple[Tensor, Tensor]:
    """Scale ``s = Σw·d·x / Σw·d²`` and its error ``Σw·x² - s·Σw·d·x``; error inf unless ``s > 0``."""
    s = sdx / torch.where(sdd > 0, sdd, torch.full_like(sdd, float("nan")))
    err = torch.where(s > 0, sxx - s * sdx, torch.full_like(s, float("inf")))
    return s, err


def _keep_better(best: list[Tensor], cand: list[Tensor]) -> None:
    """In place: replace ``best = [err, s, z]`` where ``cand``'s error is lower (NaN never wins)."""
    better = cand[0] < best[0]
    for i in range(len(best)):
        best[i] = torch.where(better, cand[i], best[i])


def _asym_search(x: Tensor, wt: Tensor | None, bits: int) -> tuple[Tensor, Tensor]:
    """Best ``(scale, zero)`` per group, float ``[out, G]`` (zero integral).

    Each candidate needs only the moments of its codes ``l``: with ``d = l - z``,
    ``Σw·d·x = Σw·l·x - z·Σw·x`` and ``Σw·d² = Σw·l² - 2z·Σw·l + z²·Σw``.
    """
    qmin, qmax = qrange(bits)
    mn, mx = x.amin(-1).clamp(max=0.0), x.amax(-1).clamp(min=0.0)              # [out, G]
    span = (mx - mn).clamp_min(TINY)
    s0 = span / (qmax - qmin)
    z0 = torch.round(torch.clamp(qmin - mn / s0, qmin, qmax))
    best = [sq_err(x, s0[..., None] * (_codes(x, s0, z0, bits) - z0[..., None]), wt).double(), s0.double(), z0]
    sw, sx, sxx = (wsum(t, wt).double() for t in (torch.ones_like(x), x, x * x))
    rmin, rdelta, nstep = ASYM_GRID
    for k in range(nstep + 1):
        iscale = (qmax - qmin) * (1 + rmin + rdelta * k) / span
        zc = torch.round(torch.clamp(qmin - mn * iscale, qmin, qmax))
        l = torch.round(torch.clamp(x * iscale[..., None] + zc[..., None], qmin, qmax))  # [out, G, g]
        sl, sl2, slx = _moments(x, l, wt)
        det = sw * sl2 - sl * sl                                                   # 2×2 fit x ≈ s·l + m
        m_over_s = (sl2 * sx - sl * slx) / (sw * slx - sl * sx)                    # m / s
        z_fit = torch.round(torch.clamp(-m_over_s, qmin, qmax)).float()
        for z in (zc, torch.where(det > 0, z_fit, zc)):
            zd = z.double()
            s, err = _fit(sxx, slx - zd * sx, sl2 - 2 * zd * sl + zd * zd * sw)
            _keep_better(best, [err, s, z])
    return best[1].float(), best[2]


def _sym_search(x: Tensor, wt: Tensor | None, bits: int) -> Tensor:
    """Best positive scale per group ``[out, G]`` for codes ``q = round(x / s)``."""
    qmin, qmax = qrange(bits)
    half = (qmax - qmin) / 2
    amax = x.abs().amax(-1).clamp_min(TINY)                                     # [out, G]
    s0 = amax / half
    best = [sq_err(x, s0[..., None] * _codes(x, s0, None, bits), wt).double(), s0.double()]
    sxx = wsum(x * x, wt).double()
    rmin, rdelta, nstep = SYM_GRID
    for k in range(nstep + 1):
        l = torch.round(torch.clamp(x * (half * (1 + rmin + rdelta * k) / amax)[..., None], qmin, qmax))
        _, sl2, slx = _moments(x, l, wt)
        _keep_better(best, list(_fit(sxx, slx, sl2))[::-1])
    return best[1].float()


def _codes(x: Tensor, s: Tensor, z: Tensor | None, bits: int) -> Tensor:
    """Float codes ``round(clamp(x/s + z))`` for grouped ``x [out, G, g]``."""
    qmin, qmax = qrange(bits)
    y = x / s[..., None] + (0.0 if z is None else z[..., None])
    return torch.round(torch.clamp(y, qmin, qmax))


def jit_threads(threads: int | None) -> int:
    """Threads for the compiled search: ``threads``, or this process's CPUs (``os.sched_getaffinity``)
    capped by ``torch.get_num_threads()`` — so a caller that pins torch to one thread (the GGUF
    writer's encoders, which are parallel themselves) gets a serial search too."""
    return max(1, threads) if threads is not None else max(1, min(jit.default_threads(), torch.get_num_threads()))


@register_quantizer("mse")
def mse(
    w: Tensor, spec: QuantSpec, *, hessian: Tensor | None = None, importance: Tensor | None = None,
    scale_dtype: torch.dtype | None = None, row_chunk: int = ROW_CHUNK, threads: int | None = None,
    compiled: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Grid + least-squares search of each group's qparams; ``importance`` weights the error.

    ``threads``: workers for the compiled search (:func:`jit_threads`); the result does not depend on it.
    ``compiled``: the numba search where numba is installed (else, and with False, the torch search).
    """
    if w.shape[0] > row_chunk:
        opts = {"scale_dtype": scale_dtype, "threads": threads, "compiled": compiled}
        return by_row_chunks(mse, w, spec, importance, row_chunk, **opts)
    g = group_len(w.shape[1], spec.group_size)
    sdt = scale_dtype or scale_dtype_for(w.dtype)
    if compiled and jit.available():
        from quant.methods import mse_jit  # deferred: imports numba, only when a compiled search runs

        imp = None if importance is None else importance.detach().float().numpy()
        s, z = mse_jit.search(w.detach().float().numpy(), g, imp, spec.bits, spec.symmetric, jit_threads(threads))
        s, z = torch.from_numpy(s), None if z is None else torch.from_numpy(z)
    else:
        x = grouped(w, g)                                                        # [out, G, g]
        wt = magnitude_weights(x)
        imp = group_weights(importance, tuple(w.shape), g)
        wt = wt if imp is None else wt * imp
        s, z = (_sym_search(x, wt, spec.bits), None) if spec.symmetric else _asym_search(x, wt, spec.bits)
    scale = finish_scale(s, sdt)
    zero = None if z is None else z.to(torch.int8)
    return quantize(w, scale, zero, spec.bits), scale, zero
