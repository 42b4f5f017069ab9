"""Known problems of Gemma 2 files made elsewhere (../shared/spec/PITFALLS.md §a–§c), found by reading them.

Each check is a small function ``(Facts) -> Iterator[Finding]``; :func:`diagnose` runs them all. Levels:
``error`` — as stored, the model runs wrong or not at all; ``warning`` — wrong in some runtimes, or
probably not what was meant; ``info`` — worth knowing.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats.registry import Checkpoint
from gemma2_convert.formats.stored import PartRow
from reference.config import PRESETS

LEVELS = ("error", "warning", "info")
GEMMA_BOS, GEMMA_EOS, END_OF_TURN = 2, 1, 107
PUBLISHED_DEPTHS = (26, 42, 46)
GGUF_CONTROL = 3
OURS = "gemma2_convert."


@dataclass(frozen=True)
class Finding:
    level: str
    """``error``, ``warning`` or ``info``."""
    code: str
    """A short stable identifier, e.g. ``gguf-no-softcap``."""
    message: str


@dataclass
class Facts:
    """What ``inspect`` read, as the checks need it."""

    path: Path
    format: str
    checkpoint: Checkpoint | None
    """The canonical checkpoint; None when it could not be opened (``open_error`` says why)."""
    open_error: str | None = None
    variant: str = "custom"
    raw_config: dict[str, Any] | None = None
    """config.json as written (HF), the config in the metadata (safetensors, our GGUF)."""
    gguf_kv: dict[str, Any] | None = None
    gguf_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    stored: dict[str, LazyTensor] = field(default_factory=dict)
    """Tensors under their stored names, values as stored (GGUF norms hold 1 + w)."""
    special_tokens: dict[str, bool] | None = None
    """HF added tokens: content → ``special``."""
    scanned: dict[str, str] | None = None
    """``--scan``: tensor → problem ('' when fine); None when not scanned."""
    parts: list[PartRow] = field(default_factory=list)
    """The files of a split checkpoint (a split GGUF's parts), each with what is wrong with it."""


CHECKS: list[Callable[[Facts], Iterator[Finding]]] = []


def check(fn: Callable[[Facts], Iterator[Finding]]) -> Callable[[Facts], Iterator[Finding]]:
    CHECKS.append(fn)
    return fn


def diagnose(facts: Facts) -> list[Finding]:
    """Every finding, errors first."""
    found = [f for c in CHECKS for f in c(facts)]
    return sorted(found, key=lambda f: LEVELS.index(f.level))


@check
def unreadable(f: Facts) -> Iterator[Finding]:
    if f.open_error:
        yield Finding("error", "unreadable", f"this tool cannot read it as a Gemma 2 model: {f.open_error}")


# ---- GGUF metadata ---------------------------------------------------------------------------

@check
def gguf_softcap(f: Facts) -> Iterator[Finding]:
    kv = f.gguf_kv
    missing = [k for k in ("gemma2.attn_logit_softcapping", "gemma2.final_logit_softcapping")
               if kv is not None and k not in kv]
    if missing:
        yield Finding("warning", "gguf-no-softcap", f"no {' / '.join(missing)}: made by a converter older than "
                      "the softcap fix (llama.cpp PR #8197, June 2024). Current llama.cpp assumes 50 / 30; older "
                      "runtimes run without the caps. Files this old also predate the sliding-window and "
                      "tokenizer fixes (#8227, #8228): regenerate it from the original weights")


@check
def gguf_sliding_window(f: Facts) -> Iterator[Finding]:
    if f.gguf_kv is not None and "gemma2.attention.sliding_window" not in f.gguf_kv:
        yield Finding("warning", "gguf-no-sliding-window", "no gemma2.attention.sliding_window: runtimes fall "
                      "back to a default (llama.cpp: 4096) or attend globally on every layer, which changes the "
                      "output beyond the window (llama.cpp PR #8227)")


@check
def gguf_key_length(f: Facts) -> Iterator[Finding]:
    kv = f.gguf_kv
    if kv is None or "gemma2.attention.key_length" in kv:
        return
    hidden, heads = kv.get("gemma2.embedding_length"), kv.get("gemma2.attention.head_count")
    q = f.gguf_shapes.get("blk.0.attn_q.weight")
    if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0:
        return
    fallback, real = hidden // heads, (q[0] // heads if q else None)
    if real is not None and real != fallback:
        yield Finding("error", "gguf-no-key-length", f"no gemma2.attention.key_length: llama.cpp then takes "
                      f"head_dim = embedding_length / head_count = {fallback}, but attn_q holds {heads} heads of "
                      f"{real}: the file fails to load, or attends with the wrong shapes and scale")
    else:
        yield Finding("warning", "gguf-no-key-length", f"no gemma2.attention.key_length: llama.cpp takes "
                      f"head_dim = embedding_length / head_count = {fallback} (it matches these tensors)")


@check
def gguf_depth(f: Facts) -> Iterator[Finding]:
    kv = f.gguf_kv
    if kv is None or OURS + "query_scale_folded" in kv or OURS + "query_pre_attn_scalar" in kv:
        return
    layers, d = kv.get("gemma2.block_count"), kv.get("gemma2.attention.key_length")
    if d is None and isinstance(kv.get("gemma2.attention.head_count"), int) and kv["gemma2.attention.head_count"]:
        d = kv.get("gemma2.embedding_length", 0) // kv["gemma2.attention.head_count"]
    if isinstance(layers, int) and layers not in PUBLISHED_DEPTHS:
        yield Finding("warning", "gguf-depth-no-fold", f"{layers} layers is no published depth and the file does "
                      f"not record query_pre_attn_scalar: llama.cpp scales queries by 1/sqrt(head_dim = {d}) at "
                      "this depth; if the model's own scalar differs (a pruned 27B: 144, not 128) it runs silently "
                      "wrong. `gemma2-convert to-gguf` records the scalar and folds it into attn_q")


@check
def gguf_provenance(f: Facts) -> Iterator[Finding]:
    kv = f.gguf_kv
    if kv is None:
        return
    if not any(k.startswith(OURS) for k in kv):
        yield Finding("info", "no-provenance", "made elsewhere: no converter version or source is recorded; "
                      "`gemma2-convert verify SOURCE THIS.gguf` compares it with its source")
    elif any(str(kv.get(OURS + key, "")).startswith(pending) for key, pending in
             (("source_xxh3_128", "pending"), ("source_sha256", "sha256-pending"))):
        yield Finding("error", "incomplete-write", "the source fingerprint was never filled in: the write that "
                      "made this file did not finish")


@check
def gguf_split_parts(f: Facts) -> Iterator[Finding]:
    for p in f.parts:
        if p.problem:
            yield Finding("error", "gguf-split-part", f"{p.name}: {p.problem}")


# ---- config and tokenizer --------------------------------------------------------------------

def _ids(f: Facts) -> tuple[Any, Any] | None:
    if f.gguf_kv is not None:
        return f.gguf_kv.get("tokenizer.ggml.bos_token_id"), f.gguf_kv.get("tokenizer.ggml.eos_token_id")
    if f.raw_config is not None:
        return f.raw_config.get("bos_token_id"), f.raw_config.get("eos_token_id")
    return None


@check
def special_ids(f: Facts) -> Iterator[Finding]:
    ids = _ids(f)
    if ids is None:
        return
    bos, eos = ids
    eos_list = eos if isinstance(eos, list) else [eos]
    if (bos is not None and bos != GEMMA_BOS) or any(e is not None and e not in (GEMMA_EOS, END_OF_TURN)
                                                     for e in eos_list):
        yield Finding("warning", "special-ids", f"bos / eos token ids are {bos} / {eos}, not Gemma's "
                      f"{GEMMA_BOS} / {GEMMA_EOS} (chat models also stop at <end_of_turn> = {END_OF_TURN}): "
                      "generation starts or stops on the wrong token")


@check
def query_scalar(f: Facts) -> Iterator[Finding]:
    raw = f.raw_config or {}
    value = raw.get("query_pre_attn_scalar", f.checkpoint.config.query_pre_attn_scalar if f.checkpoint else None)
    if f.variant not in ("2b", "9b", "27b") or value is None:
        return
    want = PRESETS[f.variant].query_pre_attn_scalar
    if float(value) == float(want):
        return
    why = (" — the launch value that transformers' conversion script still writes; gemma_pytorch and transformers "
           "use 256 (transformers #31891)" if f.variant == "9b" and float(value) == 224 else "")
    yield Finding("warning", "query-pre-attn-scalar", f"a {f.variant.upper()} config with query_pre_attn_scalar "
                  f"{value:g}, not {want:g}{why}: attention is scaled wrongly")


GEMMA2_VALUES = {"attn_logit_softcapping": 50, "final_logit_softcapping": 30, "sliding_window": 4096}


@check
def config_caps(f: Facts) -> Iterator[Finding]:
    raw = f.raw_config or {}
    for key, value in GEMMA2_VALUES.items():
        if key in raw and raw[key] is None:
            yield Finding("warning", f"config-no-{key.replace('_', '-')}", f"the config sets {key} to null: the "
                          f"model runs without it (an early transformers workaround); Gemma 2 uses {value}")


@check
def end_of_turn(f: Facts) -> Iterator[Finding]:
    kv = f.gguf_kv
    if kv is not None:
        tokens, types = kv.get("tokenizer.ggml.tokens"), kv.get("tokenizer.ggml.token_type")
        if isinstance(tokens, list) and isinstance(types, list) and "<end_of_turn>" in tokens:
            i = tokens.index("<end_of_turn>")
            if i < len(types) and types[i] != GGUF_CONTROL:
                yield Finding("warning", "end-of-turn-not-control", f"<end_of_turn> (id {i}) has token type "
                              f"{types[i]}, not CONTROL ({GGUF_CONTROL}): runtimes that trust the type do not end "
                              "a chat turn on it (recent llama.cpp overrides it, with a warning)")
    elif f.special_tokens is not None and f.special_tokens.get("<end_of_turn>") is False:
        yield Finding("warning", "end-of-turn-not-special", "<end_of_turn> is an added token with special: false: "
                      "decoding prints it and generation may not stop at the end of a turn")


# ---- tensors ---------------------------------------------------------------------------------

@check
def untied_head(f: Facts) -> Iterator[Finding]:
    if f.gguf_kv is not None:
        if "output.weight" in f.gguf_shapes:
            yield Finding("error", "untied-output", "holds an output.weight tensor: Gemma 2 ties the output head to "
                          "token_embd, and llama.cpp's gemma2 architecture has no separate head to load it into")
        return
    head = next((n for n in ("lm_head.weight",) if n in f.stored), None)
    embed = next((n for n in ("model.embed_tokens.weight", "embed_tokens.weight") if n in f.stored), None)
    tied = f.checkpoint is None or f.checkpoint.config.tie_word_embeddings
    if head is None or embed is None or not tied:
        return
    a, b = f.stored[head].load(), f.stored[embed].load()
    if a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b):
        yield Finding("info", "stray-lm-head", "lm_head.weight is stored but equals the embedding; it is ignored "
                      "(Gemma 2 ties them)")
        return
    diff = f"max |Δ| {max_abs_diff(a, b):.3g}" if a.shape == b.shape else f"shape {list(a.shape)} vs {list(b.shape)}"
    yield Finding("error", "untied-lm-head", f"lm_head.weight differs from the embedding ({diff}): the model was "
                  "trained with an untied head, but Gemma 2 ties them and transformers, llama.cpp's converter and "
                  "this tool silently use the embedding; the model that runs is not the one that was trained")


