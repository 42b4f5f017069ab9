"""The compiled ``mse`` search (quant/methods/mse_jit.py) against the torch search it replaces (quant/methods/mse.py).

Two references. ``_candidates`` lists every candidate of the search — the RTN seed, each grid
point (and, asymmetric, each grid point's least-squares zero-point) — with its scale, zero and
weighted squared error, computed in float64 from the same float32 codes: the kernel must choose
what this list's selection rule chooses. The torch search chooses among the same candidates but
compares errors ``Σw·x² - s·Σw·d·x`` formed from float32 sums, whose rounding (~1e-7·Σw·x²) exceeds
the gap between the best candidates in many groups (most of all at 8 bits, where the error is
~1e-4·Σw·x²): there the kernel's choice must be at least as good, in float64, as torch's.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from quant.methods import mse as M
from quant.qparams import dequantize, grouped, qrange
from quant.spec import QuantSpec

pytest.importorskip("numba")
import quant.methods.mse_jit as J

ROWS, COLS, BAND = 120, 512, 24
KINDS = ("gauss", "heavy", "zero", "constant", "tiny")


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def weights(seed: int = 0) -> torch.Tensor:
    """``[ROWS, COLS]`` in bands of ``BAND`` rows, one per kind of ``KINDS``."""
    g = torch.Generator().manual_seed(seed)
    bands = {
        "gauss": 0.02 * torch.randn(BAND, COLS, generator=g),
        "heavy": 0.01 * torch.randn(BAND, COLS, generator=g) / torch.rand(BAND, COLS, generator=g).clamp_min(1e-3),
        "zero": torch.zeros(BAND, COLS),
        # constant over each 32 columns (so piecewise constant for larger groups), one all-zero group
        "constant": (torch.randn(BAND, COLS // 32, 1, generator=g) * 0.05).expand(-1, -1, 32).reshape(BAND, COLS),
        "tiny": 1e-9 * torch.randn(BAND, COLS, generator=g),
    }
    bands["constant"][3, :32] = 0
    bands["gauss"][5, 64:96] = 0  # a zero group in a row of ordinary ones
    return torch.cat([bands[k] for k in KINDS])


def importance(kind: str, seed: int = 1) -> torch.Tensor | None:
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "column":
        return torch.rand(COLS, generator=g) * 2 + 0.01
    return torch.rand(ROWS, COLS, generator=g).square() * 3  # per weight, some near zero


def torch_search(w: torch.Tensor, g: int, imp: torch.Tensor | None, bits: int, sym: bool):
    """What ``mse()``'s torch path searches: float ``scale``, ``zero`` (or None) ``[out, G]``."""
    x = grouped(w, g)
    wt = M.magnitude_weights(x)
    im = M.group_weights(imp, tuple(w.shape), g)
    wt = wt if im is None else wt * im
    return (M._sym_search(x, wt, bits), None) if sym else M._asym_search(x, wt, bits)


def kernel_weights(w: torch.Tensor, g: int, imp: torch.Tensor | None) -> torch.Tensor:
    """The kernel's error weights ``[N, g]``: as torch's, with the rms from a float64 sum and a correctly
    rounded square root (torch's float32 ``sqrt`` is off by an ulp for ~20 % of inputs on this CPU)."""
    x = grouped(w, g).reshape(-1, g)
    rms = (((x * x).double().sum(-1).float()) / g).double().sqrt().float()
    wt = x.abs() + rms[:, None]
    if imp is not None:
        wt = wt * imp.float().expand(w.shape).reshape(-1, g)
    return wt


