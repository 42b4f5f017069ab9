"""GPTQ: quantize columns one at a time and push each column's error onto the columns not yet done.

Algorithm (IST-DASLab/gptq ``gptq.py`` @ 2d65066e; survey ../shared/spec/QUANT_FORMATS.md §3.1),
as a pure function of the weight ``W [out, in]`` and the Hessian ``H = 2/n · XᵀX [in, in]``:

1. dead inputs (``H[j, j] == 0``) get ``H[j, j] = 1`` and ``W[:, j] = 0``;
2. optional act-order: columns visited by decreasing ``diag(H)``;
3. dampening ``H += damp · mean(diag H) · I``; the paper's ``U`` = upper Cholesky factor of ``H⁻¹``;
4. in blocks of ``block_size`` columns: quantize column ``i`` with its group's qparams,
   ``err = (w_i - ŵ_i) / U[i, i]``, ``W[:, i:] -= err ⊗ U[i, i:]`` inside the block, and one
   lazy ``W[:, end:] -= Err · U[block, end:]`` after it.

Here step 4 runs on ``R = U⁻¹`` (``H = R Rᵀ``, one Cholesky factorization, no inverse) in the equivalent
form of :func:`error_feedback`: the same codes up to float rounding (ties may flip).

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

XTX_BLOCK = 1024
"""Rows of ``XᵀX`` per product in :func:`add_xtx`: only blocks on or above the diagonal are multiplied."""


def add_xtx(acc: Tensor | None, x: Tensor) -> Tensor:
    """``acc + XᵀX`` float32 ``[in, in]`` for ``x [..., in]``, upper block triangle only (``XTX_BLOCK`` rows a
    product; ``in = 9216``: 56 % of a full product) — call :func:`mirror_upper` once after the last ``add_xtx``.
    The first call's blocks equal the full ``x.T @ x``'s bit for bit (same products summed in the same order)."""
    x2 = x.reshape(-1, x.shape[-1]).float()                                  # [m, in]
    n = x2.shape[1]
    first = acc is None
    acc = torch.empty(n, n, dtype=torch.float32) if acc is None else acc
    for r0 in range(0, n, XTX_BLOCK):
        a, b = x2[:, r0 : r0 + XTX_BLOCK].T, x2[:, r0:]                    # [k, m], [m, in - r0]
        if first:
            acc[r0 : r0 + XTX_BLOCK, r0:] = a @ b
        else:
            acc[r0 : r0 + XTX_BLOCK, r0:].addmm_(a, b)
    return acc


def mirror_upper(acc: Tensor) -> Tensor:
    """Fill the blocks below the diagonal of an :func:`add_xtx` sum from those above it (in place)."""
    for r0 in range(XTX_BLOCK, acc.shape[0], XTX_BLOCK):
        acc[r0 : r0 + XTX_BLOCK, :r0] = acc[:r0, r0 : r0 + XTX_BLOCK].T
    return acc


def feedback_factor(h: Tensor, damp: float) -> Tensor:
    """GPTQ's error-feedback matrix ``T`` float32 ``[in, in]``, unit upper-triangular, of the damped
    ``H' = H + damp·mean(diag H)·I``: with ``J`` the reversal and ``L = chol(J H' J)``, ``R = J L J`` is upper
    with ``H' = R Rᵀ``, and ``T = R · diag(R)⁻¹`` (column ``j`` over ``R_jj``). One factorization (≈ n³/6
    multiply-adds), no inverse: see :func:`error_feedback` for why ``T`` is all GPTQ needs."""
    hr = h.float().flip(0, 1)                                                # J H J, a copy
    hr.diagonal().add_(damp * h.diagonal().float().mean())
    lower, info = torch.linalg.cholesky_ex(hr)
    if int(info):
        raise ConversionError(
            f"GPTQ Hessian is not positive definite (its last {int(info)} of {h.shape[0]} rows and columns); "
            f"increase damp (now {damp}) or calibrate on more tokens"
        )
    del hr
    r = lower.flip(0, 1)                                                     # R = J L J, upper
    del lower
    return r.div_(r.diagonal().clone())


@dataclasses.dataclass(frozen=True)
class HessianFactor:
    """What GPTQ derives from a Hessian alone, so weights with the same input (q/k/v; gate/up) share it:
    ``dead`` inputs (``diag H == 0``, bool ``[in]``), the visiting order ``perm [in]`` (act-order: by
    decreasing ``diag H``) and ``t``, the error-feedback matrix of the permuted, damped Hessian
    (:func:`feedback_factor`)."""

    dead: Tensor
    perm: Tensor
    t: Tensor
    act_order: bool


def factor_hessian(hessian: Tensor, damp: float = 0.01, act_order: bool = False) -> HessianFactor:
    """Steps 1–3 of the module docstring for ``hessian [in, in]``."""
    h = hessian.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(h.shape[0])
    return HessianFactor(dead, perm, feedback_factor(h[perm][:, perm], damp), act_order)


def _quant_col(w: Tensor, s: Tensor, z: Tensor | None, bits: int) -> tuple[Tensor, Tensor]:
    """One column ``[out]`` with scale ``s [out]`` (float32), zero ``z [out]``: (codes, dequantized)."""
    qmin, qmax = qrange(bits)
    zf = 0.0 if z is None else z.float()
    q = torch.clamp(w / s + zf, qmin, qmax).round_()  # in place: torch.round(x) ran a thread team per column
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
    """The block of columns ``[i1, i2)`` GPTQ is working on, held transposed so that a column is a contiguous
    row: ``xt [i2 - i1, out]`` (each column plus the feedback of the columns done so far,
    ``w_j + Σ_k d_k T_kj``: its value when its turn comes), ``dt`` (their original values, each replaced by
    its ``d = w − ŵ`` once done); ``w`` (the whole weight, its columns before ``i1`` already their ``d``) and
    ``t`` (the feedback matrix)."""

    w: Tensor
    t: Tensor
    i1: int
    i2: int
    xt: Tensor
    dt: Tensor

    @classmethod
    def start(cls, w: Tensor, t: Tensor, i1: int, i2: int) -> LazyBlock:
        """The block with its columns at ``x_j = w_j + Σ_{k<i1} d_k T_kj``: one ``[b, i1] @ [i1, out]``
        product."""
        dt = w[:, i1:i2].T.contiguous()                                      # [b, out]
        xt = dt.clone() if i1 == 0 else torch.addmm(dt, t[:i1, i1:i2].T, w[:, :i1].T)
        return cls(w, t, i1, i2, xt, dt)

    def cols(self, i: int, g: int) -> Tensor:
        """Columns ``[c, c + g)`` (``c = i1 + i``, the next column to quantize) ``[out, g]`` as the paper's
        loop holds them at that point (its group refit sees these): ``w + A · T_gg⁻¹`` with
        ``A = Σ_{k<c} d_k T_k·`` the feedback they have so far and ``T_gg`` their diagonal block
        (``W₂ + D₁ H₁₂ H₂₂⁻¹``, GPTQ's optimal update of the columns not yet done, with ``H = R Rᵀ`` and
        ``T = R · diag(R)⁻¹``)."""
        c, c1 = self.i1 + i, self.i1 + i + g
        k = min(c1, self.i2) - self.i1
        orig = self.dt[i:k].T                                                 # [out, ≤ g], not done yet
        acc = self.xt[i:k].T - orig
        if c1 > self.i2:
            done = torch.cat([self.w[:, : self.i1], self.dt[:i].T], dim=1)  # [out, c]: their d
            orig = torch.cat([orig, self.w[:, self.i2:c1]], dim=1)
            acc = torch.cat([acc, done @ self.t[:c, self.i2:c1]], dim=1)
        tg = self.t[c:c1, c:c1]
        return orig + torch.linalg.solve_triangular(tg, acc, upper=True, left=False, unitriangular=True)


ColumnQuantizer = Callable[[int, Tensor, LazyBlock], tuple[Tensor, Tensor]]
"""(column index in visiting order, its current values ``[out]``, the block) → (codes, what they decode to)."""


def error_feedback(w: Tensor, t: Tensor, block_size: int, column: ColumnQuantizer) -> Tensor:
    """GPTQ's column loop over ``w [out, in]`` (float32, columns already in visiting order; overwritten: each
    column becomes its ``d = w − ŵ``), ``t`` from :func:`feedback_factor`: each column is quantized by
    ``column`` at its current value ``x_i = w_i + Σ_{k<i} d_k T_ki``. Returns the codes (float).

    Why ``T``: the paper's loop (module docstring, ``H⁻¹ = UᵀU``) sets ``x_i = w_i − Σ_{k<i} e_k U_ki`` with
    ``e_k = (x_k − ŵ_k) / U_kk``, so ``W − Ŵ = E U``, ``E = (W − Ŵ) R`` with ``R = U⁻¹`` (``H = R Rᵀ``), and
    ``x_i = ŵ_i + e_i U_ii`` with ``U_ii = 1 / R_ii`` gives ``x_i = w_i + Σ_{k<i} d_k R_ki / R_ii``. In a
    block each done column feeds the rest of the block (a rank-1 update of ``LazyBlock.xt``); the columns before the
    block feed it at its start, one product (``LazyBlock.start``)."""
    out_f, in_f = w.shape
    qt = torch.empty(in_f, out_f, dtype=w.dtype)                             # codes, transposed
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        blk = LazyBlock.start(w, t, i1, i2)
        t1 = t[i1:i2, i1:i2]
        for i in range(i2 - i1):
            qt[i1 + i], deq = column(i1 + i, blk.xt[i], blk)
            d = blk.dt[i].sub_(deq)
            blk.xt[i + 1 :].addr_(t1[i, i + 1 :], d)
        w[:, i1:i2] = blk.dt.T
    return qt.T.contiguous()


def feedback_in_order(w: Tensor, factor: HessianFactor, block_size: int, column: ColumnQuantizer) -> Tensor:
    """:func:`error_feedback` over ``w [out, in]`` visited in ``factor``'s order, its dead inputs zeroed (``w``
    itself untouched); ``column`` gets the visiting index. Returns the codes (float) in ``w``'s column order."""
    wp = w.float()[:, factor.perm]                                           # a copy, in visiting order
    wp[:, factor.dead[factor.perm]] = 0.0
    q = error_feedback(wp, factor.t, block_size, column)
    codes = torch.empty_like(q)
    codes[:, factor.perm] = q
    return codes