def max_abs_diff(a: torch.Tensor, b: torch.Tensor, rows: int = 4096) -> float:
    """max |a − b| in float32, a block of rows at a time (no full-size float copy of a 256k-row matrix)."""
    return max((float((a[i:i + rows].float() - b[i:i + rows].float()).abs().max()) for i in range(0, len(a), rows)),
               default=0.0)


def _norm_means(tensors: dict[str, LazyTensor], suffix: str) -> list[float]:
    return [float(t.load().float().mean()) for n, t in tensors.items() if n.endswith(suffix) and t.numel]


@check
def norm_convention(f: Facts) -> Iterator[Finding]:
    if f.gguf_kv is not None:
        means = _norm_means(f.stored, "norm.weight")
        if means and abs(statistics.median(means)) < 0.25:
            yield Finding("error", "gguf-norms-near-zero", f"the norm weights are centred near 0 (median of means "
                          f"{statistics.median(means):.3g}): they look stored without the + 1 that GGUF needs "
                          "(llama.cpp multiplies by the stored weight, Gemma by 1 + w)")
        return
    if f.checkpoint is None:
        return
    means = _norm_means(f.checkpoint.tensors, "norm.weight")
    if means and all(abs(m - 1) < 0.25 for m in means):
        yield Finding("warning", "norms-near-one", f"every norm weight is centred near 1 (median of means "
                      f"{statistics.median(means):.3g}): they look stored as 1 + w (the GGUF convention); "
                      "Gemma computes (1 + w), so the + 1 would be applied twice")


@check
def scanned(f: Facts) -> Iterator[Finding]:
    for name, problem in (f.scanned or {}).items():
        if problem.startswith("nonfinite:"):
            yield Finding("error", "nonfinite", f"tensor {name!r}: {problem.removeprefix('nonfinite: ')}")
        elif problem:
            yield Finding("info", "beyond-float16", f"tensor {name!r}: {problem}")