def _candidates(w: torch.Tensor, g: int, imp: torch.Tensor | None, bits: int, sym: bool):
    """All candidates ``[N, C]``: (error, scale, zero) in float64, in the search's order, and ``Σw·x²`` ``[N]``."""
    qmin, qmax = qrange(bits)
    x = grouped(w, g).reshape(-1, g)
    wd, xd = kernel_weights(w, g, imp).double(), x.double()
    sxx, sw, sx = (wd * xd * xd).sum(-1), wd.sum(-1), (wd * xd).sum(-1)
    nan, inf = torch.tensor(float("nan"), dtype=torch.float64), torch.tensor(float("inf"), dtype=torch.float64)
    if sym:
        a = x.abs().amax(-1).clamp_min(1e-30)
        s0, z0 = a / ((qmax - qmin) / 2), torch.zeros_like(a)
        q0 = torch.round(torch.clamp(x / s0[:, None], qmin, qmax))
    else:
        mn, mx = x.amin(-1).clamp(max=0.0), x.amax(-1).clamp(min=0.0)
        a = (mx - mn).clamp_min(1e-30)
        s0 = a / (qmax - qmin)
        z0 = torch.round(torch.clamp(qmin - mn / s0, qmin, qmax))
        q0 = torch.round(torch.clamp(x / s0[:, None] + z0[:, None], qmin, qmax))
    err0 = (wd * (xd - s0.double()[:, None] * (q0.double() - z0.double()[:, None])) ** 2).sum(-1)
    errs, scales, zeros = [err0], [s0.double()], [z0.double()]
    n_grid = (M.SYM_GRID if sym else M.ASYM_GRID)[2] + 1
    for c in J.grid_constants(bits, sym)[:n_grid]:
        isc = (1 / a) * torch.tensor(c)                                  # float32, as torch and the kernel
        zc = torch.zeros_like(a) if sym else torch.round(torch.clamp(qmin - mn * isc, qmin, qmax))
        l = torch.round(torch.clamp(x * isc[:, None] + zc[:, None], qmin, qmax)).double()
        sl, sl2, slx = (wd * l).sum(-1), (wd * l * l).sum(-1), (wd * l * xd).sum(-1)
        zs = [zc.double()]
        if not sym:
            det = sw * sl2 - sl * sl
            zfit = torch.round(torch.clamp(-((sl2 * sx - sl * slx) / (sw * slx - sl * sx)), qmin, qmax))
            zs.append(torch.where(det > 0, zfit, nan))
        for z in zs:
            sdx, sdd = slx - z * sx, sl2 - 2 * z * sl + z * z * sw
            s = sdx / torch.where(sdd > 0, sdd, nan)
            errs.append(torch.where(s > 0, sxx - s * sdx, inf))
            scales.append(s)
            zeros.append(z)
    return torch.stack(errs, 1), torch.stack(scales, 1), torch.stack(zeros, 1), sxx


def _select(errs: torch.Tensor) -> torch.Tensor:
    """Index of the chosen candidate: the first strictly lower error wins, NaN never does."""
    best, idx = errs[:, 0].clone(), torch.zeros(errs.shape[0], dtype=torch.long)
    for c in range(1, errs.shape[1]):
        better = errs[:, c] < best
        best, idx = torch.where(better, errs[:, c], best), torch.where(better, c, idx)
    return idx


def _match(scales: torch.Tensor, zeros: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None):
    """For each group the candidate whose zero equals ``z`` and whose scale is nearest ``s``: (index, rel. distance)."""
    dist = (scales - s.double().reshape(-1, 1)).abs() / s.double().reshape(-1, 1)
    if z is not None:
        dist = torch.where(zeros == z.double().reshape(-1, 1), dist, torch.full_like(dist, float("inf")))
    dist = torch.nan_to_num(dist, nan=float("inf"))
    d, idx = dist.min(1)
    return idx, d


def _final_err(w: torch.Tensor, g: int, wt: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bits: int):
    """Weighted squared error per group of the codes re-rounded with ``s`` (what ``mse()`` stores), in float64."""
    qmin, qmax = qrange(bits)
    x, sd = grouped(w, g).reshape(-1, g).double(), s.double().reshape(-1, 1)
    zd = 0.0 if z is None else z.double().reshape(-1, 1)
    q = torch.round(torch.clamp(x / sd + zd, qmin, qmax))
    return (wt.double() * (x - sd * (q - zd)) ** 2).sum(-1)


