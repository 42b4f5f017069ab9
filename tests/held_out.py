"""Held-out KL of the trained fixture with its decoder weights from a calibrated engine (gptq, autoround)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats.registry import Checkpoint
from gemma2_convert.pipeline.calibrate import QResult, calibration_ids
from gemma2_convert.pipeline.quantize import QuantizeOptions, plan_specs
from quant.metrics import kl_divergence
from quant.qparams import dequantize
from reference.model import Gemma2ForCausalLM
from reference.weights import WeightStore

EVAL = Path(__file__).parent / "fixtures" / "eval.txt"


def decoder_kl(ckpt: Checkpoint, method: str, engine_of: Callable[[dict], Callable[[str], QResult]]) -> float:
    """KL over all of eval.txt (57 windows of 256) of ``ckpt`` against itself with every decoder weight
    replaced by what ``engine_of(layers)(name)`` decodes to (``layers``: the CT int4 g128 specs of ``method``)."""
    specs = plan_specs(ckpt, QuantizeOptions(format="hf", method=method))
    layers = {n: s for n, s in specs.items() if s is not None and "layers." in n}
    result = engine_of(layers)
    tensors = dict(ckpt.tensors)
    for n in layers:
        tensors[n] = LazyTensor.of(dequantize(*result(n)).float())
    ev = calibration_ids(ckpt, EVAL.read_text(), 256, 64)
    with torch.no_grad():
        a = Gemma2ForCausalLM(ckpt.config, WeightStore(ckpt.tensors, ckpt.config, torch.float32))(ev)
        b = Gemma2ForCausalLM(ckpt.config, WeightStore(tensors, ckpt.config, torch.float32))(ev)
    return kl_divergence(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))
