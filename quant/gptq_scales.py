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

from quant.methods.gptq import HessianFactor, LazyBlock, error_feedback
from quant.qparams import qrange

ROUNDS = 1
"""Refit → new codes rounds before the last refit (measured on the trained fixture, docs/QUANTIZATION.md)."""


def _shifted(q: Tensor, zero: Tensor | None, g: int) -> Tensor:
    """``q − zero`` float32 ``[out, in]`` (zero per group of ``g`` columns)."""
    return q.float() if zero is None else q.float() - zero.float().repeat_interleave(g, dim=1)


def normal_equations(c: Tensor, wh: Tensor, h: Tensor, g: int) -> tuple[Tensor, Tensor]:
    """``A [out, G, G]`` and ``b [out, G]`` of the module docstring for shifted codes ``c [out, in]``,
    ``wh = w @ H [out, in]``; one ``[out, g] @ [g, in]`` product per group (≈ out · in² multiply-adds)."""
    out_f, in_f = c.shape
    n_groups = in_f // g
    a = torch.empty(out_f, n_groups, n_groups)
    for j in range(n_groups):
        t = c[:, j * g:(j + 1) * g] @ h[j * g:(j + 1) * g, :]                 # [out, in]
        a[:, j, :] = (t * c).view(out_f, n_groups, g).sum(-1)
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
    wf = w.float().clone()
    wf[:, factor.dead] = 0.0
    perm = factor.perm

    def column(c: int, col: Tensor, blk: LazyBlock) -> tuple[Tensor, Tensor]:
        j = int(perm[c]) // g
        zj = torch.zeros_like(col) if z is None else z[:, j]
        q = torch.where(live[:, j], torch.round(torch.clamp(col / safe[:, j] + zj, qmin, qmax)), zj)
        return q, (q - zj) * s[:, j]

    qp = error_feedback(wf[:, perm], factor.u, block, column)
    codes = torch.empty_like(qp)
    codes[:, perm] = qp
    return codes.to(torch.int8)


def refine(w: Tensor, q: Tensor, scale: Tensor, zero: Tensor | None, hessian: Tensor, bits: int,
           factor: HessianFactor, rounds: int = ROUNDS) -> tuple[Tensor, Tensor]:
    """(codes, scale) no worse than GPTQ's ``(q, scale)`` in ``tr(ΔW H ΔWᵀ)``: see the module docstring.
    ``w [out, in]``, ``q`` int8 ``[out, in]``, ``scale`` (stored dtype) / ``zero`` ``[out, G]``.

    Each round refits the scales to the current codes and redoes the codes on them, kept when that pair beats
    the current one; then a last refit to the codes kept."""
    g = w.shape[1] // scale.shape[1]
    h = hessian.float()
    wh = w.float() @ h                                                      # [out, in]
    ww = (w.float() * wh).sum(1).double()                                   # [out]
    a, b = normal_equations(_shifted(q, zero, g), wh, h, g)
    best = quadratic_error(a, b, ww, scale.float())
    for _ in range(rounds):
        fit = solve_scales(a, b, scale.float()).to(scale.dtype)
        q2 = codes_on_scales(w, fit, zero, bits, factor)
        a2, b2 = normal_equations(_shifted(q2, zero, g), wh, h, g)
        e2 = quadratic_error(a2, b2, ww, fit.float())
        if not e2 < best:
            break
        q, scale, a, b, best = q2, fit, a2, b2, e2
    fit = solve_scales(a, b, scale.float()).to(scale.dtype)
    return (q, fit) if quadratic_error(a, b, ww, fit.float()) < best else (q, scale)
