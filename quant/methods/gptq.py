"""GPTQ: quantize columns one at a time and push each column's error onto the columns not yet done.

Algorithm (IST-DASLab/gptq ``gptq.py`` @ 2d65066e; survey ../shared/spec/QUANT_FORMATS.md §3.1),
as a pure function of the weight ``W [out, in]`` and the Hessian ``H = 2/n · XᵀX [in, in]``:

1. dead inputs (``H[j, j] == 0``) get ``H[j, j] = 1`` and ``W[:, j] = 0``;
2. optional act-order: columns visited by decreasing ``diag(H)``;
3. dampening ``H += damp · mean(diag H) · I``; ``U`` = upper Cholesky factor of ``H⁻¹``;
4. in blocks of ``block_size`` columns: quantize column ``i`` with its group's qparams,
   ``err = (w_i - ŵ_i) / U[i, i]``, ``W[:, i:] -= err ⊗ U[i, i:]`` inside the block, and one
   lazy ``W[:, end:] -= Err · U[block, end:]`` after it.

Group qparams (``qparams='mse'``, default: the least-squares grid search of ``quant/methods/mse.py``;
``'minmax'``: IST-DASLab's min/max quantizer, ``choose_qparams``): without act-order they are chosen
when the loop enters a group, from the *current* (error-updated) columns of that group — including
the lazy updates still pending from the running block, so a group that starts mid-block sees
exactly the weights it will quantize. With act-order the groups are fixed up front from the
original weights ("static groups"), so every column keeps its natural group ``j // g`` and the
output needs no ``g_idx``: the result is the plain layout every format here writes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from gemma2_convert.core.errors import ConversionError
from quant.methods.mse import mse
from quant.methods.registry import register_quantizer
from quant.qparams import choose_qparams, group_len, qrange, scale_dtype_for
from quant.spec import QuantSpec


def accumulate_hessian(h: Tensor | None, n: int, x: Tensor) -> tuple[Tensor, int]:
    """Running ``H = 2/n · Σ xᵀx`` over ``n`` rows; ``x [..., in]`` adds ``m`` rows. Returns ``(H, n + m)``."""
    x2 = x.reshape(-1, x.shape[-1]).float()                                  # [m, in]
    m = x2.shape[0]
    if h is None:
        h = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float32)
    if m == 0:
        return h, n
    h = h * (n / (n + m)) + (2.0 / (n + m)) * (x2.T @ x2)                   # [in, in]
    return h, n + m


def inverse_cholesky_upper(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of ``(H + damp·mean(diag H)·I)⁻¹``, float32 ``[in, in]``."""
    h = h.clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise ConversionError(
            f"GPTQ Hessian is not positive definite (leading minor {int(info)} of {h.shape[0]}); "
            f"increase damp (now {damp}) or calibrate on more tokens"
        )
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def _quant_col(w: Tensor, s: Tensor, z: Tensor | None, bits: int) -> tuple[Tensor, Tensor]:
    """One column ``[out]`` with scale ``s [out]`` (float32), zero ``z [out]``: (codes, dequantized)."""
    qmin, qmax = qrange(bits)
    zf = 0.0 if z is None else z.float()
    q = torch.round(torch.clamp(w / s + zf, qmin, qmax))
    return q, (q - zf) * s


QPARAM_RULES = ("mse", "minmax")


class _Grid:
    """Per-group ``scale [out, G]`` (stored dtype) and ``zero [out, G]`` (int8 or None), filled in order.

    ``rule='minmax'`` is IST-DASLab's quantizer (``choose_qparams``); ``'mse'`` runs the
    least-squares grid search of ``quant/methods/mse.py`` on the group's current columns.
    """

    def __init__(self, w: Tensor, spec: QuantSpec, g: int, scale_dtype: torch.dtype, rule: str) -> None:
        if rule not in QPARAM_RULES:
            raise ValueError(f"qparams={rule!r}; choose one of {list(QPARAM_RULES)}")
        self.spec, self.g, self.scale_dtype, self.rule = spec, g, scale_dtype, rule
        self.scale, self.zero = self.fit(w)

    def fit(self, cols: Tensor) -> tuple[Tensor, Tensor | None]:
        """qparams ``[out, k]`` for ``cols [out, k·g]``."""
        if self.rule == "minmax":
            return choose_qparams(cols, self.spec.bits, self.g, self.spec.symmetric, scale_dtype=self.scale_dtype)
        _, s, z = mse(cols, dataclasses.replace(self.spec, method="mse"), scale_dtype=self.scale_dtype)
        return s, z

    def refit(self, j: int, cols: Tensor) -> None:
        """Recompute group ``j`` from its current columns ``cols [out, g]``."""
        s, z = self.fit(cols)
        self.scale[:, j] = s[:, 0]
        if self.zero is not None and z is not None:
            self.zero[:, j] = z[:, 0]

    def col(self, j: int) -> tuple[Tensor, Tensor | None]:
        return self.scale[:, j].float(), None if self.zero is None else self.zero[:, j]


