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
        """The learned tensors: ``v``, and ``m`` unless the scales are fixed (``start_from``)."""
        return [self.v, self.m] if self.m.requires_grad else [self.v]


def start(w: Tensor, spec: QuantSpec, scale_dtype: torch.dtype | None = None) -> Rounding:
    """Round-to-nearest on the least-squares scales of ``mse`` (the starting point)."""
    _, s, z = mse(w, dataclasses.replace(spec, method="mse"), scale_dtype=scale_dtype or torch.float32)
    out_f, n_groups = s.shape
    wf = w.float().reshape(out_f, n_groups, -1)                              # [out, G, g]
    v = torch.zeros_like(wf, requires_grad=True)
    m = torch.ones(out_f, n_groups, 1, requires_grad=True)
    zero = None if z is None else z.float()[..., None]
    return Rounding(wf, s.float()[..., None], zero, spec.bits, v, m)


def start_from(w: Tensor, q: Tensor, scale: Tensor, zero: Tensor | None, bits: int,
               learn_scale: bool = True) -> Rounding:
    """Start at given codes ``q [out, in]`` and qparams ``scale``/``zero [out, G]`` (e.g. GPTQ's): ``v`` is
    the integer ``(q − z) − round(W/s)`` (how far the codes lie from round-to-nearest), so ``W/s + v``
    reproduces ``q − z`` and keeps round-to-nearest's fraction: its distance to a rounding boundary, from which the
    signed steps flip the codes nearest it first. (Centred on the codes themselves instead, every offset sits
    half a step from its boundary and the steps flip them all at once.) The search moves ``v`` by ± 0.5 at
    most. Where float rounding would turn ``W/s + v`` into another code, ``v`` centres on the code.
    ``learn_scale=False`` keeps the scales as given (``m`` fixed at 1), e.g. scales already fitted to the
    codes by least squares, which a signed step of every multiplier at once only moves off their optimum."""
    out_f, n_groups = scale.shape
    wf = w.float().reshape(out_f, n_groups, -1)                              # [out, G, g]
    z = None if zero is None else zero.float()[..., None]
    step = q.float().reshape(out_f, n_groups, -1) - (0.0 if z is None else z)  # [out, G, g], integers
    s0 = scale.float()[..., None]                                            # [out, G, 1]
    s0 = torch.where(s0 > 0, s0, torch.ones_like(s0))  # an all-zero group: codes 0 at any scale
    u = wf / s0
    centre = step - torch.round(u)
    centre = torch.where(torch.round(u + centre) == step, centre, step - u)
    v = centre.clone().requires_grad_(True)
    m = torch.ones(out_f, n_groups, 1, requires_grad=learn_scale)
    return Rounding(wf, s0, z, bits, v, m, centre)


class _FakeQuant(torch.autograd.Function):
    """``Ŵ = (clamp(round(w/s + v) + z) − z) · s`` with ``s = s0 · m``, and its straight-through gradients in
    one pass each way (instead of autograd over eight elementwise ops on the whole weight). With ``c = q − z``
    and ``in`` = the rounded value lies inside ``[qmin, qmax]`` (clamp's gradient):
    ``∂Ŵ/∂v = in · s``, ``∂Ŵ/∂m = s0 · (c − in · w/s)``. Only ``c`` and ``in`` are kept for the backward."""

    @staticmethod
    def forward(ctx, v: Tensor, m: Tensor, r: Rounding) -> Tensor:                # type: ignore[override]
        qmin, qmax = qrange(r.bits)
        s = r.s0 * m                                                         # [out, G, 1]
        c = torch.div(r.w, s).add_(v).round_()                               # [out, G, g]
        if r.zero is not None:
            c.add_(r.zero)
        inside = (c >= qmin).logical_and_(c <= qmax)                         # [out, G, g] bool
        c.clamp_(qmin, qmax)
        if r.zero is not None:
            c.sub_(r.zero)
        ctx.r, ctx.s, ctx.c, ctx.inside = r, s, c, inside
        return (c * s).flatten(1)                                            # [out, in]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:            # type: ignore[override]
        r, s, c, inside = ctx.r, ctx.s, ctx.c, ctx.inside
        g = grad.reshape(c.shape)                                            # [out, G, g]
        gm = None
        if ctx.needs_input_grad[1]:
            gm = (g * c).sum(-1, keepdim=True)                               # [out, G, 1]
        gv = c.copy_(g).mul_(inside)                                         # c is not needed any more
        if gm is not None:
            gm = (gm - (gv * r.w).sum(-1, keepdim=True) / s) * r.s0
        ctx.c = ctx.inside = None
        return gv.mul_(s), gm, None


def fake_quant(r: Rounding) -> Tensor:
    """Differentiable ``Ŵ [out, in]`` (straight-through rounding, :class:`_FakeQuant`)."""
    return _FakeQuant.apply(r.v, r.m, r)


@torch.no_grad()
def signed_step(params: Sequence[Rounding], lr: float) -> None:
    """``p ← p − lr · sign(grad)`` and clamp to the allowed ranges, in place; clears the gradients."""
    for r in params:
        for p in r.params():
            if p.grad is not None:
                p.sub_(p.grad.sign_(), alpha=lr)
                p.grad = None
        if r.centre is None:
            r.v.clamp_(-0.5, 0.5)
        else:  # v − centre within ± 0.5
            r.v.sub_(r.centre).clamp_(-0.5, 0.5).add_(r.centre)
        r.m.clamp_(M_LO, M_HI)


def optimize(params: Sequence[Rounding], loss_fn: Callable[[int], Tensor], steps: int = STEPS,
             lr: float | None = LR, judge: Callable[[int], float] | None = None) -> tuple[float, float]:
    """Minimize ``loss_fn(step)`` over the roundings; the best ``(v, m)`` seen are kept in place. ``judge(k)``
    (called without gradients) scores each candidate: for ``k < steps`` the weights ``loss_fn(k)`` just
    set, for ``k = steps`` the last step's result (the judge sets those itself). Without it each step's
    own loss does (the last step's result unseen).
    Returns (the start's score, the best score)."""
    lr0 = 1.0 / steps if lr is None else lr
    best, first = float("inf"), None
    saved = [(torch.empty_like(r.v), torch.empty_like(r.m)) for r in params]

    def consider(val: float) -> None:
        nonlocal best, first
        first = val if first is None else first
        if val < best:
            best = val
            with torch.no_grad():
                for r, (v, m) in zip(params, saved):
                    v.copy_(r.v)
                    m.copy_(r.m)

    for k in range(steps):
        loss = loss_fn(k)
        with torch.no_grad():
            consider(float(loss) if judge is None else judge(k))
        loss.backward()
        signed_step(params, lr0 * (1 - k / steps))
    if judge is not None:
        with torch.no_grad():
            consider(judge(steps))
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
