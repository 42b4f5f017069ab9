"""Bit allocation: one GGUF type per tensor, minimizing the summed measured error within a byte budget.

Each tensor ``t`` has candidates ``(type, bytes, error)``. The allocation minimizes ``Σ error`` subject to
``Σ bytes ≤ budget`` by the classic greedy over each tensor's lower convex hull: start every tensor at its
smallest candidate, then repeatedly take the upgrade with the largest error drop per extra byte that still
fits. On the hull the greedy is optimal for the continuous relaxation, and off by at most one upgrade of
the discrete problem. Errors are measured (``pipeline/allocate.py``): an importance-weighted weight error per
type, scaled by each tensor's sensitivity measured with the reference model on calibration text.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

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
    """The chosen candidate per tensor; UnsupportedError when even the smallest types exceed ``budget``."""
    hulls = {name: hull(c) for name, c in cands.items()}
    pos = dict.fromkeys(hulls, 0)
    used = sum(h[0].nbytes for h in hulls.values())
    if used > budget:
        raise UnsupportedError(f"the size asked for ({budget:,} bytes of tensor data) is below the smallest "
                               f"types' {used:,} bytes; ask for more bits per weight or a larger size")
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
