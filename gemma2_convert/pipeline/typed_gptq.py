"""``--method gptq`` with ``--bpw`` / ``--target-size``: each allocated type quantized by GPTQ where we can.

The allocation (``pipeline/allocate.py``) picks a GGUF type per tensor; this engine then calibrates the
decoder layer by layer like :class:`SequentialGPTQ` (each layer's Hessians from activations through the already
quantized layers) and writes each weight's blocks:

* Q2_K / Q3_K / Q4_K / Q5_K / Q6_K / IQ4_XS / IQ4_NL: llama.cpp's scales (its imatrix search with our
  activation importance), GPTQ's codes on that grid (``quant/grid_gptq.py``);
* Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0: our GPTQ's own fp16 scales and codes (``quant/methods/gptq.py``, refined
  by ``quant/gptq_scales.py``), packed as such;
* any other type: llama.cpp's quantizer with the importance.
"""

from __future__ import annotations

from typing import Any

import torch

from gemma2_convert.formats.gguf.quantized import blocks
from gemma2_convert.formats.registry import Checkpoint
from gemma2_convert.pipeline.calibrate import LAYER_RE, SequentialGPTQ, gptq_refined
from quant.gguf_codec import dequantize_tensor, quantize_tensor
from quant.grid_gptq import GRID_TYPES, gptq_blocks
from quant.spec import QuantSpec

OWN_CODES = {"Q4_0": QuantSpec(4, 32, True, "gptq"), "Q4_1": QuantSpec(4, 32, False, "gptq"),
             "Q5_0": QuantSpec(5, 32, True, "gptq"), "Q5_1": QuantSpec(5, 32, False, "gptq"),
             "Q8_0": QuantSpec(8, 32, True, "gptq")}
"""The legacy types our GPTQ writes exactly (fp16 scale per 32, codes kept as GPTQ chose them)."""


class TypedGPTQ(SequentialGPTQ):
    """``result(name)`` → the ``types[name]`` block bytes (uint8 ``[rows, bytes a row]``) of a decoder
    weight."""

    def __init__(self, ckpt: Checkpoint, types: dict[str, str], importance: dict[str, torch.Tensor],
                 ids: torch.Tensor) -> None:
        layers = {n: OWN_CODES.get(t, QuantSpec(4, 32, True, "gptq")) for n, t in types.items()
                  if LAYER_RE.match(n)}
        super().__init__(ckpt, layers, ids, scale_dtype=torch.float16)
        self.types, self.importance = types, importance

    def quantize(self, name: str, w: torch.Tensor, hessian: torch.Tensor) -> tuple[Any, torch.Tensor]:
        qtype, qw, w = self.types[name], self.importance.get(name), w.float()
        if qtype in GRID_TYPES:
            data = gptq_blocks(w, qtype, hessian, qw, factor=self.factor(hessian))  # shared by q/k/v, gate/up
        elif qtype in OWN_CODES:
            q, s, z = gptq_refined(name, w, OWN_CODES[qtype], hessian, self.factor(hessian), torch.float16,
                                   self.refine)  # fp16 scales refit to the codes, codes redone
            data = blocks(q, s, z, qtype, w, keep_codes=True)
        else:
            data = quantize_tensor(w, qtype, quant_weights=qw)
        return data, dequantize_tensor(data, qtype, tuple(w.shape))
