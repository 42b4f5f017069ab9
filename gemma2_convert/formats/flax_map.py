"""Flax Gemma 2 parameters (google-deepmind/gemma) ↔ canonical HF tensors (spec §2.1, §2.4).

The released tree is semi-flat, ``{'transformer/layer_0/attn/q_einsum': {'w': …}, …}``, and Orbax
names each array by joining its key path with ``.``: ``transformer/layer_0/attn/q_einsum.w``. This
module holds the name table, the pure transforms (one per Flax kernel layout, each with its inverse for
the writer), and the Gemma2Config the shapes imply. It reads no files and imports neither jax nor tensorstore.

Letters: H hidden, N query heads, K kv heads, D head_dim, I intermediate, L layers, R embedding rows
(256128 in the released checkpoints: the 256000-piece vocabulary padded for TPU efficiency).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import torch

from gemma2_convert.core.errors import ConfigError, TensorMismatchError
from gemma2_convert.core.lazy import LazyTensor, Shape
from gemma2_convert.formats.gemma_pytorch import check_shapes
from gemma2_convert.formats.orig_config import (
    Dims,
    ShapeOptions,
    detect_variant,
    infer_config,
)
from reference.config import Gemma2Config
from reference.weights import expected_shapes

PREFIX = "transformer/"
EMBED = "transformer/embedder.input_embedding"
Q, KV, QKV = (f"transformer/layer_{{}}/attn/{k}_einsum.w" for k in ("q", "kv", "qkv"))
ATTN_VEC = "transformer/layer_{}/attn/attn_vec_einsum.w"
GATING = "transformer/layer_{}/mlp/gating_einsum.w"
LINEAR = "transformer/layer_{}/mlp/linear.w"
PADDED_ROWS, RELEASED_VOCAB = 256128, 256000  # spec §0, §7 item 7


@dataclass(frozen=True)
class FlaxDims:
    """What the stored shapes state (unlike gemma_pytorch's fused qkv, N, K and D come apart)."""

    rows: int
    """R: embedding rows, the vocabulary plus any padding."""
    hidden: int
    """H."""
    intermediate: int
    """I."""
    layers: int
    """L."""
    num_heads: int
    """N."""
    num_kv_heads: int
    """K."""
    head_dim: int
    """D."""
    gating_transposed: bool
    """gating_einsum stored [2, I, H] (released 9B/27B) rather than [2, H, I] (released 2B)."""
    fused_qkv: bool
    """qkv_einsum [3, N, H, D] (google-deepmind/gemma uses it when K == N) instead of q_einsum + kv_einsum."""


# ---- pure transforms (spec §2.4); each takes the stored kernel, or one slice of a stacked one ----------

def heads_to_rows(w: torch.Tensor, d: FlaxDims) -> torch.Tensor:
    """q_einsum [N, H, D], or one of kv_einsum [K, H, D] → q/k/v_proj [N·D, H] (head-major rows)."""
    n, h, hd = w.shape
    return w.transpose(1, 2).reshape(n * hd, h).contiguous()      # [N, D, H] → [N·D, H] (a view when N = 1)


def attn_vec_to_o_proj(w: torch.Tensor, d: FlaxDims) -> torch.Tensor:
    """attn_vec_einsum [N, D, H] → o_proj [H, N·D]."""
    n, hd, h = w.shape
    return w.reshape(n * hd, h).T.contiguous()                     # [N·D, H] → [H, N·D]


def gating_to_proj(w: torch.Tensor, d: FlaxDims) -> torch.Tensor:
    """One gating_einsum branch (0 = gate, 1 = up): [I, H] as-is when stored [2, I, H], else [H, I] → [I, H]."""
    return w if d.gating_transposed else w.T.contiguous()


def linear_to_down_proj(w: torch.Tensor, d: FlaxDims) -> torch.Tensor:
    """linear [I, H] → down_proj [H, I]."""
    return w.T.contiguous()


def same(w: torch.Tensor, d: FlaxDims) -> torch.Tensor:
    """Norm scales (both formats apply ``1 + w``) and the embedding (rows already cut to the vocabulary)."""
    return w


# ---- the inverses (HF → Flax, for the writer); each gives one stored kernel, or one slice of a stacked one ----

def rows_to_heads(w: torch.Tensor, d: FlaxDims) -> torch.Tensor:
    """q/k/v_proj [N·D, H] → q_einsum [N, H, D], or one of kv_einsum [K, H, D]."""
    rows, h = w.shape
    return w.reshape(rows // d.head_dim, d.head_dim, h).transpose(1, 2).contiguous()  # [N, D, H] → [N, H, D]


def o_proj_to_attn_vec(w: torch.Tensor, d: FlaxDims) -> torch.Tensor:
    """o_proj [H, N·D] → attn_vec_einsum [N, D, H]."""
    return w.T.reshape(d.num_heads, d.head_dim, d.hidden).contiguous()


def down_proj_to_linear(w: torch.Tensor, d: FlaxDims) -> torch.Tensor:
    """down_proj [H, I] → linear [I, H]."""
    return w.T.contiguous()


Transform = Callable[[torch.Tensor, FlaxDims], torch.Tensor]


class Rule(NamedTuple):
    targets: tuple[str, ...]
    """HF name(s), "{}" = layer index; several = the Flax array stacks them along axis 0."""
    transform: Transform
    shape: Callable[[FlaxDims], Shape]
    """The stored shape."""
    inverse: Transform
    """HF tensor → the stored kernel (or its slice): ``inverse(transform(w)) == w``."""


def _norm(hf: str) -> Rule:
    return Rule((hf,), same, lambda d: (d.hidden,), same)


_LAYER = "model.layers.{}."
_QKV_HF = tuple(f"{_LAYER}self_attn.{p}_proj.weight" for p in "qkv")

# Flax array name → rule, "{}" = layer index. Fully enumerated; QKV replaces Q and KV when K == N.
FLAX_TO_HF: dict[str, Rule] = {
    EMBED: Rule(("model.embed_tokens.weight",), same, lambda d: (d.rows, d.hidden), same),
    "transformer/final_norm.scale": _norm("model.norm.weight"),
    "transformer/layer_{}/pre_attention_norm.scale": _norm(_LAYER + "input_layernorm.weight"),
    "transformer/layer_{}/post_attention_norm.scale": _norm(_LAYER + "post_attention_layernorm.weight"),
    "transformer/layer_{}/pre_ffw_norm.scale": _norm(_LAYER + "pre_feedforward_layernorm.weight"),
    "transformer/layer_{}/post_ffw_norm.scale": _norm(_LAYER + "post_feedforward_layernorm.weight"),
    Q: Rule(_QKV_HF[:1], heads_to_rows, lambda d: (d.num_heads, d.hidden, d.head_dim), rows_to_heads),
    KV: Rule(_QKV_HF[1:], heads_to_rows, lambda d: (2, d.num_kv_heads, d.hidden, d.head_dim), rows_to_heads),
    QKV: Rule(_QKV_HF, heads_to_rows, lambda d: (3, d.num_heads, d.hidden, d.head_dim), rows_to_heads),
    ATTN_VEC: Rule((_LAYER + "self_attn.o_proj.weight",), attn_vec_to_o_proj,
                   lambda d: (d.num_heads, d.head_dim, d.hidden), o_proj_to_attn_vec),
    GATING: Rule((_LAYER + "mlp.gate_proj.weight", _LAYER + "mlp.up_proj.weight"), gating_to_proj,
                 lambda d: (2, d.intermediate, d.hidden) if d.gating_transposed else (2, d.hidden, d.intermediate),
                 gating_to_proj),  # a transpose (or nothing) is its own inverse
    LINEAR: Rule((_LAYER + "mlp.down_proj.weight",), linear_to_down_proj, lambda d: (d.intermediate, d.hidden),
                 down_proj_to_linear),
}


# ---- names -----------------------------------------------------------------------------------

def array_name(keys: Sequence[str]) -> str:
    """The canonical (released, Orbax-named) array name of a tree key path.

    ``('transformer/layer_0/attn/q_einsum', 'w')`` → ``transformer/layer_0/attn/q_einsum.w``. The nested
    tree that google-deepmind/gemma's ``gm`` library saves (no ``transformer`` root, no ``w`` under the
    MLP kernels, e.g. ``('layer_0', 'mlp', 'linear')``) maps to the same names.
    """
    path = "/".join(keys)
    if not path.startswith(PREFIX):
        path = PREFIX + path
    if path.endswith(("/mlp/linear", "/mlp/gating_einsum")):
        path += "/w"
    module, _, leaf = path.rpartition("/")
    return f"{module}.{leaf}"


def key_path(name: str) -> tuple[str, str]:
    """The released tree's key path of an array name (the inverse of ``array_name`` for that tree):
    ``transformer/layer_0/attn/q_einsum.w`` → ``('transformer/layer_0/attn/q_einsum', 'w')``."""
    module, _, leaf = name.rpartition(".")
    return module, leaf


def num_layers(names: Iterator[str] | Sequence[str]) -> int:
    idx = [int(m.group(1)) for n in names if (m := re.match(r"transformer/layer_(\d+)/", n))]
    return max(idx) + 1 if idx else 0


def expand(layers: int, fused_qkv: bool) -> Iterator[tuple[str, str, Rule]]:
    """(template, Flax name, rule) for every array of an ``layers``-layer model."""
    skip = (Q, KV) if fused_qkv else (QKV,)
    for tpl, rule in FLAX_TO_HF.items():
        if tpl in skip:
            continue
        for i in range(layers) if "{}" in tpl else [None]:
            yield tpl, tpl.format(i), rule._replace(targets=tuple(t.format(i) for t in rule.targets))


def flax_names(layers: int, fused_qkv: bool) -> list[str]:
    return [name for _, name, _ in expand(layers, fused_qkv)]


def flax_shapes(d: FlaxDims) -> dict[str, Shape]:
    return {name: rule.shape(d) for _, name, rule in expand(d.layers, d.fused_qkv)}


# ---- dimensions and config -------------------------------------------------------------------

def _common(shapes: Mapping[str, Shape], tpl: str, layers: int, ndim: int, where: Path) -> Shape:
    """The shape most layers give this array (a single odd layer is then reported by name)."""
    shape, _ = Counter(tuple(shapes[tpl.format(i)]) for i in range(layers)).most_common(1)[0]
    if len(shape) != ndim:
        raise TensorMismatchError(f"{tpl.format(0)}: expected {ndim} dimensions, got shape {list(shape)}", where)
    return shape


def gating_transposed(shape: Shape, hidden: int, inter: int, where: Path) -> bool:
    """True for [2, I, H] (released 9B/27B), False for [2, H, I] (released 2B): decided by shape alone."""
    if hidden == inter:
        raise ConfigError(f"{GATING.format(0)} is [2, {hidden}, {hidden}]: with intermediate size equal to the "
                          "hidden size its orientation cannot be told from the shapes", where)
    if tuple(shape) in ((2, inter, hidden), (2, hidden, inter)):
        return tuple(shape) == (2, inter, hidden)
    raise TensorMismatchError(f"{GATING.format(0)}: expected [2, {inter}, {hidden}] or [2, {hidden}, {inter}] "
                              f"(I from linear.w, H from the embedding), got {list(shape)}", where)


def infer_dims(shapes: Mapping[str, Shape], layers: int, where: Path) -> FlaxDims:
    """R, H from the embedding; N, D from q_einsum (or qkv_einsum); K from kv_einsum; I from linear."""
    if layers == 0:
        raise TensorMismatchError("no transformer/layer_<i> arrays: not a Gemma 2 parameter tree", where)
    if len(shapes[EMBED]) != 2:
        raise TensorMismatchError(f"{EMBED}: expected [rows, hidden], got {list(shapes[EMBED])}", where)
    rows, hidden = shapes[EMBED]
    fused = QKV.format(0) in shapes
    if fused:
        _, n, _, hd = _common(shapes, QKV, layers, 4, where)       # [3, N, H, D]
        k = n
    else:
        n, _, hd = _common(shapes, Q, layers, 3, where)            # [N, H, D]
        k = _common(shapes, KV, layers, 4, where)[1]               # [2, K, H, D]
    inter = _common(shapes, LINEAR, layers, 2, where)[0]           # [I, H]
    gating = _common(shapes, GATING, layers, 3, where)
    d = FlaxDims(rows, hidden, inter, layers, n, k, hd, gating_transposed(gating, hidden, inter, where), fused)
    check_shapes(flax_shapes(d), shapes, where, " (expected: what the embedding and most layers state)")
    return d


def dims_of(cfg: Gemma2Config, rows: int | None = None, transposed: bool = False) -> FlaxDims:
    """The Flax layout of a config: R = ``rows`` (default: the vocabulary), gating [2, I, H] if ``transposed``,
    qkv_einsum when K == N (as google-deepmind/gemma)."""
    return FlaxDims(cfg.vocab_size if rows is None else rows, cfg.hidden_size, cfg.intermediate_size,
                    cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, transposed,
                    cfg.num_attention_heads == cfg.num_key_value_heads)


def resolve_vocab(rows: int, config_vocab: int | None, tokenizer_pieces: int | None,
                  tokenizer: Path | None, where: Path) -> tuple[int, str]:
    """The vocabulary to keep of the R embedding rows, and where it came from.

    A config wins, then the tokenizer's piece count; without either, the released padding (256128 rows
    → 256000) is undone, and any other row count is taken as the vocabulary."""
    if config_vocab is not None:
        vocab, source = config_vocab, "config"
    elif tokenizer_pieces is not None:
        vocab, source = tokenizer_pieces, f"tokenizer ({tokenizer})"
    elif rows == PADDED_ROWS:
        vocab, source = RELEASED_VOCAB, f"released padding ({PADDED_ROWS} rows hold {RELEASED_VOCAB} tokens)"
    else:
        return rows, "embedding rows"
    if vocab > rows:
        raise ConfigError(f"the {source} has a vocabulary of {vocab}, but {EMBED} has only {rows} rows; is it "
                          "this model's?", tokenizer if source.startswith("tokenizer") else where)
    return vocab, source


def _orig_shapes(dims: Dims) -> dict[str, Shape]:
    """The gemma_pytorch shapes of the same model, which orig_config infers a config from (spec §1.2)."""
    h = dims.hidden_size
    return {"embedder.weight": (dims.vocab_size, h),
            "model.layers.0.self_attn.qkv_proj.weight": (dims.q_dim + 2 * dims.kv_dim, h),
            "model.layers.0.self_attn.o_proj.weight": (h, dims.q_dim),
            "model.layers.0.mlp.gate_proj.weight": (dims.intermediate_size, h)}


def infer_flax_config(d: FlaxDims, vocab: int, opts: ShapeOptions, where: Path) -> tuple[Gemma2Config, str]:
    """The config for these shapes (orig_config's rules) and where it came from.

    Published sizes get their published values (query_pre_attn_scalar 256 / 256 / 144); any other
    shape needs ``config`` or ``query_pre_attn_scalar`` — N, K and D come from the einsum shapes."""
    dims = Dims(vocab, d.hidden, d.intermediate, d.layers, d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim)
    heads_given = any(x is not None for x in (opts.num_heads, opts.num_kv_heads, opts.head_dim))
    filled = not heads_given and opts.config is None and opts.variant == "auto" and detect_variant(dims) is None
    if filled:
        opts = dataclasses.replace(opts, num_heads=d.num_heads, num_kv_heads=d.num_kv_heads, head_dim=d.head_dim)
    cfg, how = infer_config(_orig_shapes(dims), d.layers, opts, where)
    if filled:
        how = f"shapes + --query-pre-attn-scalar {opts.query_pre_attn_scalar:g}"
    check_config(cfg, d, vocab, how, where)
    return cfg, how


def check_config(cfg: Gemma2Config, d: FlaxDims, vocab: int, how: str, where: Path) -> None:
    """One ConfigError listing every hyper-parameter the config and the stored shapes disagree on."""
    pairs = [("vocab_size", cfg.vocab_size, vocab), ("hidden_size", cfg.hidden_size, d.hidden),
             ("intermediate_size", cfg.intermediate_size, d.intermediate),
             ("num_hidden_layers", cfg.num_hidden_layers, d.layers),
             ("num_attention_heads", cfg.num_attention_heads, d.num_heads),
             ("num_key_value_heads", cfg.num_key_value_heads, d.num_kv_heads), ("head_dim", cfg.head_dim, d.head_dim)]
    bad = [f"{k} {a} (the arrays have {b})" for k, a, b in pairs if a != b]
    if bad:
        raise ConfigError(f"config ({how}) contradicts the stored shapes: {', '.join(bad)}", where)


# ---- the mapping -----------------------------------------------------------------------------

class FlaxArray(Protocol):
    """A stored array read lazily; ``index`` picks along axis 0 (an int drops that axis)."""

    shape: Shape

    def lazy(self, index: int | slice | None = None) -> LazyTensor: ...


def to_hf(arrays: Mapping[str, FlaxArray], d: FlaxDims, cfg: Gemma2Config) -> dict[str, LazyTensor]:
    """Flax arrays → HF-named lazy tensors; stacked arrays are read one slice at a time."""
    hf_shapes = expected_shapes(cfg)
    out: dict[str, LazyTensor] = {}
    for tpl, name, rule in expand(d.layers, d.fused_qkv):
        for j, target in enumerate(rule.targets):
            if tpl == EMBED:
                part = arrays[name].lazy(slice(0, cfg.vocab_size))   # [V, H] of [R, H]
            else:
                part = arrays[name].lazy(j if len(rule.targets) > 1 else None)
            out[target] = part.map(lambda t, f=rule.transform: f(t, d), shape=hf_shapes[target])
    return out


Part = tuple[int | None, LazyTensor]
"""(index along axis 0 of a stacked array, or None for the whole array; lazy stored kernel or slice)."""


def from_hf(tensors: Mapping[str, LazyTensor], d: FlaxDims) -> Iterator[tuple[str, Shape, list[Part]]]:
    """HF-named lazy tensors → (Flax name, stored shape, parts), the inverse of ``to_hf``. The embedding's
    part holds the V vocabulary rows only: rows [V, R) are padding, left to the writer."""
    for tpl, name, rule in expand(d.layers, d.fused_qkv):
        shape = rule.shape(d)
        stacked = len(rule.targets) > 1
        parts: list[Part] = []
        for j, target in enumerate(rule.targets):
            t = tensors[target]
            part = (t.shape[0], d.hidden) if tpl == EMBED else shape[1:] if stacked else shape
            parts.append((j if stacked else None, t.map(lambda w, f=rule.inverse: f(w, d), shape=part)))
        yield name, shape, parts