def compare(w: torch.Tensor, g: int, imp: torch.Tensor | None, bits: int, sym: bool,
            kernel: tuple[torch.Tensor, torch.Tensor | None], torch_: tuple[torch.Tensor, torch.Tensor | None]) -> dict:
    """Assert the kernel's (scale, zero) per group is the float64 search's choice (or tied with it), at least as
    good as the torch search's, and no worse than RTN; return the agreement counts."""
    s_j, z_j = (None if t is None else t.float().reshape(-1) for t in kernel)
    s_t, z_t = (None if t is None else t.float().reshape(-1) for t in torch_)
    errs, scales, zeros, sxx = _candidates(w, g, imp, bits, sym)
    wt = kernel_weights(w, g, imp)
    n = errs.shape[0]
    floor = 1e-12 * sxx + 1e-300  # float64 rounding of Σw·x² - s·Σw·d·x is ~1e-16·Σw·x²

    # the float64 reference's candidate (its scale to float32 rounding), or one tied with it (constant
    # groups: every candidate fits exactly, and rounding picks one)
    ref = _select(errs)
    i_j, d_j = _match(scales, zeros, s_j, z_j)
    e_j, e_ref = errs.gather(1, i_j[:, None])[:, 0], errs.gather(1, ref[:, None])[:, 0]
    same_ref = s_j.double() == scales.gather(1, ref[:, None])[:, 0].float().double()
    if z_j is not None:
        same_ref &= z_j.double() == zeros.gather(1, ref[:, None])[:, 0]
    e_j = torch.where(same_ref, e_ref, e_j)  # candidates ~1e-8 apart can round to the same float32 scale
    # ``det`` is 0 up to rounding in a constant group with per-weight importance: which side of 0 depends on
    # the order of the sums, and so does trying a zero-point the reference does not. There the error of
    # the stored codes (re-rounded: a lower bound of the candidate's) must still be a tie.
    outside = d_j > 1e-6
    assert int(outside.sum()) <= n // 10, f"kernel results that are no candidate: {int(outside.sum())}"
    e_j = torch.where(outside, _final_err(w, g, wt, s_j, z_j, bits), e_j)
    assert bool(((e_j - e_ref).abs() <= floor).all()), ((e_j - e_ref).abs() - floor).max()

    # the torch search: the same choice, or a float64 error at least as low (its float32 sums can also
    # make det > 0 in a constant group: there the re-rounded codes' error bounds its own from below)
    i_t, d_t = _match(scales, zeros, s_t, z_t)
    outside = d_t > 1e-4
    assert int(outside.sum()) <= n // 10, f"torch results that are no candidate: {int(outside.sum())}"
    e_t = torch.where(outside, _final_err(w, g, wt, s_t, z_t, bits), errs.gather(1, i_t[:, None])[:, 0])
    same = (s_j - s_t).abs() <= 1e-5 * s_t
    if z_j is not None:
        same &= z_j == z_t
    assert bool((e_j <= e_t + 1e-6 * e_t + floor).all()), (e_j - e_t - 1e-6 * e_t - floor).max()
    tied = ~same & ((e_j - e_t).abs() <= 1e-9 * sxx)  # float32 rounding of a scale moves the error ~1e-11·Σw·x²
    better = ~same & ~tied
    gain = ((e_t - e_j) / e_t)[better]

    # never worse than RTN (the seed), in the error of what is stored
    rtn = _final_err(w, g, wt, scales[:, 0].float(), None if sym else zeros[:, 0].float(), bits)
    fin = _final_err(w, g, wt, s_j, z_j, bits)
    assert bool((fin <= rtn * (1 + 1e-9) + floor).all()), (fin - rtn).max()
    return {"same": int(same.sum()), "tied": int(tied.sum()), "better": int(better.sum()),
            "max_gain": float(gain.max()) if gain.numel() else 0.0, "same_ref": int(same_ref.sum()), "groups": n,
            "rounding": _rounding_share(w, g, wt, bits, sym, (e_t - e_j)[~same], s_t[~same], s_j[~same], ~same)}


