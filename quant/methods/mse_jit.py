"""Compiled per-group search of the ``mse`` method (``quant/methods/mse.py``): the same candidates, one pass.

:func:`search` returns what ``_sym_search`` / ``_asym_search`` return — the best scale (and integral
zero-point) per group, float32 ``[out, G]`` — from the same candidates chosen by the same rule:

* the min/max (RTN) qparams seed the search, with their weighted squared error;
* grid point ``k`` rounds the group with ``iscale = (1 / amax) · c_k`` (``(1 / span) · c_k`` asymmetric),
  in float32 exactly as torch evaluates ``c_k / amax`` (``Tensor.__rtruediv__`` is reciprocal, then
  multiply), and refits the scale in closed form; asymmetric grid points try their own zero-point
  and, when ``Σw·Σw·l² - (Σw·l)² > 0``, the rounded least-squares one;
* a candidate's error is ``Σw·x² - s·Σw·d·x``, inf unless ``s > 0``; it replaces the best one only
  when strictly lower (NaN never does), in grid order.

Differences from the torch code, none of them in the candidates: the error weights
``(|x| + rms(group)) · importance`` are made per group inside the kernel (float32, as torch does;
``rms`` from a float64 sum of the float32 squares) instead of as a ``[out, G, g]`` tensor, and all
moments and errors are accumulated in float64 in element order (torch sums float32 products in
float32, in an order of its own, and then casts). So a group whose best candidates are tied to
float32 rounding may pick a different one of them (tests/test_mse_jit.py measures how often).

A group is read from memory once (the later passes over it — weights, RTN seed, grid — hit L1), and
every weight updates all grid points' moments at once: the inner loop runs over the grid (padded to
``SYM_LANES`` / ``ASYM_LANES``), which LLVM vectorizes without reassociating any sum. Kernels are
serial and release the GIL; :func:`search` spreads row blocks over threads, and the result does not
depend on the split.

Each kernel writes its own block loop, preamble included, instead of sharing helper kernels that take the
scratch arrays: through a call LLVM loses the no-alias facts about them and stops vectorizing (measured on
the K-quant kernels: 5x slower).
"""

from __future__ import annotations

import numpy as np

from quant.jit import kernel, parallel_for
from quant.methods.mse_grid import ASYM_GRID, SYM_GRID, TINY, grid_points
from quant.qparams import qrange

_TINY = np.float32(TINY)
"""``clamp_min`` of amax / span, as the torch search's."""
SYM_LANES = 32
"""Grid points the symmetric kernel evaluates per weight: ``SYM_GRID``'s 31, padded. A compile-time
trip count that is a multiple of the vector width lets LLVM vectorize the loop over the grid."""
ASYM_LANES = 24
"""The same for the asymmetric kernel: ``ASYM_GRID``'s 21, padded."""
MIN_BLOCK_ELEMENTS = 1 << 16
"""Fewest weights per thread's row block: smaller matrices are searched on the calling thread."""


def grid_constants(bits: int, symmetric: bool) -> np.ndarray:
    """float32 ``c_k`` of the grid, computed in Python floats exactly as ``mse._sym_search`` / ``_asym_search``
    do, then zeros up to ``SYM_LANES`` / ``ASYM_LANES`` (the kernels skip those when they choose)."""
    qmin, qmax = qrange(bits)
    if symmetric:
        half, (rmin, rdelta, nstep), lanes = (qmax - qmin) / 2, SYM_GRID, SYM_LANES
    else:
        half, (rmin, rdelta, nstep), lanes = qmax - qmin, ASYM_GRID, ASYM_LANES
    if nstep + 1 > lanes:
        raise ValueError(f"{nstep + 1} grid points do not fit the kernel's {lanes}")
    cs = np.zeros(lanes, np.float32)
    cs[: nstep + 1] = [half * (1 + rmin + rdelta * k) for k in range(nstep + 1)]
    return cs


@kernel
def _weights(x, r, o, g, imp, wts):  # noqa: ANN001,ANN202 - numba kernel
    """``wts[:g] = (|x| + rms) · importance`` in float32 for the group at row ``r``, column ``o``."""
    ss = 0.0
    for i in range(g):
        v = x[r, o + i]
        ss += np.float64(v * v)
    rms = np.sqrt(np.float32(ss) / np.float32(g))
    if imp.shape[1] == 0:
        for i in range(g):
            wts[i] = abs(x[r, o + i]) + rms
    else:
        ri = r if imp.shape[0] > 1 else 0
        for i in range(g):
            wts[i] = (abs(x[r, o + i]) + rms) * imp[ri, o + i]


