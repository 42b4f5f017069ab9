"""Bit allocation: one GGUF type per tensor, minimizing the summed measured error within a byte budget.

Each tensor ``t`` has candidates ``(type, bytes, error)``. The allocation minimizes ``Σ error`` subject to
``Σ bytes ≤ budget`` exactly, as a multiple-choice knapsack solved by dynamic programming over the budget
(the classic greedy over each tensor's lower convex hull is optimal only for the continuous relaxation, and
stops short of the budget when the next hull step does not fit). Errors are measured
(``pipeline/allocate.py``): an importance-weighted weight error per type, scaled by each tensor's
sensitivity measured with the reference model on calibration text.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from gemma2_convert.core.errors import UnsupportedError


@dataclass(frozen=True)
class Candidate:
    qtype: str
    nbytes: int
    error: float


def hull(cands: list[Candidate]) -> list[Candidate]:
    """The lower convex hull of ``(bytes, error)``, by increasing bytes (dominated candidates dropped)."""
    pts: list[Candidate] = []
    for c in sorted(cands, key=lambda c: (c.nbytes, c.error)):
        if pts and c.error >= pts[-1].error:
            continue  # more bytes for no less error
        while len(pts) >= 2 and _slope(pts[-2], pts[-1]) <= _slope(pts[-1], c):
            pts.pop()  # pts[-1] lies above the segment from pts[-2] to c
        pts.append(c)
    return pts


def _slope(a: Candidate, b: Candidate) -> float:
    """Error saved per extra byte from ``a`` to ``b`` (positive)."""
    return (a.error - b.error) / max(b.nbytes - a.nbytes, 1)


def allocate(cands: dict[str, list[Candidate]], budget: int) -> dict[str, Candidate]:
    """The chosen candidate per tensor; UnsupportedError when even the smallest types exceed ``budget``.

    Exact multiple-choice knapsack by dynamic programming over the budget in ``unit``-byte cells (each
    candidate's bytes rounded up, so the choice always fits): ``best[b]`` is the least summed error of the
    tensors so far within ``b`` cells. Unlike the hull greedy, it also spends the bytes left at the end."""
    hulls = {name: _useful(c) for name, c in cands.items()}
    least = sum(h[0].nbytes for h in hulls.values())
    if least > budget:
        raise UnsupportedError(f"the size asked for ({budget:,} bytes of tensor data) is below the smallest "
                               f"types' {least:,} bytes; ask for more bits per weight or a larger size")
    unit = max(1, budget // CELLS)
    cells = budget // unit
    best = np.zeros(cells + 1)                                          # [cells+1] least error within b cells
    picks = []
    for name, h in hulls.items():
        nxt = np.full((len(h), cells + 1), np.inf)                      # [candidates, cells+1]
        for k, c in enumerate(h):
            cost = -(-c.nbytes // unit)
            if cost <= cells:
                nxt[k, cost:] = best[:cells + 1 - cost] + c.error
        picks.append(nxt.argmin(0).astype(np.int8))
        best = nxt.min(0)
    if not np.isfinite(best[cells]):  # the rounding up of bytes can exceed a budget the bytes fit
        return _greedy(hulls, budget)
    chosen, b = {}, cells
    for (name, h), pick in zip(reversed(list(hulls.items())), reversed(picks)):
        c = h[pick[b]]
        chosen[name] = c
        b -= -(-c.nbytes // unit)
    return {name: chosen[name] for name in hulls}


CELLS = 1 << 16
"""Budget resolution of :func:`allocate`: at most this many cells (a cell ≤ 1/65536 of the budget)."""


def _useful(cands: list[Candidate]) -> list[Candidate]:
    """Candidates not dominated (another has no more bytes and less error), by increasing bytes."""
    kept: list[Candidate] = []
    for c in sorted(cands, key=lambda c: (c.nbytes, c.error)):
        if not kept or c.error < kept[-1].error:
            kept.append(c)
    return kept


def _greedy(hulls: dict[str, list[Candidate]], budget: int) -> dict[str, Candidate]:
    """The lower-hull greedy: every tensor at its smallest candidate, then the upgrade with the largest
    error drop per extra byte that still fits, until none does (within one upgrade of the optimum)."""
    hulls = {name: hull(h) for name, h in hulls.items()}
    pos = dict.fromkeys(hulls, 0)
    used = sum(h[0].nbytes for h in hulls.values())
    heap = [(-_slope(h[0], h[1]), name) for name, h in hulls.items() if len(h) > 1]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        h, i = hulls[name], pos[name]
        extra = h[i + 1].nbytes - h[i].nbytes
        if used + extra > budget:
            continue  # this upgrade does not fit; cheaper ones of other tensors still may
        used += extra
        pos[name] = i + 1
        if i + 2 < len(h):
            heapq.heappush(heap, (-_slope(h[i + 1], h[i + 2]), name))
    return {name: hulls[name][i] for name, i in pos.items()}