def _rounding_share(w: torch.Tensor, g: int, wt: torch.Tensor, bits: int, sym: bool, gap: torch.Tensor,
                    s_t: torch.Tensor, s_j: torch.Tensor, groups: torch.Tensor) -> float:
    """Largest ``gap`` (torch's error minus the kernel's, float64, where they chose differently) as a share of
    what float32 rounding of torch's sums can account for: ≤ 1 means the two differ only by that rounding.

    Torch compares ``Σw·x² - s·Σw·d·x`` (``d = l - z``) formed from float32 sums of ``g`` products, each
    sum off by at most ``γ·Σ|terms|`` with ``γ = (g + 4)·2⁻²⁴`` (the sum, the products, the weights' own
    ulp). To first order that moves a candidate's error by at most ``γ·Σw·(|x| + s·|l| + s·|z|)²``, and
    ``|l|, |z| ≤ L = max(|qmin|, qmax)``; two candidates' errors can swap order only within the sum of both.
    """
    if not bool(groups.any()):
        return 0.0
    qmin, qmax = qrange(bits)
    reach = max(-qmin, qmax) * (1 if sym else 2)                            # s·(|l| + |z|) ≤ s·reach
    x, wd = grouped(w, g).reshape(-1, g)[groups].double().abs(), wt[groups].double()
    gamma = (g + 4) * 2.0**-24

    def bound(s: torch.Tensor) -> torch.Tensor:
        return gamma * (wd * (x + s.double()[:, None] * reach) ** 2).sum(-1)

    share = gap / (bound(s_t) + bound(s_j))
    return float(torch.where(gap > 0, share, torch.zeros_like(share)).max())  # gap ≤ 0: nothing to explain


@pytest.mark.parametrize("imp_kind", ["none", "column", "weight"])
@pytest.mark.parametrize("group", [32, 128, None])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_search_matches(sym: bool, bits: int, group: int | None, imp_kind: str) -> None:
    w, imp = weights(), importance(imp_kind)
    g = COLS if group is None else group
    s_j, z_j = J.search(w.numpy(), g, None if imp is None else imp.numpy(), bits, sym)
    kernel = torch.from_numpy(s_j), None if z_j is None else torch.from_numpy(z_j)
    compare(w, g, imp, bits, sym, kernel, torch_search(w, g, imp, bits, sym))


def test_agreement_figures() -> None:
    """The kernel differs from the torch search only where torch's float32 sums cannot tell the candidates
    apart, and then always in the kernel's favour; prints the agreement table (``-s``).

    Against torch: ``same`` choice, or ``tied`` with it in float64, or (the rest) ``better`` by up to
    ``max gain`` of torch's error; ``rounding``: the largest of those gains as a share of the float32
    rounding of torch's error comparison (:func:`_rounding_share`), asserted ≤ 1. Against the float64
    reference: ``same`` float32 scale and zero (the rest are ties, asserted in :func:`compare`)."""
    figures = {}
    for sym, bits, group in itertools.product((True, False), (4, 8), (32, 128, None)):
        imp_kind = "weight" if bits == 8 else "none"  # half of test_search_matches' cases: a small runtime
        w, imp = weights(), importance(imp_kind)
        g = COLS if group is None else group
        s_j, z_j = J.search(w.numpy(), g, None if imp is None else imp.numpy(), bits, sym)
        kernel = torch.from_numpy(s_j), None if z_j is None else torch.from_numpy(z_j)
        key = f"{'sym' if sym else 'asym'}-int{bits}-{'ch' if group is None else group}-{imp_kind}"
        figures[key] = compare(w, g, imp, bits, sym, kernel, torch_search(w, g, imp, bits, sym))
    head = (("torch: same", 12), ("tied", 7), ("better", 7), ("max gain", 9), ("rounding", 9),
            ("f64 ref: same", 14), ("groups", 7))
    print("\n" + " " * 24 + " ".join(f"{h:>{n}s}" for h, n in head))
    for k, f in figures.items():
        n = f["groups"]
        print(f"{k:24s} {f['same'] / n:12.2%} {f['tied'] / n:7.2%} {f['better'] / n:7.2%} {f['max_gain']:9.1e}"
              f" {f['rounding']:9.1e} {f['same_ref'] / n:14.2%} {n:7d}")
    beyond = {k: f["rounding"] for k, f in figures.items() if not f["rounding"] <= 1.0}
    assert not beyond, f"the kernel beats torch by more than float32 rounding explains: {beyond}"


