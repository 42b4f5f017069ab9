"""Verification in lockstep: both models layer by layer, each layer read once.

For each decoder layer ``i`` the tensors of A and of B are loaded once, compared (``tensor_diff``: equal
after the cast, else SQNR and max |Δ|), handed to both reference models (``WeightStore.hold``) and layer
``i`` of both forwards runs on every prompt from that same load; then the layer is dropped. The embedding,
the final norm and the head are compared last, when the head needs them. Prompts whose activations would
not fit ``ACTIVATION_BUDGET`` together run in several groups (each group reads the layers again). While a layer
computes, the next one's bytes are requested from the disk (``LazyTensor.prefetch``).

With ``share``, B takes A's output of a layer whose tensors are bit-identical to A's when its inputs are too
(the same computation: a lossless conversion costs one forward). The head runs a few positions at a time
(``LOGIT_BUDGET``), each piece's rows handed to a sink (``LogitSums`` reduces them) as soon as they exist.

Memory: what stays between layers is the prompts' hidden states; within a layer, the loaded tensors that
are held (at most ``HOLD_BUDGET`` bytes; zero-copy views of mapped files cost no anonymous memory), one
weight cast to the compute dtype at a time when streaming, and the activations of one group. A tensor too
large to hold that its reader decodes by rows (``LazyTensor.rows``: a quantized GGUF embedding) is compared block by
block and streamed by the forwards, never decoded whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from gemma2_convert.core.lazy import dtype_nbytes
from gemma2_convert.pipeline.compare import TensorDiff, streamed_diff, tensor_diff
from quant.metrics import kl_sum, nll_sum
from reference.config import Gemma2Config
from reference.model import Gemma2ForCausalLM, Gemma2Model, Rows, Stream
from reference.weights import CastPool

ACTIVATION_BUDGET = 512 << 20
"""Bytes of activations (hidden states, MLP intermediates, logits) of one model's prompts run together."""
LOGIT_BUDGET = 256 << 20
"""Bytes of float32 logits (both models) computed at once: a long prompt's head runs a piece at a time."""
HOLD_BUDGET = 768 << 20
"""Bytes of loaded tensors (both models) kept from the comparison for the forward passes of one layer."""
CAST_BUDGET = 768 << 20
"""Bytes of buffers (both models) that the layers' weights are cast into, reused layer after layer
(``reference.weights.CastPool``): a 9B layer's float32 casts fit (756 MiB); a 27B layer's q/k/v/o do, its MLP
weights (648 MiB each) are cast into fresh memory one at a time, so the peak stays well under 2 GB."""


@dataclass
class LockstepResult:
    tensors_equal: int = 0
    diffs: list[TensorDiff] = field(default_factory=list)
    rows: list[tuple[Rows, Rows]] = field(default_factory=list)
    """Per prompt: (outputs, targets) of A and of B, in the order of the prompts."""
    shared: int = 0
    """Steps (decoder layers, and the head last) where B reused A's output (``Lockstep`` with ``share``)."""


