"""GGUF's K-quants as ``QuantCodes`` (read only): the codes, and each sub-block's scale (and bias) in float32.

Every K-quant super-block of 256 stores fp16 super-scales and small integer sub-block scales; ggml decodes
a sub-block with the float32 products of the two (``dequantize_row_q*_K`` in ggml-quants.c), so one float32
scale (and bias) per sub-block says the same thing. The products are exact in float32 (an 11-bit fp16
mantissa times an integer below 64), so these ``QuantCodes`` decode, op for op, to what the K-quant decoders
of ``quant.gguf_kquants`` / ``quant.gguf_kquants_low`` give, bit for bit:

========  ======  ====  =====  ==================================  ==========================================
type      kind    bits  group  ggml (per sub-block j)              here
========  ======  ====  =====  ==================================  ==========================================
``Q4_K``  affine  4     32     ``(d·sc_j)·q − dmin·m_j``           scale ``d·sc_j``, bias ``−(dmin·m_j)``
``Q5_K``  affine  5     32     ``(d·sc_j)·q − dmin·m_j``           scale ``d·sc_j``, bias ``−(dmin·m_j)``
``Q2_K``  affine  2     16     ``(d·sc_j)·q − dmin·m_j``           scale ``d·sc_j``, bias ``−(dmin·m_j)``
``Q6_K``  sym     6     16     ``(d·sc_j)·(q − 32)``, sc_j int8    scale ``d·sc_j``   (``u − 2^(b−1)``)
``Q3_K``  sym     3     16     ``(d·(ls_j − 32))·(q − 4)``         scale ``d·(ls_j − 32)``
========  ======  ====  =====  ==================================  ==========================================

(``x·s − m`` and ``x·s + (−m)`` are the same IEEE operation.) There is no way back here: a float32 scale
does not say how to split it into ``d`` and ``sc_j``, so a K-quant target is only ever the source's own bytes
(``QuantTensor.blocks``). ``quant.gguf_blocks.BLOCK_TYPES`` stays the table of the types written from codes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quant import jit
from quant.gguf_kquants import unpack_k_scales
from quant.gguf_kquants_low import unpack_2bit, unpack_q3_scales
from quant.gguf_legacy import f16_from_bytes, split_bytes, unpack_nibbles
from quant.qtensor import QuantCodes

K_TYPES = {"Q4_K": ("affine", 4, 32), "Q5_K": ("affine", 5, 32), "Q2_K": ("affine", 2, 16),
           "Q6_K": ("sym", 6, 16), "Q3_K": ("sym", 3, 16)}
"""ggml K-quant type → (kind, bits, group size) of its ``QuantCodes``."""
_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q2_K": 84, "Q6_K": 210, "Q3_K": 110}


def _q45(raw: Tensor, five: bool, compiled: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Q4_K / Q5_K ``[R, nsb·size]`` → codes ``[R, nsb, 256]``, scale and bias ``[R, nsb, 8]``."""
    sizes = [2, 2, 12, 32, 128] if five else [2, 2, 12, 128]
    d, dmin, scales, *qh, qs = split_bytes(raw, sum(sizes), sizes)
    if compiled:
        from quant.gguf_kcodes_jit import q45_parts  # deferred: imports numba

        u, sc, m = (t.reshape(*d.shape[:2], -1) for t in q45_parts(raw, five, d.shape[0] * d.shape[1]))
    else:
        u = unpack_nibbles(qs.reshape(*qs.shape[:-1], 4, 32)).flatten(-2)              # [R, nsb, 256]
        if five:
            shifts = torch.arange(8, dtype=torch.uint8).unsqueeze(-1)                  # [8, 1]
            high = (qh[0].unsqueeze(-2) >> shifts) & 1                                 # [R, nsb, 8, 32]
            u = u | (high.flatten(-2) << 4)
        sc, m = unpack_k_scales(scales)                                                # [R, nsb, 8]
    scale = f16_from_bytes(d).unsqueeze(-1) * sc.to(torch.float32)
    return u, scale, -(f16_from_bytes(dmin).unsqueeze(-1) * m.to(torch.float32))


