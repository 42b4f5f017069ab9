"""``--method autoround``: learned rounding per decoder layer, layer by layer through the quantized layers.

For layer i (``quant/methods/autoround.py`` holds the math): the target is the unquantized layer's output
on the unquantized model's activations; the input is the activations that went through the already
*quantized* layers 0…i-1 (so each layer also corrects the error of those before it, as AutoRound's
``enable_quanted_input`` does). Every matrix of the layer gets rounding offsets and scale multipliers,
trained together by signed gradient descent on the layer's mean squared output error over random
batches of calibration sequences. Only one layer's weights, parameters and two activation streams are
held at a time, so memory stays at one layer plus ``3 × S × T × H`` floats (a 27B fits in 24 GB).
Layers must be requested in order (the writers stream tensors layer by layer).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from gemma2_convert.core.progress import SILENT, Progress
from gemma2_convert.formats.registry import Checkpoint
from gemma2_convert.pipeline.calibrate import LAYER_RE, InputHessians, QResult
from quant.methods import quantize_weight
from quant.methods.autoround import Rounding, export, fake_quant, optimize, start, start_from
from quant.methods.gptq import factor_hessian
from quant.qparams import dequantize, scale_dtype_for
from quant.spec import QuantSpec
from reference.layers import rope_cos_sin
from reference.model import Gemma2Model
from reference.weights import WeightStore


@dataclass(frozen=True)
class AutoRoundSettings:
    """How hard each layer is trained."""

    steps: int = 100
    """Signed-gradient steps per decoder layer."""
    lr: float | None = None
    """Step size; None = 1 / steps (SignRound's default), decayed linearly."""
    batch: int = 8
    """Calibration sequences per step, drawn at random from all of them (the best step is judged on its batch:
    on the trained fixture 2 sequences a step measured worse than mse, 8 better than gptq, both from mse)."""
    tokens: int = 512
    """Leading tokens of each sequence a step uses (a causal prefix: its outputs are exact)."""
    init: str = "gptq"
    """Starting point: 'gptq' (GPTQ's codes and scales, act-order, on this layer's calibration inputs,
    then refined; the best loss seen is kept, so a layer never ends above GPTQ's calibration error) or
    'mse' (round-to-nearest on mse's scales, SignRound's). Trained fixture, int4 g128, 111 sequences,
    25 steps from gptq: held-out KL 8.45e-5 (= gptq's: no step beat its start; lr 0.005: 1.26e-4) vs
    1.65e-4 from mse (100 steps, 8 sequences)."""

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"autoround init={self.init!r}; choose one of {list(INITS)}")


INITS = ("mse", "gptq")


FAST = AutoRoundSettings(steps=4, batch=2, tokens=256, init="gptq")
"""The documented faster setting (``--autoround-steps 4 --autoround-batch 2 --autoround-tokens 256``):
GPTQ on 8 × 256 calibration tokens, then 4 steps on 2 × 256. Sized for the 2B's ≤ 10 min on 2 cores
(≈ 23 s a layer): a 2B layer has 78 M weights; 3 forwards over 2048 tokens ≈ 1 TFLOP, the Hessians (one per
input, ``InputHessians``) ≈ 0.25 TFLOP, the factorizations (once per input) ≈ 0.55 TFLOP, GPTQ's lazy updates
≈ 0.3 TFLOP, 4 steps ≈ 1 TFLOP with the fake quantization of 78 M weights: ≈ 3 TFLOP a layer, so 23 s
needs ≈ 130 GFLOP/s of float32 sustained. Timed by ``python -m bench autoround --size 2b``
(docs/QUANTIZATION.md, "Quantization time at the 2B shape")."""


