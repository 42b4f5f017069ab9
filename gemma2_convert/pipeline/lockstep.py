"""Verification in lockstep: both models layer by layer, each layer read once.

For each decoder layer ``i`` the tensors of A and of B are loaded once, compared (``tensor_diff``: equal
after the cast, else SQNR and max |Δ|), handed to both reference models (``WeightStore.hold``) and layer
``i`` of both forwards runs on every prompt from that same load; then the layer is dropped. The embedding,
the final norm and the head are compared last, when the head needs them. Prompts whose activations would
not fit ``ACTIVATION_BUDGET`` together run in several groups (each group reads the layers again). While a layer
computes, the next one's bytes are requested from the disk (``LazyTensor.prefetch``).

Memory: what stays between layers is the prompts' hidden states; within a layer, the loaded tensors that
are held (at most ``HOLD_BUDGET`` bytes; zero-copy views of mapped files cost no anonymous memory), one
weight cast to the compute dtype at a time when streaming, and the activations of one group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gemma2_convert.core.lazy import dtype_nbytes
from gemma2_convert.pipeline.compare import TensorDiff, tensor_diff
from quant.metrics import kl_divergence, perplexity, top1_agreement
from reference.config import Gemma2Config
from reference.model import Gemma2Model, Rows

ACTIVATION_BUDGET = 512 << 20
"""Bytes of activations (hidden states, MLP intermediates, logits) of one model's prompts run together."""
HOLD_BUDGET = 768 << 20
"""Bytes of loaded tensors (both models) kept from the comparison for the forward passes of one layer."""


@dataclass
class LockstepResult:
    tensors_equal: int = 0
    diffs: list[TensorDiff] = field(default_factory=list)
    rows: list[tuple[Rows, Rows]] = field(default_factory=list)
    """Per prompt: (outputs, targets) of A and of B, in the order of the prompts."""


def activation_bytes(cfg: Gemma2Config, tokens: int, dtype: torch.dtype) -> int:
    """Activations of one model for ``tokens`` positions: hidden states, the MLP's three intermediates,
    and float32 logits plus their compute-dtype chunks."""
    per = (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * dtype_nbytes(dtype) + cfg.vocab_size * 8
    return tokens * per


def prompt_groups(prompts: list[torch.Tensor], cfg: Gemma2Config, dtype: torch.dtype) -> list[list[int]]:
    """Indices of the prompts in groups that fit ``ACTIVATION_BUDGET`` (at least one prompt each)."""
    groups: list[list[int]] = [[]]
    used = 0
    for k, ids in enumerate(prompts):
        need = activation_bytes(cfg, ids.numel(), dtype)
        if groups[-1] and used + need > ACTIVATION_BUDGET:
            groups.append([])
            used = 0
        groups[-1].append(k)
        used += need
    return groups


def layer_names(cfg: Gemma2Config, names: list[str]) -> list[list[str]]:
    """The tensors of each decoder layer, then the rest (embedding, final norm, head) last."""
    by_layer: list[list[str]] = [[] for _ in range(cfg.num_hidden_layers + 1)]
    for name in names:
        parts = name.split(".")
        i = int(parts[2]) if name.startswith("model.layers.") else cfg.num_hidden_layers
        by_layer[i].append(name)
    return by_layer


class Lockstep:
    """Runs models A and B over prompts together, comparing their tensors on the way (``compare``)."""

    def __init__(self, a: Gemma2Model, b: Gemma2Model, compare: bool,
                 on_step: Callable[[int, int], None] | None = None) -> None:
        self.a, self.b, self.compare, self.on_step = a, b, compare, on_step
        self.result = LockstepResult()

    def run(self, prompts: list[torch.Tensor]) -> LockstepResult:
        cfg = self.a.config
        groups = prompt_groups(prompts, cfg, self.a.dtype)
        steps, total = 0, len(groups) * (cfg.num_hidden_layers + 1)
        rows: dict[int, tuple[Rows, Rows]] = {}
        by_layer = layer_names(cfg, list(dict.fromkeys([*self.a.weights.tensors, *self.b.weights.tensors])))
        for g, group in enumerate(groups):
            ids = [prompts[k] for k in group]
            sa, sb = [self.a.start(x) for x in ids], [self.b.start(x) for x in ids]
            for i in range(cfg.num_hidden_layers + 1):
                self._load(by_layer[i], compare=self.compare and g == 0)
                if i < cfg.num_hidden_layers:
                    self._prefetch(by_layer[i + 1])  # the disk reads the next layer while this one computes
                    self.a.run_layer(i, sa)
                    self.b.run_layer(i, sb)
                else:
                    outs = zip(self.a.finish_streams(sa, ids), self.b.finish_streams(sb, ids))
                    rows.update(zip(group, outs))
                self.a.weights.release()
                self.b.weights.release()
                steps += 1
                if self.on_step is not None:
                    self.on_step(steps, total)
        self.result.rows = [rows[k] for k in range(len(prompts))]
        return self.result

    def _prefetch(self, names: list[str]) -> None:
        for name in names:
            for store in (self.a.weights, self.b.weights):
                lt = store.tensors.get(name)
                if lt is not None and lt.prefetch is not None:
                    lt.prefetch()

    def _load(self, names: list[str], compare: bool) -> None:
        """Load each tensor of A and B once, compare them, and hold what fits for the forward passes."""
        stores = self.a.weights, self.b.weights
        held: tuple[dict, dict] = ({}, {})
        room = HOLD_BUDGET
        for name in names:
            lazies = [st.tensors.get(name) for st in stores]  # None: a tensor only the other model has
            if not compare and room < sum(lt.nbytes for lt in lazies if lt is not None):
                continue
            ta, tb = (lt.load() if lt is not None else None for lt in lazies)
            if compare:  # verify checked that both have every name
                d = tensor_diff(name, ta, tb)
                self.result.diffs.append(d)
                self.result.tensors_equal += d.equal
            need = sum(t.numel() * t.element_size() for t in (ta, tb) if t is not None)
            if need <= room:
                room -= need
                for h, t in zip(held, (ta, tb)):
                    if t is not None:
                        h[name] = t
        for st, h in zip(stores, held):
            st.hold(h)


def logit_figures(rows: list[tuple[Rows, Rows]]) -> dict[str, float]:
    """max |Δ|, mean KL(a‖b), top-1 agreement and perplexities over the rows of A and B
    (next-token logits; class logits of a classifier; hidden states of a bare decoder)."""
    pa, pb = torch.cat([r[0][0] for r in rows]), torch.cat([r[1][0] for r in rows])  # [P, C]
    targets = [r[0][1] for r in rows if r[0][1] is not None]
    tgt = torch.cat(targets) if targets else None
    return {
        "tokens": int(pa.shape[0]),
        "max_abs_logits": (pa - pb).abs().max().item(),
        "mean_kl": kl_divergence(pa, pb),
        "top1": top1_agreement(pa, pb),
        "ppl_a": perplexity(pa, tgt) if tgt is not None else 0.0,
        "ppl_b": perplexity(pb, tgt) if tgt is not None else 0.0,
    }
