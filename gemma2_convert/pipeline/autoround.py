"""``--method autoround``: learned rounding per decoder layer, layer by layer through the quantized layers.

For layer i (``quant/methods/autoround.py`` holds the math): the target is the unquantized layer's output
on the unquantized model's activations; the input is the activations that went through the already
*quantized* layers 0…i-1 (so each layer also corrects the error of those before it, as AutoRound's
``enable_quanted_input`` does; ``target='q'``: the unquantized layer on the quantized activations, GPTQ's
objective). Every matrix of the layer gets rounding offsets (and, from mse's start, scale multipliers),
trained together by signed gradient descent on the layer's mean squared output error over random batches
of calibration sequences, each result judged on fixed sequences (the best kept). Only one layer's weights,
parameters and two activation streams are held at a time, so memory stays at one layer plus
``3 × S × T × H`` floats (a 27B fits in 24 GB).
Layers must be requested in order (the writers stream tensors layer by layer).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gemma2_convert.core.progress import SILENT, Progress
from gemma2_convert.formats.registry import Checkpoint
from gemma2_convert.pipeline.calibrate import (
    LAYER_RE,
    InputHessians,
    QResult,
    gptq_refined,
)
from quant.methods.autoround import (
    Rounding,
    export,
    fake_quant,
    optimize,
    start,
    start_from,
)
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
    """Calibration sequences per step, drawn at random from all of them (the gradient's batch)."""
    tokens: int = 512
    """Leading tokens of each sequence a step uses (a causal prefix: its outputs are exact)."""
    init: str = "gptq"
    """Starting point: 'gptq' (GPTQ's codes, act-order, on this layer's calibration inputs, with its scales
    refit to the codes as ``SequentialGPTQ`` does; the scales then stay, the rounding is refined; the best
    judged result is kept, so a layer never ends above that start on the judged sequences) or 'mse'
    (round-to-nearest on mse's scales, both learned: SignRound's)."""

    judge: int = 8
    """Calibration sequences, fixed for the layer, on which each step's result is scored (the best kept);
    0 = each step's own random batch scores it."""
    target: str = "fp"
    """'fp': the unquantized layer's output on the unquantized model's activations (each layer also corrects
    the error of those before it); 'q': on the quantized model's activations (GPTQ's objective; one
    forward a layer fewer)."""
    bf16: bool = False
    """The steps' and the judge's forwards (and the steps' backward) in bfloat16 (autocast; oneDNN's bf16
    kernels, ≈ 2.4× float32's products on the 2B's shapes); the streams between layers stay float32."""

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"autoround target={self.target!r}; choose one of {list(TARGETS)}")
        if self.init not in INITS:
            raise ValueError(f"autoround init={self.init!r}; choose one of {list(INITS)}")


INITS = ("mse", "gptq")
TARGETS = ("fp", "q")
GPTQ_LR = 0.002
"""The step size from GPTQ's start (``lr=None``). Measured on the trained fixture's layers (30 steps, judged
on 8 fixed sequences): 1 / steps flips ≈ 7 % of the codes in the first step and the layer's error rises 3–11×;
0.002 lowers it (by up to 11 %)."""


FAST = AutoRoundSettings(steps=4, batch=2, tokens=256, init="gptq", judge=2, target="q", bf16=True)
"""The documented faster setting (``--autoround-fast``): GPTQ (with the scale refit) on 8 × 256 calibration
tokens, then 4 bfloat16 steps of 2 × 256 tokens, each result judged on 2 fixed sequences, against the
unquantized layer on the quantized stream (the observation forward's own output: no unquantized stream).
Its quality is gptq's, not better (4 steps of 0.002 flip few codes): trained fixture (CT int4 g128, held-out
KL, in-process) gptq 9.03e-5, this 9.14e-5 (judged on 8 sequences: 9.00e-5); a second model not tuned on
1.528e-5 vs 1.533e-5; the default setting (100 steps) 9.27e-5. Its time at a 2B layer (int4 g32, quiet,
2 cores): ≈ 95 s, of which the scale refit ≈ 45 s, GPTQ's factor and column loop ≈ 18 s, the steps ≈ 12 s
(py-spy); ``python -m bench autoround --size 2b`` times it (docs/BENCHMARKS.md)."""


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
        self.hf = self.hq.clone() if settings.target == "fp" else None
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
            rounds, observed = self._starts(i, names)      # observed: the unquantized layer on hq [S, T, H]
            target = observed if self.hf is None else self._forward(i, self.hf, slice(None), self.hf.shape[1])
        t = min(st.tokens, self.hq.shape[1])
        n_seq = self.hq.shape[0]
        fixed = torch.randperm(n_seq, generator=self.gen)[: st.judge]

        def error(rows: torch.Tensor, bf16: bool) -> torch.Tensor:
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                out = self._forward(i, self.hq[rows, :t], rows, t)
            return (out.float() - target[rows, :t]).square().mean()

        def loss(k: int) -> torch.Tensor:
            for n, r in rounds.items():
                store.replace(n, fake_quant(r))
            return error(torch.randperm(n_seq, generator=self.gen)[: st.batch], st.bf16)

        def judge(k: int) -> float:
            if k == st.steps:
                for n, r in rounds.items():
                    store.replace(n, fake_quant(r))
            return float(error(fixed, st.bf16))

        with torch.enable_grad():
            lr = GPTQ_LR if st.lr is None and st.init == "gptq" else st.lr
            self.losses.append(optimize(list(rounds.values()), loss, st.steps, lr,
                                        judge if st.judge else None))
        self._finish_layer(i, names, rounds, target)

    def _starts(self, i: int, names: list[str]) -> tuple[dict[str, Rounding], torch.Tensor | None]:
        """The starting roundings, and the unquantized layer's output on the quantized stream ``hq``."""
        if self.settings.init == "gptq":
            return self._gptq_starts(i, names)
        store = self.model.weights
        rounds = {n: start(store.get(n), self.specs[n], torch.float32) for n in names}
        return rounds, self._forward(i, self.hq, slice(None), self.hq.shape[1])

    def _gptq_starts(self, i: int, names: list[str]) -> tuple[dict[str, Rounding], torch.Tensor | None]:
        """GPTQ (act-order, static groups, scales refit to the codes as ``SequentialGPTQ`` does) on this
        layer's inputs through the quantized layers, as starts; weights sharing an input share its Hessian
        and factor. Also returns the observation forward's output (the unquantized layer on ``hq``) when
        the target needs it (``target='q'``), else None."""
        hessians = InputHessians(names)
        self.model.observer = hessians.observe
        if self.hf is None:  # target 'q': this output is the target
            observed = self._forward(i, self.hq, slice(None), self.hq.shape[1])
        else:  # the inputs only (no down_proj product, no output)
            observed = None
            self.model.observe_layer(i, self.hq, self.cos, self.sin, self.q_idx)
        self.model.observer = None
        out = {}
        for owner, group in hessians.groups().items():
            h = hessians.take(owner)
            factor = factor_hessian(h, act_order=True)
            for n in group:
                w, spec = self.model.weights.get(n), self.specs[n]
                sd = self.scale_dtype or scale_dtype_for(self.model.weights.tensors[n].dtype)
                q, s, z = gptq_refined(n, w, spec, h, factor, sd)
                out[n] = start_from(w, q, s, z, spec.bits, learn_scale=False)
        return out, observed

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
        self.hf = None if self.hf is None else target
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
