"""MLX's ``affine`` quantization layout (mlx 0.32 ``mx.quantize``; mlx-lm 0.32.2 ``QuantizedLinear``).

Per quantized module ``<prefix>`` (a Linear, or the embedding), as mlx-lm saves it:

======================  ==========  ==============================  ==========================================
name                    dtype       shape                           content
======================  ==========  ==============================  ==========================================
``<prefix>.weight``     uint32      ``[out, in·b/32]``              unsigned codes ``u ∈ [0, 2^b - 1]``
``<prefix>.scales``     float       ``[out, in/g]``                 per group scale
``<prefix>.biases``     float       ``[out, in/g]``                 per group bias (the value of code 0)
======================  ==========  ==============================  ==========================================

Decode: ``w = scales · u + biases`` in the scales' dtype. Packing: ``32 / b`` consecutive codes along
``in`` fill one little-endian uint32, element ``k`` of a word at bits ``[k·b, (k+1)·b)`` (lowest bits first;
checked against ``mx.quantize``): the same words as compressed-tensors' ``pack_to_int32`` of the signed
codes ``u - 2^(b-1)``, so ``quant.pack.pack_int32`` does the packing. 3, 5 and 6 bits do not divide 32: the
codes form one little-endian bit stream (element ``k`` of a row at stream bits ``[k·b, (k+1)·b)``, 8 codes in
``b`` bytes; checked against ``mx.quantize`` 0.32.4) cut into uint32 words. ``g ∈ {32, 64, 128}`` (mlx 0.32
refuses 16: "The supported group sizes are 32, 64, and 128").

Our qparams (``quant/qparams.py``: signed ``q ∈ [qmin, qmax]``, ``ŵ = (q - zero) · scale``) map exactly onto
it: ``u = q - qmin``, ``scales = scale``, ``biases = (qmin - zero) · scale`` (``zero = 0`` when symmetric),
the product rounded once to the scale dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quant.pack import pack_int32, unpack_int32
from quant.qparams import qrange

MLX_GROUP_SIZES = (32, 64, 128)
"""Group sizes ``mx.quantize`` accepts (0.32: 'The supported group sizes are 32, 64, and 128')."""
MLX_BITS = (2, 3, 4, 5, 6, 8)
"""Widths ``mx.quantize`` (affine) and mlx-lm's ``QuantizedLinear`` take."""
MODE = "affine"


def biases_for(scale: Tensor, zero: Tensor | None, bits: int) -> Tensor:
    """``(qmin - zero) · scale`` ``[out, G]`` in ``scale.dtype``: the value of unsigned code 0."""
    qmin, _ = qrange(bits)
    offset = torch.full_like(scale, float(qmin), dtype=torch.float64)
    if zero is not None:
        offset = offset - zero.to(torch.float64)
    return (offset * scale.to(torch.float64)).to(scale.dtype)


def pack_affine(q: Tensor, scale: Tensor, zero: Tensor | None, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Signed codes ``q [out, in]``, ``scale``/``zero [out, G]`` → MLX ``(weight uint32, scales, biases)``."""
    if 32 % bits:
        words = pack_stream((q.to(torch.int16) - qrange(bits)[0]).to(torch.uint8), bits)
    else:
        words = pack_int32(q, bits, packed_dim=1)                   # [out, in·b/32] int32 bit patterns
    return words.view(torch.uint32), scale.contiguous(), biases_for(scale, zero, bits)


def pack_stream(u: Tensor, bits: int) -> Tensor:
    """Unsigned codes ``[out, in]`` uint8 (``in`` a multiple of 32) → uint32 words ``[out, in·b/32]``: the
    row's codes as one little-endian bit stream, 8 codes (``8·b ≤ 64`` bits) to ``b`` bytes."""
    out_f, in_f = u.shape
    shifts = torch.arange(8, dtype=torch.int64) * bits                              # [8]
    x = (u.reshape(-1, 8).to(torch.int64) & ((1 << bits) - 1)) << shifts            # [n/8, 8]
    stream = x.sum(-1).view(torch.uint8).reshape(-1, 8)[:, :bits]                   # [n/8, b] little-endian
    return stream.reshape(out_f, in_f * bits // 8).contiguous().view(torch.uint32)


def unpack_stream(weight: Tensor, bits: int, in_features: int) -> Tensor:
    """Inverse of :func:`pack_stream`: uint32 words ``[out, in·b/32]`` → unsigned codes ``[out, in]``."""
    out_f = weight.shape[0]
    stream = weight.contiguous().view(torch.uint8).reshape(-1, bits)                # [n/8, b]
    x = torch.nn.functional.pad(stream, (0, 8 - bits)).view(torch.int64)           # [n/8, 1]
    shifts = torch.arange(8, dtype=torch.int64) * bits
    return ((x >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(out_f, in_features)


def unpack_codes(weight: Tensor, bits: int, in_features: int) -> Tensor:
    """uint32 words ``[out, in·b/32]`` → unsigned codes ``[out, in]`` as uint8."""
    if 32 % bits:
        return unpack_stream(weight, bits, in_features)
    signed = unpack_int32(weight.view(torch.int32), bits, in_features)   # u - 2^(b-1), int8
    return (signed.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)


def dequantize_affine(u: Tensor, scales: Tensor, biases: Tensor) -> Tensor:
    """``scales · u + biases`` ``[out, in]`` in ``scales.dtype`` (``u``: unsigned codes ``[out, in]``)."""
    out_f, in_f = u.shape
    g = in_f // scales.shape[1]
    x = u.reshape(out_f, in_f // g, g).to(scales.dtype)            # [out, G, g]
    return (x * scales[..., None] + biases.to(scales.dtype)[..., None]).reshape(out_f, in_f)
