"""quant.metrics.error_sums: the compiled float64 pass equals the torch float64 sums to rounding."""

from __future__ import annotations

import math

import pytest
import torch

from quant import metrics


@pytest.mark.parametrize("n", [1, 7, 8, 1000, 300_001])
def test_compiled_error_sums_match_torch(n):
    g = torch.Generator().manual_seed(n)
    ref = torch.randn(n, generator=g) * 3
    approx = ref + torch.randn(n, generator=g) * 1e-3
    num0, den0 = metrics.error_sums(ref, approx, compiled=False)
    num1, den1 = metrics.error_sums(ref, approx, compiled=True)
    assert math.isclose(num0, num1, rel_tol=1e-12) and math.isclose(den0, den1, rel_tol=1e-12)


@pytest.mark.parametrize("compiled", [False, True])
def test_rel_rmse_through_either_path(compiled):
    ref = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))  # not the global RNG: other tests move it
    assert metrics.rel_rmse(ref, ref, compiled) == 0.0
    assert metrics.rel_rmse(torch.zeros(5), torch.ones(5), compiled) == math.inf
    assert math.isclose(metrics.rel_rmse(ref, ref * 1.01, compiled), 0.01, rel_tol=1e-6)