@kernel
def sym_rows(x, g, imp, qmin, qmax, cs, n_grid, scale):  # noqa: ANN001,ANN201 - numba kernel
    """Best positive scale per group into ``scale [rows, in // g]`` (float32).

    ``x``: float32 ``[rows, in]``; ``imp``: float32 ``[rows, in]``, ``[1, in]`` (per column) or
    ``[0, 0]`` (none); ``cs``: :func:`grid_constants`, of which the first ``n_grid`` are the grid.
    """
    rows, n_in = x.shape
    fqmin, fqmax = np.float32(qmin), np.float32(qmax)
    half = np.float32((qmax - qmin) / 2)
    wts = np.empty(g, np.float32)
    iscale = np.empty(SYM_LANES, np.float32)
    sl2 = np.empty(SYM_LANES, np.float64)
    slx = np.empty(SYM_LANES, np.float64)
    for r in range(rows):
        for j in range(n_in // g):
            o = j * g
            amax = np.float32(0.0)
            for i in range(g):
                a = abs(x[r, o + i])
                if a > amax or a != a:  # a NaN sticks, as in torch.amax
                    amax = a
            if amax < _TINY:
                amax = _TINY
            _weights(x, r, o, g, imp, wts)
            # seed: RTN, with its error evaluated directly
            s0 = amax / half
            err0, sxx = 0.0, 0.0
            for i in range(g):
                v = x[r, o + i]
                y = v / s0
                if y < fqmin:
                    y = fqmin
                if y > fqmax:
                    y = fqmax
                wv, xv = np.float64(wts[i]), np.float64(v)
                d = xv - np.float64(s0) * np.float64(np.rint(y))
                err0 += wv * d * d
                sxx += wv * xv * xv
            # grid: the moments of every grid point's codes, element by element
            rcp = np.float32(1.0) / amax
            for k in range(SYM_LANES):
                iscale[k] = rcp * cs[k]
                sl2[k] = 0.0
                slx[k] = 0.0
            for i in range(g):
                v = x[r, o + i]
                wv, xv = np.float64(wts[i]), np.float64(v)
                for k in range(SYM_LANES):
                    y = v * iscale[k]
                    y = fqmin if y < fqmin else y
                    y = fqmax if y > fqmax else y
                    wl = wv * np.float64(np.rint(y))
                    sl2[k] += wl * np.float64(np.rint(y))
                    slx[k] += wl * xv
            best_err, best_s = err0, np.float64(s0)
            for k in range(n_grid):
                s = slx[k] / sl2[k] if sl2[k] > 0.0 else np.nan
                err = sxx - s * slx[k] if s > 0.0 else np.inf
                if err < best_err:
                    best_err, best_s = err, s
            scale[r, j] = np.float32(best_s)


@kernel
def asym_rows(x, g, imp, qmin, qmax, cs, n_grid, scale, zero):  # noqa: ANN001,ANN201 - numba kernel
    """Best ``(scale, zero)`` per group into ``scale``, ``zero [rows, in // g]`` (float32, zero integral).

    Arguments as :func:`sym_rows`. With ``d = l - z``: ``Σw·d·x = Σw·l·x - z·Σw·x`` and
    ``Σw·d² = Σw·l² - 2z·Σw·l + z²·Σw``, so each candidate needs only three moments of its codes.
    """
    rows, n_in = x.shape
    fqmin, fqmax = np.float32(qmin), np.float32(qmax)
    dqmin, dqmax = np.float64(qmin), np.float64(qmax)
    nlev = np.float32(qmax - qmin)
    wts = np.empty(g, np.float32)
    iscale = np.empty(ASYM_LANES, np.float32)
    zc = np.empty(ASYM_LANES, np.float32)
    sl = np.empty(ASYM_LANES, np.float64)
    sl2 = np.empty(ASYM_LANES, np.float64)
    slx = np.empty(ASYM_LANES, np.float64)
    for r in range(rows):
        for j in range(n_in // g):
            o = j * g
            mn, mx = np.float32(0.0), np.float32(0.0)
            for i in range(g):
                v = x[r, o + i]
                if v < mn or v != v:  # a NaN sticks, as in torch.amin / amax
                    mn = v
                if v > mx or v != v:
                    mx = v
            span = mx - mn
            if span < _TINY:
                span = _TINY
            _weights(x, r, o, g, imp, wts)
            # seed: RTN, with its error evaluated directly
            s0 = span / nlev
            z0 = fqmin - mn / s0
            z0 = fqmin if z0 < fqmin else z0
            z0 = fqmax if z0 > fqmax else z0
            z0 = np.rint(z0)
            err0, sw, sx, sxx = 0.0, 0.0, 0.0, 0.0
            for i in range(g):
                v = x[r, o + i]
                y = v / s0 + z0
                y = fqmin if y < fqmin else y
                y = fqmax if y > fqmax else y
                wv, xv = np.float64(wts[i]), np.float64(v)
                d = xv - np.float64(s0) * (np.float64(np.rint(y)) - np.float64(z0))
                err0 += wv * d * d
                sw += wv
                sx += wv * xv
                sxx += wv * xv * xv
            rcp = np.float32(1.0) / span
            for k in range(ASYM_LANES):
                isc = rcp * cs[k]
                z = fqmin - mn * isc
                z = fqmin if z < fqmin else z
                z = fqmax if z > fqmax else z
                iscale[k] = isc
                zc[k] = np.rint(z)
                sl[k] = 0.0
                sl2[k] = 0.0
                slx[k] = 0.0
            for i in range(g):
                v = x[r, o + i]
                wv, xv = np.float64(wts[i]), np.float64(v)
                for k in range(ASYM_LANES):
                    y = v * iscale[k] + zc[k]
                    y = fqmin if y < fqmin else y
                    y = fqmax if y > fqmax else y
                    lv = np.float64(np.rint(y))
                    wl = wv * lv
                    sl[k] += wl
                    sl2[k] += wl * lv
                    slx[k] += wl * xv
            best_err, best_s, best_z = err0, np.float64(s0), z0
            for k in range(n_grid):
                a1, a2, ax = sl[k], sl2[k], slx[k]
                for c in range(2):
                    if c == 0:
                        zf = zc[k]
                    else:  # the least-squares offset of the fit x ≈ s·l + m, as an integer zero-point
                        if not sw * a2 - a1 * a1 > 0.0:
                            break
                        zd = -((a2 * sx - a1 * ax) / (sw * ax - a1 * sx))
                        zd = dqmin if zd < dqmin else zd
                        zd = dqmax if zd > dqmax else zd
                        zd = np.rint(zd)
                        if zd != zd:
                            break
                        zf = np.float32(zd)
                    zd = np.float64(zf)
                    sdx = ax - zd * sx
                    sdd = a2 - 2.0 * zd * a1 + zd * zd * sw
                    s = sdx / sdd if sdd > 0.0 else np.nan
                    err = sxx - s * sdx if s > 0.0 else np.inf
                    if err < best_err:
                        best_err, best_s, best_z = err, s, zf
            scale[r, j] = np.float32(best_s)
            zero[r, j] = best_z


def _row_blocks(rows: int, cols: int, threads: int) -> list[tuple[int, int]]:
    """Row ranges for ``threads`` workers: about four blocks each, none under ``MIN_BLOCK_ELEMENTS``."""
    n = max(1, min(threads * 4, rows * cols // MIN_BLOCK_ELEMENTS, rows)) if threads > 1 else 1
    step = -(-rows // n)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def search(
    x: np.ndarray, g: int, importance: np.ndarray | None, bits: int, symmetric: bool, threads: int = 1
) -> tuple[np.ndarray, np.ndarray | None]:
    """Best per-group ``(scale, zero)`` of ``x`` (float32 ``[rows, in]``, groups of ``g`` columns).

    ``importance``: float32 ``[in]``, ``[1, in]`` or ``[rows, in]``, or None. Returns float32
    ``scale [rows, in // g]`` and, when not ``symmetric``, float32 integral ``zero`` (else None).
    ``threads`` > 1 searches row blocks in parallel (same result).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    if cols % g:
        raise ValueError(f"in_features={cols} is not a multiple of group_size={g}")
    if importance is None:
        imp = np.zeros((0, 0), np.float32)
    else:
        if tuple(importance.shape) not in ((cols,), (1, cols), (rows, cols)):
            raise ValueError(f"importance has shape {list(importance.shape)}; expected [{cols}] or [{rows}, {cols}]")
        imp = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1, cols)
    qmin, qmax = qrange(bits)
    cs = grid_constants(bits, symmetric)
    n_grid = grid_points(symmetric)
    scale = np.empty((rows, cols // g), np.float32)
    zero = None if symmetric else np.empty((rows, cols // g), np.float32)

    def run(block: tuple[int, int]) -> None:
        a, b = block
        im = imp[a:b] if imp.shape[0] > 1 else imp
        if symmetric:
            sym_rows(x[a:b], g, im, qmin, qmax, cs, n_grid, scale[a:b])
        else:
            asym_rows(x[a:b], g, im, qmin, qmax, cs, n_grid, scale[a:b], zero[a:b])

    parallel_for(run, _row_blocks(rows, cols, threads), threads, "mse-search")
    return scale, zero
