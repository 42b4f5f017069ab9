"""The candidate grids of the ``mse`` search, shared by its torch code (``mse.py``) and its kernel (``mse_jit.py``).

Grid point ``k = 0..nstep`` tries the inverse scale ``c_k / amax`` (symmetric) or ``c_k / (max - min)``
(asymmetric), with ``c_k = half · (1 + rmin + rdelta·k)`` and ``half = (qmax - qmin) / 2`` (symmetric)
or ``qmax - qmin`` (asymmetric).
"""

from __future__ import annotations

ASYM_GRID = (-1 / 15, 1 / 150, 20)
"""(rmin, rdelta, nstep): iscale = (qmax - qmin)·(1 + rmin + rdelta·k) / (max - min), k = 0..nstep.
For 4 bits this is Q4_K's ``make_qkx2_quants(…, rmin=-1, rdelta=0.1, nstep=20)`` grid (±1 code)."""
SYM_GRID = (-2 / 15, 2 / 75, 30)
"""(rmin, rdelta, nstep): iscale = (qmax - qmin)/2·(1 + rmin + rdelta·k) / amax, k = 0..nstep.
For 4 bits: 6.5 … 12.5 codes for the largest weight in 0.2 steps, i.e. up to 40 % of it clipped."""
TINY = 1e-30
"""Floor of a group's amax (symmetric) or span (asymmetric): an all-zero group gets a tiny positive scale."""


def grid_points(symmetric: bool) -> int:
    """Candidates on the grid (``nstep + 1``), the RTN seed not counted."""
    return (SYM_GRID if symmetric else ASYM_GRID)[2] + 1
