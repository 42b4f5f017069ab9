"""GPTQ into K-quant and IQ4 blocks: llama.cpp's scales kept, the codes chosen by GPTQ's error feedback.

Q4_K / Q5_K / Q6_K / IQ4_XS store per super-block fp16 scales and per sub-block 6-/8-bit scale (and min)
codes, Q2_K 4-bit scale and min codes per 16 elements under fp16 ``d``/``dmin``, Q3_K 6-bit signed scales
per 16 under an fp16 ``d``, IQ4_NL an fp16 scale per 32: the element codes lie on a grid
``x = a·level(q) + b`` per sub-block (``level(q) = q``, or IQ4's 16-value codebook). llama.cpp's search
(with the activation importance, as ``llama-quantize --imatrix``) fixes the grid; GPTQ
(../shared/spec/QUANT_FORMATS.md §3.1) then rounds each column onto its own grid, pushing the rounding error
onto the columns not yet done; the blocks are packed with the same scales and the new codes, so they decode
exactly to the grid values GPTQ chose.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from quant.gguf_codec import quantize_tensor
from quant.gguf_iq4 import KVALUES, pack_iq4_nl, pack_iq4_xs
from quant.gguf_kquants import pack_q4_k, pack_q5_k, pack_q6_k, unpack_k_scales
from quant.gguf_kquants_low import pack_q2_k, pack_q3_k, unpack_q3_scales
from quant.gguf_legacy import f16_from_bytes, split_bytes, unpack_nibbles
from quant.methods.gptq import (
    HessianFactor,
    LazyBlock,
    factor_hessian,
    feedback_in_order,
)

GRID_TYPES = ("Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ4_NL", "Q2_K", "Q3_K")
"""The GGUF types :func:`gptq_blocks` writes."""
_AFFINE = {"Q4_K": (15, pack_q4_k, 144), "Q5_K": (31, pack_q5_k, 176)}  # nmax, packer, block bytes


@dataclass(frozen=True)
class Grid:
    """Per-element grid ``x = step·level(q) + offset``, ``q ∈ [lo, hi]``; ``step``, ``offset``: float32
    ``[out, in]``; ``levels``: float32 ``[hi − lo + 1]`` for a codebook (IQ4's), None: ``level(q) = q``."""
    step: Tensor
    offset: Tensor
    lo: int
    hi: int
    levels: Tensor | None = None

    def level(self, q: Tensor) -> Tensor:
        return q if self.levels is None else self.levels[(q - self.lo).long()]

    def nearest(self, t: Tensor) -> Tensor:
        """The code whose level is nearest to ``t`` (float32, in units of ``step``)."""
        if self.levels is None:
            return torch.round(t).clamp(self.lo, self.hi)
        mids = (self.levels[1:] + self.levels[:-1]) / 2
        return (torch.bucketize(t, mids) + self.lo).to(t.dtype)

    def value(self, q: Tensor) -> Tensor:
        """What codes ``q [out, in]`` decode to (bit for bit as the block's dequantization)."""
        return self.step * self.level(q) + self.offset


def _kvalues() -> Tensor:
    return torch.tensor(KVALUES, dtype=torch.float32)


def _expand(v: Tensor, rows: int, n: int) -> Tensor:
    """Per-sub-block values ``[rows, nsb, k]`` → per-element ``[rows, nsb·k·n]`` (sub-blocks of ``n``)."""
    return v.float().unsqueeze(-1).expand(*v.shape, n).reshape(rows, -1)


def gptq_on_grid(w: Tensor, hessian: Tensor | None, grid: Grid, damp: float = 0.01, block: int = 128,
                 act_order: bool = True, factor: HessianFactor | None = None) -> Tensor:
    """GPTQ codes ``[out, in]`` (int64 in ``[lo, hi]``) of ``w [out, in]`` on a fixed grid, Hessian
    ``[in, in]`` or its ``factor`` (``quant.methods.gptq.factor_hessian``, shared by weights with the same
    input: then ``damp``/``act_order`` are the factor's); ``act_order``: columns by decreasing ``diag(H)``
    (the grid is per element, so any order keeps the layout)."""
    if factor is None:
        if hessian is None:
            raise ValueError("gptq_on_grid needs a hessian or its factor")
        factor = factor_hessian(hessian, damp, act_order)
    perm = factor.perm
    grid = Grid(grid.step[:, perm], grid.offset[:, perm], grid.lo, grid.hi, grid.levels)  # in visiting order

    def column(i: int, col: Tensor, _blk: LazyBlock) -> tuple[Tensor, Tensor]:
        """Column ``i`` (visiting order) rounded onto its own grid."""
        step = grid.step[:, i]
        safe = torch.where(step != 0, step, torch.ones_like(step))
        qi = grid.nearest((col - grid.offset[:, i]) / safe)
        qi = torch.where(step != 0, qi, torch.full_like(qi, max(grid.lo, 0)))
        return qi, step * grid.level(qi) + grid.offset[:, i]

    return feedback_in_order(w, factor, block, column).to(torch.int64)


def _low_k_grid(raw: Tensor, qtype: str, rows: int, nsb: int) -> tuple[Grid, Callable[[Tensor], Tensor]]:
    """Q2_K / Q3_K bytes ``[R, nsb·size]`` → their grid (sixteen 16-element sub-blocks a super-block, the
    layouts of ``quant/gguf_kquants_low.py``) and the packer of codes with those scales."""
    if qtype == "Q2_K":
        scales, _, d, dmin = split_bytes(raw, 84, [16, 64, 2, 2])
        scales, d, dmin = scales.contiguous(), f16_from_bytes(d), f16_from_bytes(dmin)  # [R,nsb,16], [R,nsb]
        # x = (d·sc_j)·q − dmin·m_j, sc_j and m_j the low and high nibbles of scales[j]
        step = _expand(d.unsqueeze(-1) * (scales & 0xF).to(torch.float32), rows, 16)
        offset = -_expand(dmin.unsqueeze(-1) * (scales >> 4).to(torch.float32), rows, 16)
        return Grid(step, offset, 0, 3), \
            lambda q: pack_q2_k(d.half(), dmin.half(), scales, q.to(torch.uint8).reshape(rows, nsb, 256))
    _, _, sc, d = split_bytes(raw, 110, [32, 64, 12, 2])
    ls, d = unpack_q3_scales(sc), f16_from_bytes(d)                                   # [R, nsb, 16], [R, nsb]
    step = _expand(d.unsqueeze(-1) * (ls.to(torch.float32) - 32), rows, 16)  # x = d·(ls_j − 32)·(q − 4)
    return Grid(step, torch.zeros_like(step), -4, 3), \
        lambda q: pack_q3_k(d.half(), ls, (q + 4).to(torch.uint8).reshape(rows, nsb, 256))


def choose_grid(w: Tensor, qtype: str, importance: Tensor | None) -> tuple[Grid, Callable[[Tensor], Tensor]]:
    """llama.cpp's ``qtype`` scales for ``w [out, in]`` (its search with ``importance``, our byte-identical
    kernels) read back from its blocks as a :class:`Grid`, and the packer of codes ``[out, in]`` in the grid's
    range into block bytes with exactly those scales."""
    raw, rows = quantize_tensor(w, qtype, quant_weights=importance), w.shape[0]
    nsb = w.shape[1] // 256
    if qtype in ("Q2_K", "Q3_K"):
        return _low_k_grid(raw, qtype, rows, nsb)
    if qtype == "IQ4_NL":
        d = f16_from_bytes(split_bytes(raw, 18, [2, 16])[0])            # [R, nb]; x = d·K[q]
        step = _expand(d, rows, 32)
        return Grid(step, torch.zeros_like(step), 0, 15, _kvalues()), \
            lambda q: pack_iq4_nl(d.half(), q.to(torch.uint8).reshape(rows, -1, 32))
    if qtype == "IQ4_XS":
        d, sh, sl, _ = split_bytes(raw, 136, [2, 2, 4, 128])
        high = sh.to(torch.int32)
        high = (high[..., :1] | (high[..., 1:] << 8)) >> torch.arange(0, 16, 2, dtype=torch.int32)
        ls = unpack_nibbles(sl.unsqueeze(-1)).flatten(-2).to(torch.int32) | ((high & 3) << 4)  # [R, nsb, 8]
        d = f16_from_bytes(d)                                               # x = (d·(ls_j − 32))·K[q]
        step = _expand(d.unsqueeze(-1) * (ls - 32).to(torch.float32), rows, 32)
        return Grid(step, torch.zeros_like(step), 0, 15, _kvalues()), \
            lambda q: pack_iq4_xs(d.half(), ls.to(torch.uint8), q.to(torch.uint8).reshape(rows, nsb, 256))
    if qtype == "Q6_K":
        _, _, sc, d = split_bytes(raw, 210, [128, 64, 16, 2])
        sc, d = sc.contiguous().view(torch.int8), f16_from_bytes(d)       # [R, nsb, 16], [R, nsb]
        step = _expand(d.unsqueeze(-1) * sc.to(torch.float32), rows, 16)  # x = (d·sc_j)·(q − 32)
        return Grid(step, torch.zeros_like(step), -32, 31), \
            lambda q: pack_q6_k(d.half(), sc, (q + 32).to(torch.uint8).reshape(rows, nsb, 256))
    nmax, pack, size = _AFFINE[qtype]
    d, dmin, scales = split_bytes(raw, size, [2, 2, 12, size - 16])[:3]
    sc, m = unpack_k_scales(scales)                                         # [R, nsb, 8] each
    d, dmin = f16_from_bytes(d), f16_from_bytes(dmin)                       # x = (d·sc_j)·q − dmin·m_j
    step = _expand(d.unsqueeze(-1) * sc.to(torch.float32), rows, 32)
    offset = -_expand(dmin.unsqueeze(-1) * m.to(torch.float32), rows, 32)
    return Grid(step, offset, 0, nmax), \
        lambda q: pack(d.half(), dmin.half(), sc, m, q.to(torch.uint8).reshape(rows, nsb, 256))


def gptq_blocks(w: Tensor, qtype: str, hessian: Tensor | None, importance: Tensor | None,
                factor: HessianFactor | None = None) -> Tensor:
    """``qtype`` block bytes of ``w [out, in]``: llama.cpp's scales (searched with ``importance``), GPTQ's
    codes (act-order; on ``factor`` when given, e.g. shared by q/k/v)."""
    grid, pack = choose_grid(w, qtype, importance)
    return pack(gptq_on_grid(w, hessian, grid, factor=factor))
