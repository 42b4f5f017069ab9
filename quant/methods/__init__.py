"""Quantization methods ('rtn', 'mse', 'hqq', 'gptq') and their registry (``quant/methods/registry.py``),
and 'autoround' (learned rounding).

This package lists the method modules in one place: importing them registers each one in
``QUANTIZERS``. A new method is one module under ``quant/methods/`` decorated with
``@register_quantizer(name)`` and one name in the import line below. The signature and the layout
every method returns are in the registry's docstring.
"""

# Importing them registers the methods, in this order (the order --method lists them).
from quant.methods import rtn, mse, hqq, gptq, autoround  # noqa: F401, I001
from quant.methods.registry import (QUANTIZERS, ROW_CHUNK, Quantizer, by_row_chunks, get_quantizer,
                                    quantize_weight, register_quantizer)

__all__ = [
    "QUANTIZERS",
    "ROW_CHUNK",
    "Quantizer",
    "by_row_chunks",
    "get_quantizer",
    "quantize_weight",
    "register_quantizer",
]
