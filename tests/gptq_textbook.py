"""GPTQ as the paper states it, in float64, unblocked: the independent reference the float32 loop is tested
against (IST-DASLab/gptq; ../shared/spec/QUANT_FORMATS.md §3.1).

``U`` = upper Cholesky factor of ``(H + damp·mean(diag H)·I)⁻¹`` formed the direct way (factor, invert,
factor); column ``i`` is quantized at its current value, ``err = (w_i − ŵ_i) / U_ii`` and
``W[:, i:] −= err ⊗ U[i, i:]``. The float32 loop works on ``U⁻¹`` instead (``quant.methods.gptq``): the same
algorithm, so the two agree up to rounding — ties between two codes may go either way, and a flipped code
changes the columns after it a little, so tests compare code agreement and the layer error, not bits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def textbook_u(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """``U [in, in]`` float64: the upper Cholesky factor of the damped Hessian's inverse."""
    hd = h.double().clone()
    hd.diagonal().add_(damp * hd.diagonal().mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)


Column = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(column index, its current value ``[out]`` float64, the current weight ``[out, in]``) → (codes, decoded)."""


def textbook_gptq(w: torch.Tensor, h: torch.Tensor, column: Column, damp: float = 0.01) -> torch.Tensor:
    """Codes ``[out, in]`` (float64) of ``w [out, in]`` (columns in visiting order) by the paper's loop."""
    wd, u = w.double().clone(), textbook_u(h, damp)
    q = torch.zeros_like(wd)
    for i in range(wd.shape[1]):
        q[:, i], deq = column(i, wd[:, i].clone(), wd)
        err = (wd[:, i] - deq.double()) / u[i, i]
        wd[:, i:] -= err[:, None] * u[i, i:][None, :]
    return q


def layer_error(w: torch.Tensor, approx: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ)`` in float64."""
    d = (w.double() - approx.double())
    return float(((d @ h.double()) * d).sum())


def accumulate_hessian(h: torch.Tensor | None, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running ``H = 2/n · Σ xᵀx`` over ``n`` rows; ``x [..., in]`` adds ``m`` rows. Returns ``(H, n + m)``."""
    x2 = x.reshape(-1, x.shape[-1]).float()                                  # [m, in]
    m = x2.shape[0]
    if h is None:
        h = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float32)
    if m == 0:
        return h, n
    h = h * (n / (n + m)) + (2.0 / (n + m)) * (x2.T @ x2)                   # [in, in]
    return h, n + m