@register_quantizer("gptq")
def gptq(
    w: Tensor, spec: QuantSpec, *, hessian: Tensor | None = None, importance: Tensor | None = None,
    scale_dtype: torch.dtype | None = None, block_size: int = 128, damp: float = 0.01, act_order: bool = False,
    qparams: str = "mse", factor: HessianFactor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """GPTQ codes and qparams for ``w [out, in]`` given ``hessian [in, in]``, or its ``factor`` (from
    :func:`factor_hessian`, shared by weights with the same input: then ``damp``/``act_order`` are the
    factor's); ``importance`` is ignored."""
    in_f = w.shape[1]
    if factor is None:
        if hessian is None or tuple(hessian.shape) != (in_f, in_f):
            got = None if hessian is None else list(hessian.shape)
            raise ConversionError(f"gptq needs a Hessian of shape [{in_f}, {in_f}], got {got}; run calibration "
                                  f"first")
        factor = factor_hessian(hessian, damp, act_order)
    elif tuple(factor.t.shape) != (in_f, in_f):
        raise ConversionError(f"gptq: Hessian factor of shape {list(factor.t.shape)} for a weight with "
                              f"{in_f} inputs; factor the Hessian of this weight's input")
    g = group_len(in_f, spec.group_size)
    wf = w.float().clone()
    wf[:, factor.dead] = 0.0
    grid = _Grid(wf, spec, g, scale_dtype or scale_dtype_for(w.dtype), qparams)
    codes = feedback_in_order(wf, factor, block_size, _grid_column(grid, factor.perm, not factor.act_order))
    return codes.to(torch.int8), grid.scale, grid.zero


def _grid_column(grid: _Grid, perm: Tensor, refit: bool) -> ColumnQuantizer:
    """Each column rounded with its group's qparams (``refit``: a group's fitted when the loop enters it)."""
    def column(c: int, col: Tensor, blk: LazyBlock) -> tuple[Tensor, Tensor]:
        j = int(perm[c]) // grid.g
        if refit and c % grid.g == 0:
            grid.refit(j, blk.cols(c - blk.i1, grid.g))
        return _quant_col(col, *grid.col(j), grid.spec.bits)

    return column
