"""GPTQ's scales refit to its codes (``quant/gptq_scales.py``): numbers, not shapes.

The refit solves each row's least squares in H's metric (checked against ``torch.linalg.lstsq`` on the
whitened problem); the codes on GPTQ's own scales are GPTQ's codes bit for bit (act-order, static
groups); ``refine`` never raises ``tr(ΔW H ΔWᵀ)`` above GPTQ's, lowers it on a correlated Hessian, and keeps
the layout.
"""

from __future__ import annotations

import pytest
import torch

from quant.gptq_scales import codes_on_scales, normal_equations, refine, solve_scales
from quant.methods.gptq import factor_hessian, gptq
from quant.qparams import dequantize
from quant.spec import QuantSpec


def problem(out_f: int = 24, in_f: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and a correlated Hessian ``2/n XᵀX`` (inputs with a few strong channels, as in a
    transformer)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    mix = torch.randn(in_f, in_f, generator=g) / in_f ** 0.5 + torch.eye(in_f)
    x = torch.randn(2048, in_f, generator=g) @ mix * (1 + 4 * (torch.rand(in_f, generator=g) < 0.05))
    return w, 2 / x.shape[0] * x.T @ x


def layer_error(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None,
                h: torch.Tensor) -> float:
    d = (w - dequantize(q, s, z).float()).double()
    return float(((d @ h.double()) * d).sum())


def test_normal_equations_are_the_direct_sums() -> None:
    """``A[r, a, b] = c_a H_ab c_bᵀ`` (from the upper triangle, mirrored) and ``b[r, a] = c_a (H w_rᵀ)_a``, vs
    float64 sums written out."""
    w, h = problem(out_f=6, in_f=160, seed=4)
    c = torch.randint(-8, 8, (6, 160), generator=torch.Generator().manual_seed(5)).float()
    a, b = normal_equations(c, w @ h, h, 32)
    cd, hd = c.double().view(6, 5, 32), h.double().view(5, 32, 5, 32)
    ref_a = torch.einsum("rai,aibj,rbj->rab", cd, hd, cd)
    ref_b = torch.einsum("rai,rai->ra", cd, (w.double() @ h.double()).view(6, 5, 32))
    torch.testing.assert_close(a.double(), ref_a, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(b.double(), ref_b, rtol=1e-5, atol=1e-4)
    assert torch.equal(a, a.transpose(1, 2))


@pytest.mark.parametrize("symmetric", [True, False])
def test_refit_is_each_rows_least_squares(symmetric: bool) -> None:
    w, h = problem()
    spec = QuantSpec(4, 64, symmetric, "gptq")
    q, s, z = gptq(w, spec, hessian=h, scale_dtype=torch.float32, act_order=True)
    c = q.float() - (0 if z is None else z.float().repeat_interleave(64, 1))
    a, b = normal_equations(c, w @ h, h, 64)
    fit = solve_scales(a, b, s.float())
    chol = torch.linalg.cholesky(h.double())                                # H = L Lᵀ: E = ‖(w − ŵ) L‖²
    for r in (0, 7, 23):
        basis = torch.zeros(4, 256, dtype=torch.float64)                       # ŵ_r = sᵀ · basis
        for j in range(4):
            basis[j, j * 64:(j + 1) * 64] = c[r, j * 64:(j + 1) * 64].double()
        ref = torch.linalg.lstsq((basis @ chol).T, (w[r].double() @ chol)[:, None]).solution[:, 0]
        got = fit[r].double()
        assert torch.allclose(got, ref, rtol=2e-4), f"row {r}: {got.tolist()} vs {ref.tolist()}"


@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_on_gptqs_scales_are_gptqs_codes(symmetric: bool) -> None:
    w, h = problem(seed=1)
    spec = QuantSpec(4, 128, symmetric, "gptq")
    factor = factor_hessian(h, act_order=True)
    q, s, z = gptq(w, spec, factor=factor, scale_dtype=torch.bfloat16)
    again = codes_on_scales(w, s, z, 4, factor)
    assert torch.equal(again, q), f"{int((again != q).sum())} of {q.numel()} codes differ"


@pytest.mark.parametrize(("symmetric", "dtype"), [(True, torch.bfloat16), (False, torch.float16)])
def test_refine_lowers_the_layer_error(symmetric: bool, dtype: torch.dtype) -> None:
    w, h = problem(out_f=48, seed=2)
    spec = QuantSpec(4, 32, symmetric, "gptq")
    factor = factor_hessian(h, act_order=True)
    q, s, z = gptq(w, spec, factor=factor, scale_dtype=dtype)
    q2, s2 = refine(w, q, s, z, h, 4, factor, rounds=2)
    before, after = layer_error(w, q, s, z, h), layer_error(w, q2, s2, z, h)
    assert s2.dtype == dtype and s2.shape == s.shape and q2.dtype == torch.int8
    assert after < 0.97 * before, f"refined tr(ΔW H ΔWᵀ) {after:.4e} vs GPTQ's {before:.4e}"
    assert int(q2.min()) >= -8 and int(q2.max()) <= 7
    assert bool((s2.float() > 0).all())


def test_refine_keeps_an_all_zero_group() -> None:
    w, h = problem(seed=3)
    w[:5, :64] = 0.0  # one group of five rows is all zero
    factor = factor_hessian(h, act_order=True)
    q, s, z = gptq(w, QuantSpec(4, 64, True, "gptq"), factor=factor, scale_dtype=torch.float32)
    assert float(s[:5, 0].max()) < 1e-20  # mse: a tiny positive scale
    q2, s2 = refine(w, q, s, z, h, 4, factor)
    assert bool(torch.isfinite(dequantize(q2, s2, z)).all()) and bool((s2 >= 0).all())
    assert layer_error(w, q2, s2, z, h) <= layer_error(w, q, s, z, h)
