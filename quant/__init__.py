"""Weight quantization for Gemma 2: one vocabulary shared by every method and on-disk format.

* ``quant.spec``: ``QuantSpec`` (bits, group size, symmetry, method) and its validation.
* ``quant.qparams``: ``choose_qparams → quantize → dequantize``; the layout contract lives there.
* ``quant.pack``: ``pack_int4``/``unpack_int4`` and compressed-tensors' int32 ``pack_int32``/``unpack_int32``.
* ``quant.methods``: the ``QUANTIZERS`` registry ('rtn', 'mse', 'hqq', 'gptq').
* ``quant.policy``: which tensor gets which ``QuantSpec``.
* ``quant.compressed_tensors``: the ``pack-quantized`` tensors and ``quantization_config``.
* ``quant.metrics``: SQNR, relative RMSE, KL divergence, top-1 agreement, perplexity.

Only the light primitives are re-exported here; import the other modules directly.
"""

from quant.pack import pack_int4, pack_int32, unpack_int4, unpack_int32
from quant.qparams import choose_qparams, dequantize, qrange, quantize
from quant.spec import QuantSpec

__all__ = [
    "QuantSpec",
    "choose_qparams",
    "dequantize",
    "pack_int4",
    "pack_int32",
    "qrange",
    "quantize",
    "unpack_int4",
    "unpack_int32",
]
