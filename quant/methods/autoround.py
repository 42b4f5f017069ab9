"""AutoRound (SignRound): learned rounding offsets and scale multipliers, by signed gradient descent.

Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the Quantization of LLMs" (2023).
For a weight ``W [out, in]`` in the layout of ``quant/qparams.py`` (groups of ``g`` columns, scale
``s [out, G]``, zero ``z [out, G]`` or none), the codes are

    q = clamp(round(W / (s0 · m) + v) + z, qmin, qmax),     Ŵ = (q − z) · s0 · m

with ``v ∈ [c − 0.5, c + 0.5] [out, in]`` (rounding offsets around a centre ``c``, start ``c``) and
``m ∈ [M_LO, M_HI] [out, G]`` (scale multipliers, start 1) learned by ``p ← p − lr · sign(∂L/∂p)``
(``round`` passes gradients straight through), keeping the best ``(v, m)`` seen. ``L`` is the output error of whatever
the weights feed: a whole decoder layer on calibration activations (``pipeline/autoround.py``), or, for
one weight alone, ``tr(ΔW · H · ΔWᵀ)`` with the GPTQ Hessian ``H ∝ XᵀX``. Two starting points:
``start`` (``c = 0``: round-to-nearest on ``mse``'s scales, SignRound's) and ``start_from``
(``c = q − z − W/s``: the codes and scales of another method, e.g. GPTQ's, which the search then
refines; their codes can lie more than half a step from ``W/s``, hence the centre).

``export`` turns the result into the stored layout: the scale is rounded to its stored dtype first and
the codes are recomputed against that stored scale, so what the file decodes is what was optimized
(up to that rounding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from quant.methods.mse import mse
from quant.methods.registry import register_quantizer
from quant.qparams import group_len, qrange, scale_dtype_for
from quant.spec import QuantSpec

M_LO, M_HI = 0.7, 1.3
"""Range of the learned scale multipliers."""
STEPS, LR = 200, None
"""Default steps; ``lr=None`` = 1 / steps (SignRound's rule), decayed linearly to 0."""


@dataclasses.dataclass
class Rounding:
    """One weight's learnable rounding, held by group (``G`` groups of ``g`` columns per row): fixed
    ``w``, ``s0``, ``zero``; learned ``v``, ``m``."""

    w: Tensor        # [out, G, g] float32
    s0: Tensor       # [out, G, 1] float32
    zero: Tensor | None  # [out, G, 1] float32 or None (symmetric)
    bits: int
    v: Tensor        # [out, G, g] float32, requires grad
    m: Tensor        # [out, G, 1] float32, requires grad
    centre: Tensor | None = None  # [out, G, g] float32: v stays within centre ± 0.5 (None: 0)

    def params(self) -> list[Tensor]:
        return [self.v, self.m]


def start(w: Tensor, spec: QuantSpec, scale_dtype: torch.dtype | None = None) -> Rounding:
    """Round-to-nearest on the least-squares scales of ``mse`` (the starting point)."""
    _, s, z = mse(w, dataclasses.replace(spec, method="mse"), scale_dtype=scale_dtype or torch.float32)
    out_f, n_groups = s.shape
    wf = w.float().reshape(out_f, n_groups, -1)                              # [out, G, g]
    v = torch.zeros_like(wf, requires_grad=True)
    m = torch.ones(out_f, n_groups, 1, requires_grad=True)
    zero = None if z is None else z.float()[..., None]
    return Rounding(wf, s.float()[..., None], zero, spec.bits, v, m)


def start_from(w: Tensor, q: Tensor, scale: Tensor, zero: Tensor | None, bits: int) -> Rounding:
    """Start at given codes ``q [out, in]`` and qparams ``scale``/``zero [out, G]`` (e.g. GPTQ's): ``v``
    is the offset that reproduces ``q`` exactly (``round(W/s + v) = q − z``); the search moves it by
    ± 0.5 at most."""
    out_f, n_groups = scale.shape
    wf = w.float().reshape(out_f, n_groups, -1)                              # [out, G, g]
    s0 = scale.float()[..., None]                                            # [out, G, 1]
    z = None if zero is None else zero.float()[..., None]
    step = q.float().reshape(out_f, n_groups, -1) - (0.0 if z is None else z)  # [out, G, g], integers
    centre = torch.where(s0 > 0, step - wf / s0.clamp_min(1e-30), torch.zeros_like(wf))
    s0 = torch.where(s0 > 0, s0, torch.ones_like(s0))  # an all-zero group: codes 0 at any scale
    v = centre.clone().requires_grad_(True)
    m = torch.ones(out_f, n_groups, 1, requires_grad=True)
    return Rounding(wf, s0, z, bits, v, m, centre)


def fake_quant(r: Rounding) -> Tensor:
    """Differentiable ``Ŵ [out, in]`` (straight-through rounding)."""
    qmin, qmax = qrange(r.bits)
    s = r.s0 * r.m                                                           # [out, G, 1]
    z = 0.0 if r.zero is None else r.zero
    x = r.w / s + r.v
    x = x + (torch.round(x) - x).detach()
    q = torch.clamp(x + z, qmin, qmax)
    return ((q - z) * s).flatten(1)                                          # [out, in]


@torch.no_grad()
def signed_step(params: Sequence[Rounding], lr: float) -> None:
    """``p ← p − lr · sign(grad)`` and clamp to the allowed ranges; clears the gradients."""
    for r in params:
        for p in r.params():
            if p.grad is not None:
                p.sub_(lr * torch.sign(p.grad))
                p.grad = None
        if r.centre is None:
            r.v.clamp_(-0.5, 0.5)
        else:
            r.v.copy_(torch.minimum(torch.maximum(r.v, r.centre - 0.5), r.centre + 0.5))
        r.m.clamp_(M_LO, M_HI)


def optimize(params: Sequence[Rounding], loss_fn: Callable[[int], Tensor], steps: int = STEPS,
             lr: float | None = LR) -> tuple[float, float]:
    """Minimize ``loss_fn(step)`` over the roundings; the best ``(v, m)`` seen are kept in place.
    Returns (loss at the start, best loss)."""
    lr0 = 1.0 / steps if lr is None else lr
    best, first = float("inf"), None
    saved: list[tuple[Tensor, Tensor]] = []
    for k in range(steps):
        loss = loss_fn(k)
        val = float(loss.detach())
        first = val if first is None else first
        if val < best:
            best, saved = val, [(r.v.detach().clone(), r.m.detach().clone()) for r in params]
        loss.backward()
        signed_step(params, lr0 * (1 - k / steps))
    with torch.no_grad():
        for r, (v, m) in zip(params, saved):
            r.v.copy_(v)
            r.m.copy_(m)
    return first or 0.0, best


@torch.no_grad()
def export(r: Rounding, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
    """(codes int8 ``[out, in]``, scale ``[out, G]`` in ``scale_dtype``, zero int8 or None) of the
    learned rounding; the codes are taken against the stored scale."""
    qmin, qmax = qrange(r.bits)
    scale = (r.s0 * r.m).to(scale_dtype)                                     # [out, G, 1]
    s = scale.float()
    z = torch.zeros_like(s) if r.zero is None else r.zero
    q = torch.clamp(torch.round(r.w / s.clamp_min(1e-30) + r.v) + z, qmin, qmax)
    q = torch.where(s > 0, q, z.expand_as(q))  # an all-zero group keeps code = zero
    zero = None if r.zero is None else r.zero[..., 0].to(torch.int8)
    return q.flatten(1).to(torch.int8), scale[..., 0], zero


@register_quantizer("autoround")
def autoround(
    w: Tensor, spec: QuantSpec, *, hessian: Tensor | None = None, importance: Tensor | None = None,
    scale_dtype: torch.dtype | None = None, steps: int = STEPS, lr: float | None = LR,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One weight alone: minimize ``tr(ΔW H ΔWᵀ)`` (``hessian [in, in]``), or the ``importance``-weighted
    squared error, or without either the plain squared error (then it is ``mse``'s result, refined)."""
    group_len(w.shape[1], spec.group_size)
    sd = scale_dtype or scale_dtype_for(w.dtype)
    r = start(w, spec, sd)
    h = None if hessian is None else hessian.float() / hessian.diagonal().mean().clamp_min(1e-12)
    imp = torch.ones(w.shape[1]) if importance is None else importance.float()

    def loss(k: int) -> Tensor:
        d = fake_quant(r) - r.w.flatten(1)                                   # [out, in]
        return ((d @ h) * d).sum() if h is not None else (d.square() * imp).sum()

    optimize([r], loss, steps, lr)
    return export(r, sd)
