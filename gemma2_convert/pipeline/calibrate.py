"""Calibration for GPTQ: record each decoder matmul's inputs with the reference model, layer by layer.

Sequential, as in GPTQ (../shared/spec/QUANT_FORMATS.md §3.1): layer i's Hessians ``2/n · XᵀX`` come
from activations that already went through the *quantized* layers 0…i-1, so each layer corrects the
error of the ones before it. Only one layer's activations, Hessians and results are held at a time;
layers must be requested in order (the writers stream tensors layer by layer).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gemma2_convert.core.errors import ConversionError
from gemma2_convert.formats.registry import Checkpoint
from quant.methods import quantize_weight
from quant.methods.gptq import accumulate_hessian
from quant.qparams import dequantize
from quant.spec import QuantSpec
from reference.layers import rope_cos_sin
from reference.model import Gemma2Model
from reference.weights import WeightStore

QResult = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # codes [out, in], scale, zero
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
CALIBRATION_TOKENS = 16384
"""Token budget of the calibration sequences (at least 8 of them): 8 × 2048 on the 2B/9B/27B, up to
128 × 128 on a model with a 64-token window. On the trained fixture (128-token sequences) gptq's
held-out KL at int4 g128 went 1.61e-4 → 1.39e-4 from 8 to 111 sequences, 1.56e-4 → 0.84e-4 with
act-order (docs/QUANTIZATION.md, int4)."""


def calibration_ids(ckpt: Checkpoint, text: str, seq_len: int, max_seqs: int | None = None,
                    shorter_ok: bool = False) -> torch.Tensor:
    """Tokenized calibration text [S, seq_len] (each row starts with <bos>), via the checkpoint's tokenizer;
    ``max_seqs`` None = as many as ``CALIBRATION_TOKENS`` allows, at least 8.

    A text shorter than one sequence is an error, unless ``shorter_ok``: then it is one shorter sequence
    (the built-in text, used for mse/hqq's activation importance when no ``--calibration`` is given)."""
    if max_seqs is None:
        max_seqs = max(8, CALIBRATION_TOKENS // seq_len)
    if ckpt.tokenizer is None:
        raise ConversionError("calibration needs the model's tokenizer.model (none found next to the checkpoint)",
                              ckpt.path)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(ckpt.tokenizer))
    ids = [i for i in sp.encode(text) if i < ckpt.config.vocab_size]
    body = seq_len - 1
    if shorter_ok and 0 < len(ids) < body:
        body = len(ids)
    n = min(max_seqs, len(ids) // body)
    if n == 0:
        raise ConversionError(f"calibration text has {len(ids)} tokens; at least {body} are needed (one sequence of "
                              f"{seq_len} with <bos>); pass --calibration FILE with more text")
    rows = torch.tensor(ids[: n * body]).view(n, body)
    return torch.cat([torch.full((n, 1), ckpt.config.bos_token_id), rows], dim=1)


class SequentialGPTQ:
    """``result(name)`` → GPTQ (codes, scale, zero) of a decoder weight, calibrating layers in order.

    ``act_order`` (default): columns by decreasing Hessian diagonal with static groups
    (``quant/methods/gptq.py``), so the output keeps the plain group layout (no ``g_idx``)."""

    def __init__(self, ckpt: Checkpoint, specs: dict[str, QuantSpec], ids: torch.Tensor,
                 on_layer: Callable[[int], None] | None = None, scale_dtype: torch.dtype | None = None,
                 act_order: bool = True) -> None:
        cfg = ckpt.config
        self.scale_dtype, self.act_order = scale_dtype, act_order
        self.model = Gemma2Model(cfg, WeightStore(ckpt.tensors, cfg, torch.float32, resident=False))
        self.specs, self.on_layer = specs, on_layer
        self.q_idx = torch.arange(ids.shape[1])
        self.cos, self.sin = rope_cos_sin(self.q_idx[None].expand(ids.shape[0], -1), cfg, torch.float32)
        with torch.inference_mode():
            normalizer = torch.tensor(cfg.hidden_size ** 0.5, dtype=torch.float32)
            self.h = self.model.weights.embed(ids) * normalizer  # [S, T, H]
        self.next_layer = 0
        self.results: dict[str, QResult] = {}

    def result(self, name: str) -> QResult:
        m = LAYER_RE.match(name)
        if m is None or name not in self.specs:
            raise KeyError(f"{name} is not a calibrated decoder weight")
        layer = int(m.group(1))
        while self.next_layer <= layer:
            self._run_layer(self.next_layer)
        if name not in self.results:
            raise RuntimeError(f"{name} requested after its layer was released; request layers in order")
        return self.results[name]

    def quantize(self, name: str, w: torch.Tensor, hessian: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """(the result ``result(name)`` hands out, what the weight decodes to) of one weight given its Hessian."""
        q, s, z = quantize_weight(w, self.specs[name], name=name, hessian=hessian, scale_dtype=self.scale_dtype,
                                  act_order=self.act_order)
        return (q, s, z), dequantize(q, s, z)

    @torch.inference_mode()
    def _run_layer(self, i: int) -> None:
        self.results.clear()
        store, hessians = self.model.weights, {}

        def observe(name: str, x: torch.Tensor) -> None:
            if name in self.specs:
                h, n = hessians.get(name, (None, 0))
                hessians[name] = accumulate_hessian(h, n, x)

        self.model.observer = observe
        self.model._layer(i, self.h, self.cos, self.sin, self.q_idx, None, None, None)
        self.model.observer = None
        for name, (h, _) in hessians.items():
            self.results[name], approx = self.quantize(name, self.model.weights.tensors[name].load(), h)
            store.replace(name, approx)  # the next layers see this layer quantized
        self.h = self.model._layer(i, self.h, self.cos, self.sin, self.q_idx, None, None, None)
        for name in hessians:
            store.replace(name, None)
        self.next_layer = i + 1
        if self.on_layer is not None:
            self.on_layer(i)


@torch.inference_mode()
def activation_importance(ckpt: Checkpoint, names: set[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean squared input activation per input column ``[in]`` of each weight in ``names`` (llama.cpp's
    importance matrix, ../shared/spec/QUANT_FORMATS.md §1.3), from one pass of the unquantized model."""
    cfg = ckpt.config
    model = Gemma2Model(cfg, WeightStore(ckpt.tensors, cfg, torch.float32, resident=False))
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        if name in names:
            x2 = x.reshape(-1, x.shape[-1]).float()
            sums[name] = sums.get(name, 0) + x2.square().sum(0)
            counts[name] = counts.get(name, 0) + x2.shape[0]

    model.observer = observe
    model.decode(ids)
    return {n: sums[n] / counts[n] for n in sums}


def read_text(path: Path | None, default: str) -> str:
    if path is None:
        return default
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"cannot read text: {e}", path) from None
