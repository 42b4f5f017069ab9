"""Round-to-nearest with min/max (asymmetric) or absmax (symmetric) qparams: the baseline."""

from __future__ import annotations

import torch
from torch import Tensor

from quant.methods.registry import register_quantizer
from quant.qparams import choose_qparams, quantize
from quant.spec import QuantSpec


@register_quantizer("rtn")
def rtn(
    w: Tensor, spec: QuantSpec, *, hessian: Tensor | None = None, importance: Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """compressed-tensors' own rule (``quant/qparams.py``); ``hessian``/``importance`` are ignored."""
    scale, zero = choose_qparams(w, spec.bits, spec.group_size, spec.symmetric, scale_dtype=scale_dtype)
    return quantize(w, scale, zero, spec.bits), scale, zero
