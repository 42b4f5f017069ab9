"""float16 rounding and bits inside numba kernels (numba has no float16 type on the CPU)."""

from __future__ import annotations

import math

import numpy as np

from quant.jit import kernel

_F16_OVERFLOW = 65520.0  # the smallest |x| that rounds to inf: half-way above 65504, ties to even
_F16_MIN_NORMAL = 2.0**-14


@kernel
def f16_round(x):  # noqa: ANN001,ANN201 - numba kernel, float32 -> float32
    """``x`` rounded to the nearest fp16 value (ties to even, inf past the range, NaN kept), as float32.

    Exact: in float64 the scaling by powers of two and ``rint`` of an 11-bit-or-less integer part
    make no rounding error of their own, so this equals the hardware ``float -> half`` conversion.
    """
    a = abs(float(x))
    if a >= _F16_OVERFLOW:
        r = math.inf
    elif a < _F16_MIN_NORMAL:  # subnormal halves: multiples of 2**-24
        r = np.rint(a * 16777216.0) / 16777216.0
    elif a == a:
        e = math.frexp(a)[1]  # a in [2**(e-1), 2**e): the quantum is 2**(e-11)
        r = math.ldexp(np.rint(math.ldexp(a, 11 - e)), e - 11)
    else:
        return x
    return np.float32(math.copysign(r, float(x)))


@kernel
def f16_bits(h):  # noqa: ANN001,ANN201 - numba kernel, float32 (an fp16 value) -> int
    """The IEEE half bits of ``h``, a float32 that holds an fp16 value (:func:`f16_round`'s result)."""
    hf = float(h)
    sign = 0x8000 if math.copysign(1.0, hf) < 0 else 0
    a = abs(hf)
    if a != a:
        return sign | 0x7E00
    if a == math.inf:
        return sign | 0x7C00
    if a < _F16_MIN_NORMAL:
        return sign | int(a * 16777216.0)
    m, e = math.frexp(a)  # a = m * 2**e, m in [0.5, 1)
    return sign | ((e + 14) << 10) | int((m * 2.0 - 1.0) * 1024.0)
