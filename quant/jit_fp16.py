"""float16 rounding and bits inside numba kernels (numba has no float16 type on the CPU), and float32
<-> int32 bit casts (numba has no scalar ``view``: without these a kernel goes through a one-element
array, a store and a load that keep LLVM from vectorizing the loop around them)."""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from quant.jit import kernel


@intrinsic
def f32_from_bits(typingctx, bits):  # noqa: ANN001,ANN201,ARG001 - numba intrinsic
    """The float32 whose IEEE bits are the int32 ``bits`` (an LLVM ``bitcast``: no instruction)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):  # noqa: ANN001,ANN202,ARG001
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def f32_to_bits(typingctx, value):  # noqa: ANN001,ANN201,ARG001 - numba intrinsic
    """The IEEE bits of the float32 ``value`` as an int32."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):  # noqa: ANN001,ANN202,ARG001
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


def f32_bits_of(v):  # noqa: ANN001,ANN201 - numba function, resolved by argument type (below)
    """The float32 bits (int32) of a stored element: an int32 is float32 bits already, a uint16 holds
    bfloat16 bits (``bits << 16``). Chosen when the kernel is compiled, so the shift is a constant."""
    raise NotImplementedError("only inside numba kernels")


@overload(f32_bits_of, jit_options={"nogil": True})
def _f32_bits_of(v):  # noqa: ANN001,ANN202
    if v == types.int32:
        return lambda v: v
    if v == types.uint16:
        return lambda v: np.int32(np.int32(v) << 16)
    return None

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