def test_tiny_magnitudes() -> None:
    """1e-25 weights: torch's float32 squares underflow, the kernel's float64 moments do not; still finite, ≥ RTN."""
    w = 1e-25 * torch.randn(16, 256, generator=torch.Generator().manual_seed(3))
    for sym in (True, False):
        s, z = J.search(w.numpy(), 32, None, 4, sym)
        assert np.isfinite(s).all() and (s > 0).all()
        assert z is None or (np.isfinite(z).all() and (z == np.rint(z)).all())


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mse_jit_vs_torch_path(sym: bool, dtype: torch.dtype) -> None:
    """``mse()`` end to end: thread count and row chunks change nothing; against the torch path as the search
    (float32: the stored scale is the search's); the same codes wherever the qparams are the same."""
    w, imp, spec = weights(5).to(dtype), importance("column"), QuantSpec(4, 32, sym, "mse")
    q1, s1, z1 = M.mse(w, spec, importance=imp, threads=1, compiled=True)
    q3, s3, z3 = M.mse(w, spec, importance=imp, threads=3, row_chunk=50, compiled=True)
    assert torch.equal(q1, q3) and torch.equal(s1, s3) and (z1 is None or torch.equal(z1, z3))
    qt, st, zt = M.mse(w, spec, importance=imp, compiled=False)
    assert s1.dtype == st.dtype == dtype and q1.dtype == qt.dtype == torch.int8 and q1.shape == qt.shape
    assert (z1 is None) == (zt is None) and (z1 is None or z1.dtype == zt.dtype == torch.int8)
    same = s1 == st if z1 is None else (s1 == st) & (z1 == zt)
    assert torch.equal(q1.reshape(*same.shape, -1)[same], qt.reshape(*same.shape, -1)[same])
    if dtype == torch.float32:
        compare(w, 32, imp, 4, sym, (s1, z1), (st, zt))
    else:  # the bf16 scale is a rounding of the search's: compare the weighted errors in all
        x, wt = w.float(), kernel_weights(w.float(), 32, imp).reshape(w.shape)
        err_j = (wt * (x - dequantize(q1, s1, z1).float()) ** 2).sum()
        err_t = (wt * (x - dequantize(qt, st, zt).float()) ** 2).sum()
        assert err_j <= err_t * 1.001


def test_compiled_false_uses_torch() -> None:
    """``compiled=False``: ``mse()`` is the torch search, bit for bit."""
    w, imp = weights(2)[:48], importance("weight")[:48]
    for sym in (True, False):
        q, s, z = M.mse(w, QuantSpec(8, 128, sym, "mse"), importance=imp, compiled=False)
        s_t, z_t = torch_search(w, 128, imp, 8, sym)
        assert torch.equal(s, M.finish_scale(s_t, torch.float32))
        assert z is None or torch.equal(z, z_t.to(torch.int8))


def test_bad_importance_shape() -> None:
    with pytest.raises(ValueError, match=r"importance has shape \[7\]; expected \[512\] or \[8, 512\]"):
        M.mse(weights()[:8], QuantSpec(4, 32, True, "mse"), importance=torch.ones(7), compiled=True)