def activation_bytes(cfg: Gemma2Config, tokens: int, dtype: torch.dtype) -> int:
    """Activations of one model for ``tokens`` positions: hidden states and the MLP's three intermediates
    (the logits are computed a few positions at a time, within ``LOGIT_BUDGET``)."""
    per = (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * dtype_nbytes(dtype)
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


def head_positions(model: Gemma2Model) -> int:
    """Positions whose float32 logits (both models) fit ``LOGIT_BUDGET``."""
    return max(2, LOGIT_BUDGET // (2 * 4 * model.config.vocab_size))


def pieces(model: Gemma2Model, length: int, span: int) -> list[tuple[int, int]]:
    """Position ranges of one prompt for the head: a causal LM's in pieces of ``span`` that overlap by one (a
    piece's last position only gives the target of the one before, as the whole prompt's last does); any other
    head needs the whole prompt."""
    if not isinstance(model, Gemma2ForCausalLM) or length <= span:
        return [(0, length)]
    return [(lo, min(lo + span, length)) for lo in range(0, length - 1, span - 1)]


def joined(parts: list[tuple[Rows, Rows]]) -> tuple[Rows, Rows]:
    """The pieces of one prompt's rows as one."""
    def cat(side: int) -> Rows:
        tgt = [p[side][1] for p in parts]
        out = torch.cat([p[side][0] for p in parts])
        return out, None if tgt[0] is None else torch.cat(tgt)  # type: ignore[arg-type]
    return cat(0), cat(1)


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
                 on_step: Callable[[int, int], None] | None = None, share: bool = False) -> None:
        """``share``: the caller vouches that A and B compute the same function of their weights (same class,
        equal forward configs, no unmerged adapters); then B reuses A's output of each layer (and of the head)
        whose tensors are bit-identical to A's (compared, same dtype) and whose inputs are too: the same
        deterministic computation on the same numbers, so its result is A's, without recomputing it."""
        self.a, self.b, self.compare, self.on_step, self.share = a, b, compare, on_step, share
        pool = CastPool(CAST_BUDGET)
        for store in (a.weights, b.weights):
            store.pool = pool
        self.result = LockstepResult()
        self.identical: dict[int, bool] = {}
        """Layer index (``num_hidden_layers``: embedding, final norm, head) → every tensor bit-identical."""

    def run(self, prompts: list[torch.Tensor],
            sink: Callable[[int, tuple[Rows, Rows]], None] | None = None) -> LockstepResult:
        """Both models over ``prompts``; each prompt's (outputs, targets) of A and B go to ``sink(k, rows)``
        piece by piece as soon as they exist (None: kept in ``result.rows``, in the order of the prompts)."""
        cfg = self.a.config
        groups = prompt_groups(prompts, cfg, self.a.dtype)
        steps, total = 0, len(groups) * (cfg.num_hidden_layers + 1)
        rows: dict[int, list[tuple[Rows, Rows]]] = {}
        by_layer = layer_names(cfg, list(dict.fromkeys([*self.a.weights.tensors, *self.b.weights.tensors])))
        for g, group in enumerate(groups):
            ids = [prompts[k] for k in group]
            sa, sb = [self.a.start(x) for x in ids], [self.b.start(x) for x in ids]
            for i in range(cfg.num_hidden_layers + 1):
                same = self._load(by_layer[i], compare=self.compare and g == 0)
                self.identical.setdefault(i, same)
                shared = self._shares(i, sa, sb)
                self.result.shared += shared and g == 0
                if i < cfg.num_hidden_layers:
                    self._prefetch(by_layer[i + 1])  # the disk reads the next layer while this one computes
                    self.a.run_layer(i, sa)
                    if shared:
                        for x, y in zip(sa, sb):
                            y.h = x.h
                    else:
                        self.b.run_layer(i, sb)
                else:
                    keep = sink or (lambda k, out: rows.setdefault(k, []).append(out))
                    self._finish(group, ids, sa, sb, keep, shared)
                self.a.weights.release()
                self.b.weights.release()
                steps += 1
                if self.on_step is not None:
                    self.on_step(steps, total)
        self.result.rows = [joined(rows[k]) for k in range(len(prompts))] if sink is None else []
        return self.result

    def _shares(self, i: int, sa: list[Stream], sb: list[Stream]) -> bool:
        """Whether B may take A's output of layer ``i`` (see ``__init__``); when not, B gets its own copy of a
        hidden state it still shares with A (A's layer may update its own in place)."""
        same_inputs = all(x.h is y.h or torch.equal(x.h, y.h) for x, y in zip(sa, sb))
        if self.share and self.identical.get(i) and same_inputs:
            return True
        for x, y in zip(sa, sb):
            if x.h is y.h:
                y.h = x.h.clone()
        return False

    def _finish(self, group: list[int], ids: list[torch.Tensor], sa: list[Stream], sb: list[Stream],
                emit: Callable[[int, tuple[Rows, Rows]], None], shared: bool = False) -> None:
        """Final norm and head of both models over the group's prompts, at most ``head_positions`` positions
        per call (the head's rows are fetched once per call), each piece's rows emitted as it is done."""
        calls: list[list[tuple[int, Stream, Stream, torch.Tensor]]] = [[]]
        used, span = 0, head_positions(self.a)
        for k, x, a, b in zip(group, ids, sa, sb):
            for lo, hi in pieces(self.a, x.shape[1], span):
                if calls[-1] and used + hi - lo > span:
                    calls.append([])
                    used = 0
                calls[-1].append((k, replace(a, h=a.h[:, lo:hi]), replace(b, h=b.h[:, lo:hi]), x[:, lo:hi]))
                used += hi - lo
        for call in calls:
            xs = [c[3] for c in call]
            ra = self.a.finish_streams([c[1] for c in call], xs)
            rb = ra if shared else self.b.finish_streams([c[2] for c in call], xs)
            for c, out in zip(call, zip(ra, rb)):
                emit(c[0], out)

    def _prefetch(self, names: list[str]) -> None:
        for name in names:
            for store in (self.a.weights, self.b.weights):
                lt = store.tensors.get(name)
                if lt is not None and lt.prefetch is not None:
                    lt.prefetch()

    def _load(self, names: list[str], compare: bool) -> bool:
        """Load each tensor of A and B once, compare them, and hold what fits for the forward passes; whether
        every tensor compared bit-identical (equal, same dtype)."""
        stores = self.a.weights, self.b.weights
        held: tuple[dict, dict] = ({}, {})
        room, same = HOLD_BUDGET, compare
        for name in names:
            lazies = [st.tensors.get(name) for st in stores]  # None: a tensor only the other model has
            size = sum(lt.nbytes for lt in lazies if lt is not None)
            by_rows = None not in lazies and any(lt.rows is not None for lt in lazies)  # type: ignore
            if room < size and (by_rows or not compare):  # not held: the forwards stream it themselves
                if compare:  # compared block by block: a quantized 256k-row embedding is never decoded whole
                    d = self._record(streamed_diff(name, *lazies))  # type: ignore[arg-type]
                    same = same and d.equal and lazies[0].dtype == lazies[1].dtype  # type: ignore[union-attr]
                continue
            ta, tb = (lt.load() if lt is not None else None for lt in lazies)
            if compare:  # verify checked that both have every name
                d = self._record(tensor_diff(name, ta, tb))
                same = same and d.equal and ta is not None and tb is not None and ta.dtype == tb.dtype
            need = sum(t.numel() * t.element_size() for t in (ta, tb) if t is not None)
            if need <= room:
                room -= need
                for h, t in zip(held, (ta, tb)):
                    if t is not None:
                        h[name] = t
        for st, h in zip(stores, held):
            st.hold(h)
        return same

    def _record(self, d: TensorDiff) -> TensorDiff:
        self.result.diffs.append(d)
        self.result.tensors_equal += d.equal
        return d


@dataclass
class LogitSums:
    """``logit_figures`` reduced prompt by prompt (``add``), so no prompt's [T, 256k] logits outlive it."""

    tokens: int = 0
    max_abs: float = 0.0
    kl: float = 0.0
    agree: int = 0
    nll_a: float = 0.0
    nll_b: float = 0.0
    targets: int = 0

    def add(self, row: tuple[Rows, Rows]) -> None:
        (pa, tgt), (pb, _) = row  # [P, C] each, targets [P] or None
        if pa.shape != pb.shape:
            raise ValueError(f"logit shapes differ: {list(pa.shape)} vs {list(pb.shape)}")
        self.tokens += pa.shape[0]
        same = pa is pb  # B reused A's head output: every difference is exactly 0, B's figures are A's
        if pa.shape[0] and not same:
            self.max_abs = max(self.max_abs, (pa - pb).abs().max().item())
        if same:  # KL(P‖P) = 0, unless the logits are not finite (which KL would have reported as NaN)
            self.kl += 0.0 if bool(torch.isfinite(pa).all()) else math.nan
        else:
            self.kl += kl_sum(pa, pb)
        self.agree += pa.shape[0] if same else int((pa.argmax(-1) == pb.argmax(-1)).sum())
        if tgt is not None and tgt.numel():
            nll = nll_sum(pa, tgt)
            self.nll_a, self.nll_b = self.nll_a + nll, self.nll_b + (nll if same else nll_sum(pb, tgt))
            self.targets += tgt.numel()

    def figures(self) -> dict[str, float]:
        """max |Δ|, mean KL(a‖b), top-1 agreement and perplexities (0 without targets)."""
        n, t = self.tokens, self.targets
        return {
            "tokens": n, "max_abs_logits": self.max_abs, "mean_kl": self.kl / n if n else math.nan,
            "top1": self.agree / n if n else math.nan,
            "ppl_a": math.exp(self.nll_a / t) if t else 0.0, "ppl_b": math.exp(self.nll_b / t) if t else 0.0,
        }


def logit_figures(rows: list[tuple[Rows, Rows]]) -> dict[str, float]:
    """max |Δ|, mean KL(a‖b), top-1 agreement and perplexities over the rows of A and B
    (next-token logits; class logits of a classifier; hidden states of a bare decoder)."""
    sums = LogitSums()
    for row in rows:
        sums.add(row)
    return sums.figures()
