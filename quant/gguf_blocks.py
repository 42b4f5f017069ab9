"""GGUF's 32-element block types as ``QuantCodes`` and back, without decoding (``quant/qtensor.py``).

==========  ======  ====  =====================================  =========================================
type        kind    bits  block (bytes)                          decode (ggml-quants.c ``dequantize_row_*``)
==========  ======  ====  =====================================  =========================================
``Q8_0``    sym     8     d fp16, 32 × int8                      ``q · d``         (``u = q + 128``)
``Q4_0``    sym     4     d fp16, 16 nibble pairs                ``(u - 8) · d``
``Q5_0``    sym     5     d fp16, qh 4 bytes, 16 nibble pairs    ``(u - 16) · d``
``Q4_1``    affine  4     d fp16, m fp16, 16 nibble pairs        ``d · u + m``
``Q5_1``    affine  5     d fp16, m fp16, qh, 16 nibble pairs    ``d · u + m``
==========  ======  ====  =====================================  =========================================

The scales come out as float32 (the fp16 values widened, as ggml decodes them); going back, they must be
exactly representable in fp16 (``quant.transcode`` checks that before a block is written). K-quants (super-
blocks of 256 with 6-bit sub-scales) are read as ``QuantCodes`` by ``quant.gguf_kcodes``, never written from them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quant import jit
from quant.gguf_legacy import (
    f16_from_bytes,
    pack_q4_0,
    pack_q4_1,
    pack_q5_0,
    pack_q5_1,
    pack_q8_0,
    split_bytes,
    unpack_high_bits,
    unpack_nibbles,
)
from quant.qtensor import QuantCodes

BLOCK_TYPES = {"Q8_0": ("sym", 8), "Q4_0": ("sym", 4), "Q5_0": ("sym", 5), "Q4_1": ("affine", 4),
               "Q5_1": ("affine", 5)}
"""ggml type → (kind, bits) of the types whose blocks are ``QuantCodes`` groups of 32."""
QK = 32
_FIELDS = {"Q8_0": [2, 32], "Q4_0": [2, 16], "Q5_0": [2, 4, 16], "Q4_1": [2, 2, 16], "Q5_1": [2, 2, 4, 16]}


def codes_from_blocks(raw: Tensor, qtype: str, shape: tuple[int, int]) -> QuantCodes:
    """uint8 block bytes of a ``[rows, cols]`` tensor → its ``QuantCodes`` (scales float32)."""
    kind, bits = BLOCK_TYPES[qtype]
    rows, cols = shape
    if bits == 4 and jit.available():
        from quant.codes_jit import unpack_blocks4  # deferred: imports numba

        u, d, m = unpack_blocks4(raw, rows, cols, kind == "affine")
        return QuantCodes(u, d, m, kind, bits)
    fields = split_bytes(raw.reshape(rows, -1), sum(_FIELDS[qtype]), _FIELDS[qtype])  # each [rows, nb, k]
    d = f16_from_bytes(fields[0])                                                     # [rows, nb] float32
    if qtype == "Q8_0":
        u = (fields[1].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
    else:
        u = unpack_nibbles(fields[-1])
        if bits == 5:
            u = u | (unpack_high_bits(fields[-2]) << 4)
    m = f16_from_bytes(fields[1]) if kind == "affine" else None
    return QuantCodes(u.to(torch.uint8).reshape(rows, cols), d, m, kind, bits)


def blocks_from_codes(c: QuantCodes, qtype: str) -> Tensor:
    """``QuantCodes`` in ``qtype``'s kind and width, groups of 32, fp16-exact scales → block bytes."""
    kind, bits = BLOCK_TYPES[qtype]
    if (c.kind, c.bits, c.group_size) != (kind, bits, QK):
        raise ValueError(f"{qtype} needs {kind} {bits}-bit groups of {QK}, got {c.kind} {c.bits}-bit "
                         f"groups of {c.group_size}")
    rows, cols = c.u.shape
    if bits == 4 and jit.available():
        from quant.codes_jit import pack_blocks4  # deferred: imports numba

        return pack_blocks4(c.u, c.scale, c.offset if kind == "affine" else None)
    u = c.u.reshape(rows, cols // QK, QK)                                               # [rows, nb, 32]
    d = c.scale.to(torch.float16)
    if qtype == "Q8_0":
        return pack_q8_0(d, (u.to(torch.int16) - 128).to(torch.int8))
    if qtype in ("Q4_0", "Q5_0"):
        return (pack_q4_0 if bits == 4 else pack_q5_0)(d, u)
    m = c.offset.to(torch.float16)  # type: ignore[union-attr]
    return (pack_q4_1 if bits == 4 else pack_q5_1)(d, m, u)