def _q6(raw: Tensor, compiled: bool) -> tuple[Tensor, Tensor]:
    """Q6_K → codes ``[R, nsb, 256]`` in [0, 63] and scale ``[R, nsb, 16]``."""
    ql, qh, scales, d = split_bytes(raw, 210, [128, 64, 16, 2])
    if compiled:
        from quant.gguf_kcodes_jit import q6_codes  # deferred: imports numba

        u = q6_codes(raw, d.shape[0] * d.shape[1]).reshape(*d.shape[:2], 256)
    else:
        low = unpack_nibbles(ql.reshape(*ql.shape[:-1], 2, 64))                        # [R, nsb, 2, 128]
        shifts = torch.arange(0, 8, 2, dtype=torch.uint8).unsqueeze(-1)                # [4, 1]
        high = (qh.reshape(*qh.shape[:-1], 2, 1, 32) >> shifts) & 3                    # [R, nsb, 2, 4, 32]
        u = (low | (high.flatten(-2) << 4)).flatten(-2)                                # [R, nsb, 256]
    return u, f16_from_bytes(d).unsqueeze(-1) * scales.contiguous().view(torch.int8).to(torch.float32)


def _q3(raw: Tensor) -> tuple[Tensor, Tensor]:
    """Q3_K → codes ``[R, nsb, 256]`` in [0, 7] and scale ``[R, nsb, 16]``."""
    hmask, qs, scales, d = split_bytes(raw, 110, [32, 64, 12, 2])
    high = (hmask.unsqueeze(-2) >> torch.arange(8, dtype=torch.uint8).unsqueeze(-1)) & 1  # [R, nsb, 8, 32]
    u = unpack_2bit(qs) | (high.flatten(-2) << 2)                                      # [R, nsb, 256]
    return u, f16_from_bytes(d).unsqueeze(-1) * (unpack_q3_scales(scales).to(torch.float32) - 32)


def _q2(raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Q2_K → codes ``[R, nsb, 256]`` in [0, 3], scale and bias ``[R, nsb, 16]``."""
    scales, qs, d, dmin = split_bytes(raw, 84, [16, 64, 2, 2])
    scale = f16_from_bytes(d).unsqueeze(-1) * (scales & 0xF).to(torch.float32)
    return unpack_2bit(qs), scale, -(f16_from_bytes(dmin).unsqueeze(-1) * (scales >> 4).to(torch.float32))


def super_scales(raw: Tensor, qtype: str) -> dict[str, Tensor]:
    """The fp16 super-block scales of ``qtype`` bytes as float32 ``[blocks]``: ``.d`` (and ``.dmin``)."""
    at = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q2_K": (80, 82), "Q6_K": (208,), "Q3_K": (108,)}[qtype]
    blocks = raw.reshape(-1, _BYTES[qtype])
    return {name: f16_from_bytes(blocks[:, o:o + 2]) for name, o in zip((".d", ".dmin"), at)}


def kquant_codes(raw: Tensor, qtype: str, shape: tuple[int, int], compiled: bool = True) -> QuantCodes:
    """uint8 block bytes of a ``[rows, cols]`` ``qtype`` tensor → its ``QuantCodes`` (float32 parameters);
    ``compiled``: Q4_K/Q5_K/Q6_K codes unpacked by ``quant.gguf_kcodes_jit`` where numba is installed (the
    same integers)."""
    kind, bits, _ = K_TYPES[qtype]
    rows, cols = shape
    if raw.numel() != rows * cols // 256 * _BYTES[qtype]:
        raise ValueError(f"{qtype} [{rows}, {cols}] needs {rows * cols // 256 * _BYTES[qtype]} bytes, "
                         f"got {raw.numel()}")
    blocks, fast = raw.reshape(rows, -1), compiled and jit.available()
    bias = None
    if qtype in ("Q4_K", "Q5_K"):
        u, scale, bias = _q45(blocks, qtype == "Q5_K", fast)
    elif qtype == "Q2_K":
        u, scale, bias = _q2(blocks)
    else:
        u, scale = _q6(blocks, fast) if qtype == "Q6_K" else _q3(blocks)
    off = None if bias is None else bias.reshape(rows, -1)
    return QuantCodes(u.to(torch.uint8).reshape(rows, cols), scale.reshape(rows, -1), off, kind, bits)
