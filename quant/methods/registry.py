"""The ``QUANTIZERS`` registry of weight quantization methods, and the entry point ``quantize_weight``.

Every method has the signature::

    method(w: Tensor[out, in], spec: QuantSpec, *, hessian=None, importance=None,
           scale_dtype=None, **options) -> (q, scale, zero)

and returns the layout of ``quant/qparams.py``: ``q`` int8 ``[out, in]``, ``scale [out, in // g]``
in ``scale_dtype`` (default: compressed-tensors' choice for ``w.dtype``), ``zero`` int8
``[out, in // g]`` or None when ``spec.symmetric``. ``dequantize(q, scale, zero)`` decodes it.
``importance`` (per input column ``[in]`` or per weight ``[out, in]``, non-negative) weights the
squared error of the search-based methods; ``hessian`` (``[in, in]``) is required by 'gptq'.

The method modules register themselves with ``@register_quantizer``; ``quant/methods/__init__.py``
imports them, so the registry is full whenever ``quant.methods`` (or anything under it) is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gemma2_convert.core.errors import UnsupportedError
from quant.spec import QuantSpec

Quantizer = Callable[..., tuple[Tensor, Tensor, "Tensor | None"]]

QUANTIZERS: dict[str, Quantizer] = {}
"""Method name (``QuantSpec.method``) -> quantizer."""


def register_quantizer(name: str) -> Callable[[Quantizer], Quantizer]:
    """Decorator adding a method to ``QUANTIZERS``; a second method under the same name is an error."""

    def deco(fn: Quantizer) -> Quantizer:
        if name in QUANTIZERS:
            raise ValueError(
                f"quantizer {name!r} is already registered ({QUANTIZERS[name].__module__}); "
                f"register {fn.__module__}.{fn.__name__} under another name"
            )
        QUANTIZERS[name] = fn
        return fn

    return deco


def get_quantizer(name: str) -> Quantizer:
    """The method registered as ``name``; an unknown name lists the valid ones."""
    try:
        return QUANTIZERS[name]
    except KeyError:
        raise UnsupportedError(f"unknown quantization method {name!r}; valid: {sorted(QUANTIZERS)}") from None


ROW_CHUNK = 4096
"""Rows per slice for the row-independent search methods: bounds their float32 temporaries."""


def by_row_chunks(
    method: Quantizer, w: Tensor, spec: QuantSpec, importance: Tensor | None, rows: int, **options: Any
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run a row-independent ``method`` on ``rows``-row slices of ``w`` and concatenate (identical result)."""
    parts = []
    for r in range(0, w.shape[0], rows):
        imp = importance[r : r + rows] if importance is not None and importance.dim() == 2 else importance
        parts.append(method(w[r : r + rows], spec, importance=imp, row_chunk=rows, **options))
    zero = None if parts[0][2] is None else torch.cat([p[2] for p in parts])
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), zero


def quantize_weight(
    w: Tensor, spec: QuantSpec, *, name: str = "weight", hessian: Tensor | None = None,
    importance: Tensor | None = None, **options: Any,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Check ``w`` against ``spec`` (the error names ``name``), then run ``spec.method``.

    ``options`` go to the method as keyword arguments (e.g. ``mse``'s ``threads``, ``compiled``)."""
    spec.check_shape(name, tuple(w.shape))
    return get_quantizer(spec.method)(w, spec, hessian=hessian, importance=importance, **options)
