"""GPTQ's group scales refit to its codes, and its codes redone on the refit scales (least squares in H).

GPTQ with act-order and static groups (``quant/methods/gptq.py``) fixes each group's scale up front, from the
*original* weights (mse's search), then chooses the codes by error feedback; the scales never see the codes
they end up with. For fixed codes the layer's output error is a quadratic in the scales of each row ``r``
(``c = q − zero``, group ``a``'s columns ``c_a``, ``H = 2/n · XᵀX [in, in]`` the GPTQ Hessian):

    E_r(s) = (w_r − ŵ_r) H (w_r − ŵ_r)ᵀ = sᵀ A s − 2 bᵀ s + w_r H w_rᵀ,    ŵ_r = Σ_a s_a · c_a
    A[a, b] = c_a H_ab c_bᵀ   [G, G],      b[a] = c_a (H w_rᵀ)_a   [G]

so the best scales solve ``A s = b`` (G = in / group size unknowns a row). :func:`refine` alternates: refit
the scales to GPTQ's codes, redo GPTQ's codes on those scales (same Hessian factor, same column order), refit
again; a step is kept only if it lowers ``Σ_r E_r`` with the scales rounded to their stored dtype, so the
result never measures worse than GPTQ's own on the calibration Hessian. The layout is unchanged (same groups,
one scale (and the same zero) per group): any format that stores GPTQ's output stores this.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quant.methods.gptq import HessianFactor, LazyBlock, feedback_in_order
from quant.qparams import qrange

ROUNDS = 1
"""Refit → new codes rounds before the last refit (measured on the trained fixture, docs/QUANTIZATION.md)."""
ROW_CHUNK = 256
"""Rows whose normal equations are formed and solved together: ``A`` of every row at once is out · G² floats
(4608 · 1152² · 4 B = 24 GB for the 27B's down_proj at group 32); a chunk's products also stay in cache."""


def _shifted(q: Tensor, zero: Tensor | None, g: int) -> Tensor:
    """``q − zero`` float32 ``[out, in]`` (zero per group of ``g`` columns)."""
    return q.float() if zero is None else q.float() - zero.float().repeat_interleave(g, dim=1)


def normal_equations(c: Tensor, wh: Tensor, h: Tensor, g: int) -> tuple[Tensor, Tensor]:
    """``A [out, G, G]`` and ``b [out, G]`` of the module docstring for shifted codes ``c [out, in]``,
    ``wh = w @ H [out, in]``. ``A`` is symmetric: one ``[out, g] @ [g, in − j·g]`` product per group ``j``
    gives its row ``j`` from the diagonal on, mirrored into column ``j`` (≈ out · in² / 2 multiply-adds)."""
    out_f, in_f = c.shape
    n_groups = in_f // g
    a = torch.empty(out_f, n_groups, n_groups)
    for j in range(n_groups):
        t = c[:, j * g:(j + 1) * g] @ h[j * g:(j + 1) * g, j * g:]           # [out, in − j·g]
        a[:, j, j:] = t.mul_(c[:, j * g:]).view(out_f, n_groups - j, g).sum(-1)
        a[:, j + 1:, j] = a[:, j, j + 1:]
    b = (c * wh).view(out_f, n_groups, g).sum(-1)                           # [out, G]
    return a, b


def quadratic_error(a: Tensor, b: Tensor, ww: Tensor, s: Tensor) -> float:
    """``Σ_r sᵀ A s − 2 bᵀ s + w H wᵀ`` in float64 (``s [out, G]`` float32)."""
    sd = s.double()
    quad = (torch.einsum("ra,rab,rb->r", sd, a.double(), sd) - 2 * (b.double() * sd).sum(1))
    return float((quad + ww).sum())


def solve_scales(a: Tensor, b: Tensor, old: Tensor) -> Tensor:
    """The least-squares scales ``[out, G]`` float32, solved in float64; a group whose codes are all zero
    (a zero row and column of ``A``) keeps ``old``, and so does every group of a row whose system stays
    singular or whose solution is not positive and finite. A relative ridge of 1e-6 keeps ``A`` invertible."""
    a = a.double()
    diag = a.diagonal(dim1=1, dim2=2)
    empty = diag <= 0                                                       # [out, G]: codes all zero
    ridge = torch.where(empty, torch.ones_like(diag), 1e-6 * diag)
    a.diagonal(dim1=1, dim2=2).add_(ridge)
    rhs = torch.where(empty, old.double(), b.double() + ridge * old.double())
    s, info = torch.linalg.solve_ex(a, rhs.unsqueeze(-1))
    s = s.squeeze(-1).float()
    ok = (info == 0).unsqueeze(-1) & (s > 0) & torch.isfinite(s)
    return torch.where(ok, s, old)


def codes_on_scales(w: Tensor, scale: Tensor, zero: Tensor | None, bits: int, factor: HessianFactor,
                    block: int = 128) -> Tensor:
    """GPTQ's codes int8 ``[out, in]`` for fixed group ``scale``/``zero [out, G]``: the column loop of
    ``quant/methods/gptq.py`` in ``factor``'s order, each column rounded with its own group's qparams."""
    g = w.shape[1] // scale.shape[1]
    qmin, qmax = qrange(bits)
    s = scale.float()
    live = s > 0                                   # a group of scale 0 decodes to 0: its codes are its zero
    safe = torch.where(live, s, torch.ones_like(s))
    z = None if zero is None else zero.float()
    perm = factor.perm

    def column(c: int, col: Tensor, blk: LazyBlock) -> tuple[Tensor, Tensor]:
        j = int(perm[c]) // g
        zj = torch.zeros_like(col) if z is None else z[:, j]
        q = torch.where(live[:, j], torch.round(torch.clamp(col / safe[:, j] + zj, qmin, qmax)), zj)
        return q, (q - zj) * s[:, j]

    return feedback_in_order(w, factor, block, column).to(torch.int8)


def _refit_rows(c: Tensor, wh: Tensor, h: Tensor, ww: Tensor, g: int,
                scale: Tensor) -> tuple[float, Tensor, float]:
    """For shifted codes ``c [out, in]`` at ``scale [out, G]`` (stored dtype): (their ``Σ_r E_r``, the refit
    scales in the stored dtype, ``Σ_r E_r`` at those), the normal equations of ``ROW_CHUNK`` rows at a
    time."""
    fits, err, fit_err = [], 0.0, 0.0
    for r0 in range(0, c.shape[0], ROW_CHUNK):
        rows = slice(r0, r0 + ROW_CHUNK)
        a, b = normal_equations(c[rows], wh[rows], h, g)
        s = scale[rows].float()
        fit = solve_scales(a, b, s).to(scale.dtype)
        err += quadratic_error(a, b, ww[rows], s)
        fit_err += quadratic_error(a, b, ww[rows], fit.float())
        fits.append(fit)
    return err, torch.cat(fits), fit_err


def refine(w: Tensor, q: Tensor, scale: Tensor, zero: Tensor | None, hessian: Tensor, bits: int,
           factor: HessianFactor, rounds: int = ROUNDS) -> tuple[Tensor, Tensor]:
    """(codes, scale) no worse than GPTQ's ``(q, scale)`` in ``tr(ΔW H ΔWᵀ)``: see the module docstring.
    ``w [out, in]``, ``q`` int8 ``[out, in]``, ``scale`` (stored dtype) / ``zero`` ``[out, G]``.

    Each round refits the scales to the current codes and redoes the codes on them, kept when that pair beats
    the current one; then a last refit to the codes kept. The normal equations of each codes are formed once
    (a refit and both errors from them)."""
    g = w.shape[1] // scale.shape[1]
    h = hessian.float()
    wh = w.float() @ h                                                      # [out, in]
    ww = (w.float() * wh).sum(1).double()                                   # [out]
    err, fit, fit_err = _refit_rows(_shifted(q, zero, g), wh, h, ww, g, scale)
    for _ in range(rounds):
        q2 = codes_on_scales(w, fit, zero, bits, factor)
        err2, fit2, fit_err2 = _refit_rows(_shifted(q2, zero, g), wh, h, ww, g, fit)
        if not err2 < err:
            break
        q, scale, err, fit, fit_err = q2, fit, err2, fit2, fit_err2
    return (q, fit) if fit_err < err else (q, scale)