@dataclasses.dataclass
class LazyBlock:
    """The block of columns ``[i1, i2)`` GPTQ is working on: ``w1`` (its current columns), ``err1`` (the scaled
    errors of the columns done so far), ``w`` and ``u`` (the whole weight and inverse-Cholesky factor)."""

    w: Tensor
    w1: Tensor
    err1: Tensor
    u: Tensor
    i1: int
    i2: int

    def cols(self, i: int, g: int) -> Tensor:
        """Current values of columns ``[i1+i, i1+i+g)``: ``w1`` inside the block, ``w`` minus pending updates
        after it."""
        c1 = self.i1 + i + g
        inside = self.w1[:, i : min(c1, self.i2) - self.i1]                   # [out, ≤ g]
        if c1 <= self.i2:
            return inside
        after = self.w[:, self.i2:c1] - self.err1[:, :i] @ self.u[self.i1 : self.i1 + i, self.i2:c1]
        return torch.cat([inside, after], dim=1)


ColumnQuantizer = Callable[[int, Tensor, LazyBlock], tuple[Tensor, Tensor]]
"""(column index in visiting order, its current values ``[out]``, the block) → (codes, what they decode to)."""


def error_feedback(w: Tensor, u: Tensor, block_size: int, column: ColumnQuantizer) -> Tensor:
    """GPTQ's column loop with lazy block updates over ``w [out, in]`` (columns already in visiting order,
    updated in place), ``u`` the upper inverse-Cholesky factor of the (permuted, damped) Hessian: each column is
    quantized by ``column`` and its error pushed onto the columns not yet done. Returns the codes (float)."""
    out_f, in_f = w.shape
    q = torch.zeros_like(w)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        blk = LazyBlock(w, w[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1), u, i1, i2)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            q[:, i1 + i], deq = column(i1 + i, blk.w1[:, i], blk)
            err = (blk.w1[:, i] - deq) / u1[i, i]
            blk.w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            blk.err1[:, i] = err
        w[:, i2:] -= blk.err1 @ u[i1:i2, i2:]
    return q


@register_quantizer("gptq")
def gptq(
    w: Tensor, spec: QuantSpec, *, hessian: Tensor | None = None, importance: Tensor | None = None,
    scale_dtype: torch.dtype | None = None, block_size: int = 128, damp: float = 0.01, act_order: bool = False,
    qparams: str = "mse",
) -> tuple[Tensor, Tensor, Tensor | None]:
    """GPTQ codes and qparams for ``w [out, in]`` given ``hessian [in, in]``; ``importance`` is ignored."""
    in_f = w.shape[1]
    if hessian is None or tuple(hessian.shape) != (in_f, in_f):
        got = None if hessian is None else list(hessian.shape)
        raise ConversionError(f"gptq needs a Hessian of shape [{in_f}, {in_f}], got {got}; run calibration first")
    g = group_len(in_f, spec.group_size)
    wf, h = w.float().clone(), hessian.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    wf[:, dead] = 0.0
    grid = _Grid(wf, spec, g, scale_dtype or scale_dtype_for(w.dtype), qparams)
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(in_f)
    u = inverse_cholesky_upper(h[perm][:, perm], damp)
    q = _gptq_loop(wf[:, perm], u, perm, grid, block_size, refit=not act_order)
    codes = torch.empty_like(q)
    codes[:, perm] = q
    return codes.to(torch.int8), grid.scale, grid.zero


def _gptq_loop(w: Tensor, u: Tensor, perm: Tensor, grid: _Grid, block_size: int, refit: bool) -> Tensor:
    """Column loop over permuted ``w [out, in]``; returns float codes in permuted order."""
    def column(c: int, col: Tensor, blk: LazyBlock) -> tuple[Tensor, Tensor]:
        j = int(perm[c]) // grid.g
        if refit and c % grid.g == 0:
            grid.refit(j, blk.cols(c - blk.i1, grid.g))
        return _quant_col(col, *grid.col(j), grid.spec.bits)

    return error_feedback(w, u, block_size, column)
