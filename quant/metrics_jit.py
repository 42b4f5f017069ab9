"""Compiled weight-error sums (``quant.metrics.error_sums``): one pass, float64 accumulators."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from quant.jit import kernel

LANES = 8
"""Independent partial sums (so the loop vectorizes without reassociating any one sum)."""


@kernel
def _sums(ref, approx, lanes):  # noqa: ANN001,ANN201 - numba kernel: float32 [n] x2 -> float64 sums
    num = np.zeros(lanes, np.float64)
    den = np.zeros(lanes, np.float64)
    n = ref.shape[0]
    full = n - n % lanes
    for i in range(0, full, lanes):
        for k in range(lanes):
            r = np.float64(ref[i + k])
            d = r - np.float64(approx[i + k])
            num[k] += d * d
            den[k] += r * r
    for i in range(full, n):
        r = np.float64(ref[i])
        d = r - np.float64(approx[i])
        num[0] += d * d
        den[0] += r * r
    return num.sum(), den.sum()


def error_sums(ref: Tensor, approx: Tensor) -> tuple[float, float]:
    """``(Σ(ref - approx)², Σref²)`` of two float32 tensors of one shape, in float64."""
    r = ref.detach().contiguous().reshape(-1).numpy()
    a = approx.detach().contiguous().reshape(-1).numpy()
    num, den = _sums(r, a, LANES)
    return float(num), float(den)
