"""The adapter step: a base checkpoint plus PEFT adapters → the adapted checkpoint, merged or unmerged.

Merged (``merge=True``, what ``convert --adapter`` writes): every updated weight is a lazy tensor that loads
the base weight, merges each adapter in turn in float32 (``reference.lora``), and is cast once by the writer
to the output dtype — one tensor at a time, the model is never held. Unmerged (``merge=False``, the left side
of ``verify BASE+ADAPTER``): the base tensors with the replacements, and ``Checkpoint.adapters`` for the
reference to run the low-rank updates beside the frozen weights.

Tied head (Gemma 2 ties ``lm_head`` to ``embed_tokens``): PEFT gives the tied head its own update or
replacement while the embedding keeps its own (and the other way round), so when only one of them changes the
merged model has a separate ``lm_head.weight`` and ``tie_word_embeddings: false`` (``Adapted.untied`` says
why).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from gemma2_convert.core.dtypes import dominant_dtype
from gemma2_convert.core.errors import TensorMismatchError, name_list
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats.adapter import Adapter
from gemma2_convert.formats.registry import Checkpoint
from reference.lora import LowRank, merge_all
from reference.weights import expected_shapes

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclass
class Adapted:
    """The adapted checkpoint and what the step did, for the report."""

    checkpoint: Checkpoint
    merged: list[str]
    """Base weights that received updates."""
    replaced: list[str]
    """Weights replaced whole (``modules_to_save``, saved base layers)."""
    untied: str | None = None
    """Why the output head is now separate from the embedding (None: unchanged)."""


def _slots(base: Checkpoint) -> tuple[dict[str, LazyTensor], bool]:
    """The base tensors, with the tied head as its own slot holding the embedding (the same lazy tensor)."""
    tensors = dict(base.tensors)
    tied = base.config.head == "causal_lm" and base.config.tie_word_embeddings
    if tied:
        tensors[HEAD] = tensors[EMBED]
    return tensors, tied


def _apply(tensors: dict[str, LazyTensor], updates: dict[str, list[LowRank]], a: Adapter,
           tied: bool) -> list[str]:
    """Put adapter ``a``'s base layers, replacements and updates into the slots; return its problems."""
    problems = [f"{a.path.name}: {p}" for p in a.problems]
    for name, t in a.base_layers.items():
        tensors[name] = t
        if tied and name == EMBED and HEAD not in a.base_layers:  # the tied head shares the base layer
            tensors[HEAD] = t
    for name, t in a.replacements.items():
        if name not in tensors:
            problems.append(f"{a.path.name}: modules_to_save {name} is not a tensor of the base")
        tensors[name] = t
    for name, u in a.updates.items():
        if name not in tensors:
            problems.append(f"{a.path.name}: target {name} is not a weight of the base")
            continue
        problems += _shape_problems(a.path.name, name, tensors[name].shape, u)
        updates.setdefault(name, []).append(u)
    return problems


def _shape_problems(where: str, name: str, shape: tuple[int, ...], u: LowRank) -> list[str]:
    """A/B/magnitude shapes against the weight [out, in] (embedding [V, H]) they update."""
    if len(shape) != 2:
        return [f"{where}: {name} is not a matrix ({list(shape)})"]
    out, inp = (shape[1], shape[0]) if u.embedding else shape
    r = u.a.shape[0]
    want: dict[str, tuple[int, ...]] = {"A": (r, inp), "B": (out, r)}
    got = {"A": u.a.shape, "B": u.b.shape}
    if u.magnitude is not None:
        want["magnitude"], got["magnitude"] = (out,), u.magnitude.shape
    return [f"{where}: {name} {k} is {list(got[k])}, expected {list(v)} for a weight of {list(shape)}"
            for k, v in want.items() if tuple(got[k]) != v]


def _merged(t: LazyTensor, ups: tuple[LowRank, ...], dtype: torch.dtype | None) -> LazyTensor:
    """``t`` with ``ups`` merged in float32 when loaded (then cast to ``dtype`` when given)."""
    lazy = LazyTensor(t.shape, torch.float32, lambda: merge_all(t.load(), ups), None, t.prefetch)
    return lazy if dtype is None else lazy.to(dtype)


def adapt(base: Checkpoint, adapters: Sequence[Adapter], merge: bool = True,
          dtype: torch.dtype | None = None) -> Adapted:
    """``base`` with ``adapters`` applied in order; one TensorMismatchError lists every name that does not
    fit. Merged tensors are float32 for the writer to cast once, or cast to ``dtype`` when given (the
    quantizer's input: what a merged checkpoint written in that dtype would hold)."""
    tensors, tied = _slots(base)
    head_before = tensors.get(HEAD)
    updates: dict[str, list[LowRank]] = {}
    problems: list[str] = []
    for a in adapters:
        problems += _apply(tensors, updates, a, tied)
    untied = None
    if tied:
        head_changed = HEAD in updates or tensors[HEAD] is not head_before
        embed_changed = EMBED in updates or tensors[EMBED] is not head_before
        if head_changed or embed_changed:
            untied = _untie_reason(head_changed, embed_changed)
        else:
            del tensors[HEAD]
    cfg = base.config.replace(vocab_size=tensors[EMBED].shape[0],
                              tie_word_embeddings=base.config.tie_word_embeddings and untied is None)
    problems += [f"{n}: {list(tensors[n].shape)}, expected {list(s)} (vocabulary of {cfg.vocab_size} rows)"
                 for n, s in expected_shapes(cfg).items() if n in tensors and tuple(tensors[n].shape) != s]
    if problems:
        raise TensorMismatchError(f"the adapter does not fit the base ({len(problems)} problem(s)): "
                                  + name_list(problems, limit=40), base.path)
    frozen = {n: tuple(u) for n, u in updates.items()}
    if merge:
        tensors.update({n: _merged(tensors[n], u, dtype) for n, u in frozen.items()})
    dtype = base.default_dtype or dominant_dtype([t.dtype for t in base.tensors.values()])
    meta = {**base.metadata, "adapters": ", ".join(str(a.path) for a in adapters)}  # into the provenance
    ckpt = replace(base, config=cfg, tensors=tensors, metadata=meta, default_dtype=dtype,
                   adapters={} if merge else frozen)
    tok = next((a.tokenizer for a in reversed(adapters) if a.tokenizer is not None), None)
    if tok is not None:
        ckpt.tokenizer = tok
    replaced = sorted({n for a in adapters for n in (*a.replacements, *a.base_layers)})
    return Adapted(ckpt, sorted(frozen), replaced, untied)


def _untie_reason(head: bool, embed: bool) -> str:
    if head and embed:
        return "the adapter changes lm_head and embed_tokens differently"
    return "the adapter changes lm_head but not embed_tokens" if head else \
        "the adapter changes embed_tokens but not lm_head"
