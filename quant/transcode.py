"""Lossless moves of quantized codes between layouts: the same numbers, another block type.

``recode(src, target)`` rewrites one tensor's ``QuantCodes`` (``quant/qtensor.py``) in the ``target`` layout —
its kind (sym / asym / affine), width, group and the dtype its scale (and bias) are stored in — and says which
groups it could not hold exactly. Exact means *the values the codes stand for are equal*: the codes are
kept, so each group's line ``a·u + b`` (``(u - zero)·scale`` or ``scale·u + bias``, in float64:
``QuantCodes.line``) must be the same in the result — checked per group on the parameters, so every
condition (an fp16 scale must hold a bf16/fp32 one; an asymmetric zero-point must be a whole code for a
symmetric block; an affine bias must be −2^(b−1)·scale for Q4_0, −zero·scale for compressed-tensors' asym)
is checked on the numbers themselves, not on a rule that could miss a case.

A group that is not exact keeps the nearest parameters the target can store (its error is reported), or is
re-quantized from the source's dequantized values (``requantize``: min/max round-to-nearest in the target).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gemma2_convert.core.errors import UnsupportedError
from quant.qtensor import QuantCodes


@dataclass(frozen=True)
class Target:
    """A block layout to move codes into."""

    kind: str
    bits: int
    group_size: int
    scale_dtype: torch.dtype
    """The dtype the scale (and an affine bias) is stored in: float16 for GGUF blocks."""
    compute_dtype: torch.dtype
    """The dtype the target decodes in: float32 for GGUF (its fp16 scales are widened first)."""
    name: str
    """For messages: ``gguf:Q4_0``, ``mlx``, ``compressed-tensors``."""


@dataclass
class Recoded:
    codes: QuantCodes
    """In ``target.compute_dtype`` (a GGUF target's fp16 scales widened to float32)."""
    bad_groups: int
    groups: int
    max_error: float
    """Largest |Δ| between the source's and the result's dequantized values (0.0 when lossless)."""


def regroup(c: QuantCodes, group: int, name: str, target: str) -> QuantCodes:
    """``c`` with groups of ``group`` columns: a group of ``k·group`` splits into ``k`` with the same scale."""
    g = c.group_size
    if g == group:
        return c
    if g % group:
        raise UnsupportedError(f"{name}: groups of {g} columns cannot become {target} blocks of {group} (a block "
                               f"would span two scales); the group sizes must match, or the source's be a multiple")
    k = g // group
    off = None if c.offset is None else c.offset.repeat_interleave(k, dim=1)
    return QuantCodes(c.u, c.scale.repeat_interleave(k, dim=1), off, c.kind, c.bits)


def _params(c: QuantCodes, t: Target) -> tuple[Tensor, Tensor | None]:
    """The target's scale and offset for ``c``'s groups, before the exactness check (float64 math)."""
    s = c.scale.to(t.scale_dtype).to(t.compute_dtype)
    half = float(1 << (c.bits - 1))
    if c.kind == "sym":
        zero = torch.full_like(c.scale, half, dtype=torch.float64)
    elif c.kind == "asym":
        zero = c.offset.to(torch.float64)  # type: ignore[union-attr]
    else:   # affine: the zero a bias implies (bias = -zero·scale)
        zero = -c.offset.to(torch.float64) / c.scale.to(torch.float64)  # type: ignore[union-attr]
    if t.kind == "sym":
        return s, None
    if t.kind == "asym":
        return s, torch.round(zero).clamp(0, (1 << t.bits) - 1).to(torch.int16)
    bias = c.offset if c.kind == "affine" else -zero * c.scale.to(torch.float64)
    return s, bias.to(t.scale_dtype).to(t.compute_dtype)  # type: ignore[union-attr]


def recode(src: QuantCodes, t: Target, name: str) -> Recoded:
    """``src`` in layout ``t``, with the count of groups whose dequantized values changed."""
    if src.bits != t.bits:
        raise UnsupportedError(f"{name}: {src.bits}-bit codes cannot be {t.name} ({t.bits}-bit) blocks without "
                               "re-quantizing; pick a target type of the same width")
    c = regroup(src, t.group_size, name, t.name)
    fast = _fast_exact(c, t)
    if fast is not None:
        return Recoded(fast, 0, c.scale.numel(), 0.0)
    scale, offset = _params(c, t)
    out = QuantCodes(c.u, scale, offset, t.kind, t.bits)
    (a0, b0), (a1, b1) = c.line(), out.line()                                               # [out, G] each
    top = float((1 << t.bits) - 1)
    diff = torch.maximum((b1 - b0).abs(), ((a1 - a0) * top + (b1 - b0)).abs())  # max |Δ| over u ∈ [0, top]
    bad = diff.ne(0) | ~torch.isfinite(diff)
    return Recoded(out, int(bad.sum()), bad.numel(), float(diff.max()) if diff.numel() else 0.0)


def _survives(x: Tensor, t: Target) -> Tensor | None:
    """``x`` stored in ``t``'s dtype and widened to its compute dtype, when that changes no value (and all are
    finite); compared in a dtype holding both sides exactly (float32 holds fp16/bf16; float64 everything)."""
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(t.scale_dtype).to(t.compute_dtype)
    return y if torch.equal(y.to(wide), x.to(wide)) and bool(torch.isfinite(x).all()) else None


def _fast_exact(c: QuantCodes, t: Target) -> QuantCodes | None:
    """``c`` in ``t`` when every group is exact, for a same-kind move or sym → affine; else None (the caller then
    runs the line check for the count and the error). The codes are kept, so the lines are equal exactly when the
    scale and the offset survive the target's storage: an asym zero-point is an integer either side; sym → affine
    takes the bias ``-2^(b-1)·scale`` (exact in float32/64 for fp16/bf16/fp32 scales: a power-of-two multiple)."""
    if not (c.kind == t.kind or (c.kind, t.kind) == ("sym", "affine")):
        return None
    s = _survives(c.scale, t)
    off: Tensor | None = c.offset
    if s is not None and t.kind == "affine":
        wide = torch.float64 if c.scale.dtype == torch.float64 else torch.float32
        bias = c.offset if c.kind == "affine" else -float(1 << (c.bits - 1)) * c.scale.to(wide)
        off = _survives(bias, t)  # type: ignore[arg-type]
        if off is None:
            return None
    return None if s is None else QuantCodes(c.u, s, off, t.kind, t.bits)


def requantize_bad(r: Recoded, src: QuantCodes, t: Target) -> Recoded:
    """``r`` with its inexact groups re-quantized (min/max RTN in ``t``) from ``src``'s dequantized values."""
    if r.bad_groups == 0:
        return r
    c = regroup(src, t.group_size, "", t.name)
    w = c.dequantize().float()
    out_f, in_f = w.shape
    wg = w.reshape(out_f, in_f // t.group_size, t.group_size)                               # [out, G, g]
    qmax = (1 << t.bits) - 1
    if t.kind == "sym":
        amax = wg.abs().amax(-1)
        s = (amax / (qmax // 2 + 1)).to(t.scale_dtype).to(t.compute_dtype).clamp(min=torch.finfo(torch.float16).tiny)
        off = None
        u = torch.round(wg / s[..., None]) + (qmax // 2 + 1)
    else:
        mn, mx = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        s = ((mx - mn) / qmax).to(t.scale_dtype).to(t.compute_dtype).clamp(min=torch.finfo(torch.float16).tiny)
        if t.kind == "asym":
            off = torch.round(-mn / s).clamp(0, qmax).to(torch.int16)
            u = torch.round(wg / s[..., None]) + off[..., None]
        else:
            off = mn.to(t.scale_dtype).to(t.compute_dtype)
            u = torch.round((wg - off[..., None]) / s[..., None])
    u = u.clamp(0, qmax).to(torch.uint8).reshape(out_f, in_f)
    fresh = QuantCodes(u, s, off, t.kind, t.bits)
    return _merge(r, fresh, c)


def _merge(r: Recoded, fresh: QuantCodes, src: QuantCodes) -> Recoded:
    """The exact groups of ``r`` with the inexact ones taken from ``fresh``; the error measured again."""
    out_f, in_f = r.codes.u.shape
    g = in_f // r.codes.scale.shape[1]
    a = src.exact().reshape(out_f, in_f // g, g)
    (a0, b0), (a1, b1) = src.line(), r.codes.line()
    bad = (a0 != a1) | (b0 != b1)                                                           # [out, G]
    u = torch.where(bad[..., None], fresh.u.reshape(out_f, -1, g), r.codes.u.reshape(out_f, -1, g))
    scale = torch.where(bad, fresh.scale, r.codes.scale)
    off = None if fresh.offset is None else torch.where(bad, fresh.offset, r.codes.offset)  # type: ignore[arg-type]
    merged = QuantCodes(u.reshape(out_f, in_f), scale, off, r.codes.kind, r.codes.bits)
    err = (merged.exact().reshape(out_f, -1, g) - a).abs().amax()
    return Recoded(merged, r.bad_groups, r.groups, float(err))