class SequentialAutoRound:
    """``result(name)`` → learned (codes, scale, zero) of a decoder weight, training layers in order."""

    def __init__(self, ckpt: Checkpoint, specs: dict[str, QuantSpec], ids: torch.Tensor,
                 settings: AutoRoundSettings = AutoRoundSettings(), scale_dtype: torch.dtype | None = None,
                 progress: Progress = SILENT) -> None:
        cfg = ckpt.config
        self.model = Gemma2Model(cfg, WeightStore(ckpt.tensors, cfg, torch.float32, resident=False))
        self.specs, self.settings, self.scale_dtype, self.progress = specs, settings, scale_dtype, progress
        ids = ids[:, : settings.tokens]  # the loss sees only this causal prefix: later positions never matter
        self.q_idx = torch.arange(ids.shape[1])
        self.cos, self.sin = rope_cos_sin(self.q_idx[None].expand(ids.shape[0], -1), cfg, torch.float32)
        with torch.no_grad():
            self.hq = self.model.weights.embed(ids) * torch.tensor(cfg.hidden_size ** 0.5)  # [S, T, H]
        self.hf = self.hq.clone()
        self.next_layer, self.results = 0, {}
        self.losses: list[tuple[float, float]] = []
        self.t0 = time.perf_counter()
        self.gen = torch.Generator().manual_seed(0)

    def result(self, name: str) -> QResult:
        m = LAYER_RE.match(name)
        if m is None or name not in self.specs:
            raise KeyError(f"{name} is not a calibrated decoder weight")
        while self.next_layer <= int(m.group(1)):
            self._run_layer(self.next_layer)
        if name not in self.results:
            raise RuntimeError(f"{name} requested after its layer was released; request layers in order")
        return self.results[name]

    def _forward(self, i: int, h: torch.Tensor, rows: torch.Tensor | slice, t: int) -> torch.Tensor:
        cos, sin = self.cos[rows, :, :t], self.sin[rows, :, :t]
        return self.model._layer(i, h, cos, sin, self.q_idx[:t], None, None, None)

    def _run_layer(self, i: int) -> None:
        self.results.clear()
        store, st = self.model.weights, self.settings
        names = [n for n in self.specs if n.startswith(f"model.layers.{i}.")]
        with torch.no_grad():
            target = self._forward(i, self.hf, slice(None), self.hf.shape[1])   # [S, T, H], unquantized
            rounds = self._gptq_starts(i, names) if st.init == "gptq" else {
                n: start(store.get(n), self.specs[n], torch.float32) for n in names}
        t = min(st.tokens, self.hq.shape[1])
        n_seq = self.hq.shape[0]

        def loss(k: int) -> torch.Tensor:
            rows = torch.randperm(n_seq, generator=self.gen)[: st.batch]
            for n, r in rounds.items():
                store.replace(n, fake_quant(r))
            out = self._forward(i, self.hq[rows, :t], rows, t)
            return (out - target[rows, :t]).square().mean()

        with torch.enable_grad():
            self.losses.append(optimize(list(rounds.values()), loss, st.steps, st.lr))
        self._finish_layer(i, names, rounds, target)

    @torch.no_grad()
    def _gptq_starts(self, i: int, names: list[str]) -> dict[str, Rounding]:
        """GPTQ (act-order, static groups) on this layer's inputs through the quantized layers, as starts;
        weights sharing an input share its Hessian and factor."""
        hessians = InputHessians(names)
        self.model.observer = hessians.observe
        self._forward(i, self.hq, slice(None), self.hq.shape[1])
        self.model.observer = None
        out = {}
        for owner, group in hessians.groups().items():
            factor = factor_hessian(hessians.take(owner), act_order=True)
            for n in group:
                w, spec = self.model.weights.get(n), self.specs[n]
                sd = self.scale_dtype or scale_dtype_for(self.model.weights.tensors[n].dtype)
                q, s, z = quantize_weight(w, replace(spec, method="gptq"), name=n, factor=factor, scale_dtype=sd)
                out[n] = start_from(w, q, s, z, spec.bits)
        return out

    @torch.no_grad()
    def _finish_layer(self, i: int, names: list[str], rounds: dict[str, Rounding],
                      target: torch.Tensor) -> None:
        store = self.model.weights
        for n in names:
            sd = self.scale_dtype or scale_dtype_for(self.model.weights.tensors[n].dtype)
            q, s, z = export(rounds[n], sd)
            self.results[n] = (q, s, z)
            store.replace(n, dequantize(q, s, z))  # the next layers see this layer quantized
        self.hq = self._forward(i, self.hq, slice(None), self.hq.shape[1])
        self.hf = target
        for n in names:
            store.replace(n, None)
        self.next_layer = i + 1
        done, total = i + 1, self.model.config.num_hidden_layers
        eta = (time.perf_counter() - self.t0) / done * (total - done)
        first, best = self.losses[-1]
        self.progress.advance(0, f"autoround layer {i}: loss {first:.3g} → {best:.3g}, ETA {eta:.0f} s")


def autoround_engine(ckpt: Checkpoint, specs: dict[str, QuantSpec | None], ids: torch.Tensor,
                     settings: AutoRoundSettings, scale_dtype: torch.dtype | None,
                     progress: Progress) -> Callable[[str], QResult]:
    """The ``ModuleQuantizer`` hook: learned codes for every decoder weight the policy quantizes."""
    layers = {n: s for n, s in specs.items() if s is not None and "layers." in n}
    return SequentialAutoRound(ckpt, layers, ids, settings, scale_dtype, progress).result
