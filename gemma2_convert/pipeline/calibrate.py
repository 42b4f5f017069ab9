"""Calibration for GPTQ: record each decoder matmul's inputs with the reference model, layer by layer.

Sequential, as in GPTQ (../shared/spec/QUANT_FORMATS.md §3.1): layer i's Hessians ``2/n · XᵀX`` come
from activations that already went through the *quantized* layers 0…i-1, so each layer corrects the
error of the ones before it. Only one layer's activations, Hessians and results are held at a time;
layers must be requested in order (the writers stream tensors layer by layer).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from gemma2_convert.core.errors import ConversionError
from gemma2_convert.formats.registry import Checkpoint
from quant.gptq_scales import ROUNDS, refine
from quant.methods import quantize_weight
from quant.methods.gptq import HessianFactor, add_xtx, factor_hessian, mirror_upper
from quant.qparams import dequantize
from quant.spec import QuantSpec
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


def calibration_dtype() -> torch.dtype:
    """The calibration forward's dtype: bfloat16 where the CPU has oneDNN's bf16 kernels, else float32.

    One 2B-shaped layer over 8 × 2048 tokens (2 cores): the observation pass 45 → 25 s, the layer 58 → 31 s.
    Held-out KL of gptq int4 g128 on the trained fixture (float32 → bfloat16 forward, four calibration
    subsets: all 112 sequences, the first 111, the text from token 40, from 80): 9.00 → 9.82, 8.64 → 7.66,
    9.42 → 8.98, 9.22 → 7.60 (× 1e-5): within the subsets' spread, no worse on average."""
    bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if bf16 else torch.float32


class InputHessians:
    """``H = 2/n · XᵀX`` of each observed weight's input ``[in, in]`` over one layer's pass. A weight fed the very
    tensor the previous observed weight was fed (``q/k/v``: the normed hidden states; ``gate/up``) shares that
    weight's sum: one ``XᵀX`` per input, and its Hessian is one object, so GPTQ factors it once."""

    def __init__(self, names: set[str] | list[str]) -> None:
        self.names = set(names)
        self.sums: dict[str, tuple[torch.Tensor, int]] = {}  # owner name → (upper-block ΣxᵀX, rows)
        self.owner: dict[str, str] = {}                      # observed name → the name whose sum it uses
        self.last: tuple[torch.Tensor, str] | None = None

    def observe(self, name: str, x: torch.Tensor) -> None:
        """The model's observer hook."""
        if name not in self.names:
            return
        if self.last is not None and self.last[0] is x and self.owner.get(name, self.last[1]) == self.last[1]:
            self.owner[name] = self.last[1]
            return
        if self.owner.setdefault(name, name) != name:
            raise RuntimeError(f"{name} shared {self.owner[name]}'s input once, then got another")
        acc, n = self.sums.get(name, (None, 0))
        self.sums[name] = (add_xtx(acc, x), n + x.reshape(-1, x.shape[-1]).shape[0])
        self.last = (x, name)

    def groups(self) -> dict[str, list[str]]:
        """Observed names by the input they share, in the order observed: ``{owner: [names]}``."""
        out: dict[str, list[str]] = {}
        for name, key in self.owner.items():
            out.setdefault(key, []).append(name)
        return out

    def take(self, owner: str) -> torch.Tensor:
        """The Hessian of ``owner``'s input (handed out once: its sum is released)."""
        acc, n = self.sums.pop(owner)
        return mirror_upper(acc).mul_(2.0 / n)


def gptq_refined(name: str, w: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor, factor: HessianFactor,
                 scale_dtype: torch.dtype | None, rounds: int | None = ROUNDS) -> QResult:
    """GPTQ's (codes, scale, zero) of weight ``name`` on its Hessian's ``factor`` in ``spec``'s layout, its scales
    refit to the codes and the codes redone ``rounds`` times (``quant/gptq_scales.py``; None: GPTQ's own)."""
    q, s, z = quantize_weight(w, replace(spec, method="gptq"), name=name, factor=factor, scale_dtype=scale_dtype)
    if rounds is not None:
        q, s = refine(w, q, s, z, hessian, spec.bits, factor, rounds)
    return q, s, z


class SequentialGPTQ:
    """``result(name)`` → GPTQ (codes, scale, zero) of a decoder weight, calibrating layers in order.

    ``act_order`` (default): columns by decreasing Hessian diagonal with static groups
    (``quant/methods/gptq.py``), so the output keeps the plain group layout (no ``g_idx``). ``refine``
    (default ``ROUNDS``): GPTQ's scales refit to its codes in the Hessian's metric and its codes redone on
    them, that many rounds (``quant/gptq_scales.py``); None: GPTQ's own. ``forward_dtype``: the calibration
    forward's weights and activations (the Hessians are summed in float32 either way; the weights quantized
    are the checkpoint's own); None: :func:`calibration_dtype`."""

    def __init__(self, ckpt: Checkpoint, specs: dict[str, QuantSpec], ids: torch.Tensor,
                 on_layer: Callable[[int], None] | None = None, scale_dtype: torch.dtype | None = None,
                 act_order: bool = True, refine: int | None = ROUNDS,
                 forward_dtype: torch.dtype | None = None) -> None:
        cfg = ckpt.config
        self.scale_dtype, self.act_order, self.refine = scale_dtype, act_order, refine
        dtype = forward_dtype or calibration_dtype()
        self.model = Gemma2Model(cfg, WeightStore(ckpt.tensors, cfg, dtype, resident=False))
        self.specs, self.on_layer = specs, on_layer
        with torch.inference_mode():
            s = self.model.start(ids)
        self.q_idx, self.cos, self.sin, self.h = s.q_idx, s.cos, s.sin, s.h  # h: [S, T, H]
        self.next_layer = 0
        self.results: dict[str, QResult] = {}
        self.last_factor: tuple[torch.Tensor, HessianFactor] | None = None

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
        res = gptq_refined(name, w, self.specs[name], hessian, self.factor(hessian), self.scale_dtype, self.refine)
        return res, dequantize(*res)

    def factor(self, hessian: torch.Tensor) -> HessianFactor:
        """GPTQ's factor of ``hessian``: computed once for the weights whose inputs share it (the Hessian is
        the same object for them, see :class:`InputHessians`; the latest factor is kept)."""
        if self.last_factor is None or self.last_factor[0] is not hessian:
            self.last_factor = None  # free the previous factor first
            self.last_factor = (hessian, factor_hessian(hessian, act_order=self.act_order))
        return self.last_factor[1]

    @torch.inference_mode()
    def _run_layer(self, i: int) -> None:
        self.results.clear()
        store, hessians = self.model.weights, InputHessians(self.specs)
        self.model.observer = hessians.observe
        self.model.observe_layer(i, self.h, self.cos, self.sin, self.q_idx)  # the inputs only: no output
        self.model.observer = None
        names = hessians.groups()
        for owner, group in names.items():
            h = hessians.take(owner)
            for name in group:
                self.results[name], approx = self.quantize(name, self.model.weights.tensors[name].load(), h)
                store.replace(name, approx)  # the next layers see this layer quantized
        self.last_factor = None
        self.h = self.model._layer(i, self.h, self.cos, self.sin, self.q_idx, None, None, None)
        for group in names.values():
            for name in group:
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
