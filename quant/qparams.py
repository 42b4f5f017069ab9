"""The quantization vocabulary: ``choose_qparams → quantize → dequantize``.

Layout contract (the same for every method and format in this package):

* ``w``: float ``[out, in]``, a PyTorch Linear weight. Groups run along ``in`` (the contiguous
  row): group ``j`` of row ``r`` is ``w[r, j*g:(j+1)*g]`` with ``g = group_size``, or
  ``g = in`` when ``group_size`` is None (one group per output channel).
* ``scale``: ``[out, in // g]`` float, in the dtype compressed-tensors stores (the weight's own
  dtype when it is fp16/bf16/fp32/fp64, else fp16: ``initialize_qparams`` in
  compressed_tensors/quantization/lifecycle/initialize.py, 0.20.0).
* ``zero``: ``[out, in // g]`` int8 in the code range, or None for symmetric quantization.
* ``q``: ``[out, in]`` int8 codes, signed: ``q ∈ [qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]``
  ([-8, 7] for 4 bits, [-128, 127] for 8 bits).
* decode: ``x̂ = (q - zero) · scale``, evaluated exactly like compressed-tensors'
  ``_dequantize`` (forward_helpers.py): ``q.to(scale.dtype) - zero.to(scale.dtype)``, then
  ``· scale``, in ``scale.dtype``.

Parameter rule = compressed-tensors ``calculate_qparams`` (quantization/utils/helpers.py, 0.20.0):
the range is widened to include 0 (``min ≤ 0 ≤ max``);
symmetric ``scale = amax / ((qmax - qmin) / 2)`` (amax/7.5 for int4, amax/127.5 for int8);
asymmetric ``scale = (max - min) / (qmax - qmin)`` and ``zero = round(clamp(qmin - min/scale))``.
A zero scale (an all-zero group) becomes the scale dtype's eps, as in the library.

Rounding: ``torch.round``, i.e. round half to even (the library's choice too; *not* the
half-away-from-zero ``roundf`` of llama.cpp). Codes are ``round(clamp(w/scale + zero))``
computed in float32 with the *stored* scale, so the codes always agree with what is written;
compressed-tensors divides in the weight dtype, so for bf16 weights a code can differ from the
library's own quantizer at an exact tie, never for float32 weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def qrange(bits: int) -> tuple[int, int]:
    """Signed code range ``(qmin, qmax)`` of a ``bits``-wide integer."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def scale_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    """The scale dtype compressed-tensors gives a weight of ``weight_dtype`` (fp16 for non-floats)."""
    return weight_dtype if weight_dtype in _SCALE_DTYPES else torch.float16


def group_len(in_features: int, group_size: int | None) -> int:
    """Columns per group; raises ValueError if ``in_features`` is not a multiple of it."""
    g = in_features if group_size is None else group_size
    if in_features % g:
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={g}")
    return g


def grouped(w: Tensor, g: int) -> Tensor:
    """``[out, in] → [out, in // g, g]`` view (float32 copy if ``w`` is not float32)."""
    out_f, in_f = w.shape
    return w.float().reshape(out_f, in_f // g, g)


def finish_scale(scale: Tensor, scale_dtype: torch.dtype) -> Tensor:
    """Cast a float32 scale to its stored dtype and replace zeros by that dtype's eps."""
    s = scale.to(scale_dtype)
    return torch.where(s == 0, torch.tensor(torch.finfo(scale_dtype).eps, dtype=scale_dtype), s)


def zero_for_min(mn: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Integer zero-point that maps ``mn`` to ``qmin``: ``round(clamp(qmin - mn/scale))`` as int8."""
    qmin, qmax = qrange(bits)
    z = torch.clamp(qmin - mn / scale.float(), qmin, qmax)
    return torch.round(z).to(torch.int8)


def choose_qparams(
    w: Tensor, bits: int, group_size: int | None, symmetric: bool, *, scale_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor | None]:
    """Min/max qparams of ``w [out, in]``: ``scale [out, in//g]`` (stored dtype), ``zero`` int8 or None."""
    g = group_len(w.shape[1], group_size)
    wg = grouped(w, g)                                          # [out, G, g]
    mn = wg.amin(dim=-1).clamp(max=0.0)                         # [out, G]
    mx = wg.amax(dim=-1).clamp(min=0.0)                         # [out, G]
    qmin, qmax = qrange(bits)
    sdt = scale_dtype or scale_dtype_for(w.dtype)
    if symmetric:
        scale = finish_scale(torch.maximum(-mn, mx) / ((qmax - qmin) / 2), sdt)
        return scale, None
    scale = finish_scale((mx - mn) / (qmax - qmin), sdt)
    return scale, zero_for_min(mn, scale, bits)


def quantize(w: Tensor, scale: Tensor, zero: Tensor | None, bits: int) -> Tensor:
    """int8 codes ``[out, in]``: ``round_half_even(clamp(w/scale + zero, qmin, qmax))`` in float32."""
    out_f, in_f = w.shape
    g = group_len(in_f, in_f // scale.shape[1])
    x = grouped(w, g) / scale.float()[..., None]                # [out, G, g]
    if zero is not None:
        x = x + zero.float()[..., None]
    qmin, qmax = qrange(bits)
    return torch.round(torch.clamp(x, qmin, qmax)).to(torch.int8).reshape(out_f, in_f)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor | None, group_size: int | None = None) -> Tensor:
    """``(q - zero) · scale`` as ``[out, in]`` in ``scale.dtype``, op for op as compressed-tensors."""
    out_f, in_f = q.shape
    g = in_f // scale.shape[1]
    if group_size is not None and group_size != g:
        raise ValueError(f"scale {list(scale.shape)} implies group {g}, not group_size={group_size}")
    x = q.reshape(out_f, in_f // g, g).to(scale.dtype)          # [out, G, g]
    if zero is not None:
        x = x - zero.to(scale.dtype)[..., None]
    return (x * scale[..., None]).reshape(out_f, in_f)


def fake_quantize(w: Tensor, scale: Tensor, zero: Tensor | None, bits: int) -> Tensor:
    """``dequantize(quantize(w))`` in ``scale.dtype``."""
    return dequantize(quantize(w, scale, zero, bits), scale, zero)
