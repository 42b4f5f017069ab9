"""KerasHub Gemma 2 (``GemmaBackbone``) ↔ canonical HF tensors (spec §3), as one table, and the
Gemma2Config its ``config.json`` states. Reads no files; imports neither h5py nor keras.

Keras 3 saves each variable under the path of the object that owns it, the layers named after their
class and numbered in creation order (``layers/gemma_decoder_block``, ``…_block_1``, ``…_block_2``, …),
its variables numbered in creation order too (``vars/0`` is an EinsumDense's kernel, a norm's scale).
Seen with KerasHub 0.32.0 / keras 3.15.1 (``save_to_preset``); Keras loads by these paths, so they are
the truth for mapping a block to its index.

Letters: V vocabulary, H hidden, N query heads, K kv heads, D head_dim, I per-branch FFN width (HF's
``intermediate_size``; KerasHub's ``intermediate_dim`` is 2·I).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from gemma2_convert.core.errors import ConfigError, TensorMismatchError
from gemma2_convert.core.lazy import Shape
from reference.config import Gemma2Config

EMBED = "layers/reversible_embedding/vars/0"
FINAL_NORM = "layers/rms_normalization/vars/0"
BLOCK = "layers/gemma_decoder_block{}/"
"""A decoder block's group: "{}" is "" for block 0, then "_1", "_2", … (Keras' per-class numbering)."""
QUERY, KEY = BLOCK + "attention/query_dense/vars/0", BLOCK + "attention/key_dense/vars/0"
LINEAR = BLOCK + "ffw_linear/vars/0"
ROPE_THETA = 10000.0  # KerasHub's CachedGemmaAttention: RotaryEmbedding(max_wavelength=10_000.0)


def block_suffix(i: int) -> str:
    return "" if i == 0 else f"_{i}"


# ---- pure transforms (spec §3, §6); each takes the stored kernel ----------------------------------------

def same(w: torch.Tensor, cfg: Gemma2Config) -> torch.Tensor:
    """Norm scales (both apply ``1 + w`` in float32) and the embedding [V, H]."""
    return w


def heads_to_rows(w: torch.Tensor, cfg: Gemma2Config) -> torch.Tensor:
    """query [N, H, D], key/value [K, H, D] (EinsumDense ``btd,ndh->btnh``) → q/k/v_proj [N·D, H]."""
    n, h, d = w.shape
    return w.transpose(1, 2).reshape(n * d, h).contiguous()          # [N, D, H] → [N·D, H]


def rows_to_heads(w: torch.Tensor, cfg: Gemma2Config) -> torch.Tensor:
    """q/k/v_proj [N·D, H] → query [N, H, D] (or key/value [K, H, D])."""
    rows, h = w.shape
    return w.reshape(rows // cfg.head_dim, cfg.head_dim, h).transpose(1, 2).contiguous()


def output_to_o_proj(w: torch.Tensor, cfg: Gemma2Config) -> torch.Tensor:
    """attention_output [N, D, H] (``btnh,nhd->btd``) → o_proj [H, N·D]."""
    n, d, h = w.shape
    return w.reshape(n * d, h).T.contiguous()


def o_proj_to_output(w: torch.Tensor, cfg: Gemma2Config) -> torch.Tensor:
    """o_proj [H, N·D] → attention_output [N, D, H]."""
    return w.T.reshape(cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size).contiguous()


def transpose(w: torch.Tensor, cfg: Gemma2Config) -> torch.Tensor:
    """ffw_gating / ffw_gating_2 [H, I] ↔ gate/up_proj [I, H]; ffw_linear [I, H] ↔ down_proj [H, I]."""
    return w.T.contiguous()


Transform = Callable[[torch.Tensor, Gemma2Config], torch.Tensor]


class Rule(NamedTuple):
    target: str
    """HF name, "{}" = layer index."""
    transform: Transform
    shape: Callable[[Gemma2Config], Shape]
    """The stored shape."""
    inverse: Transform
    """HF tensor → the stored kernel: ``inverse(transform(w)) == w``."""


def _norm(hf: str) -> Rule:
    return Rule(hf, same, lambda c: (c.hidden_size,), same)


def _heads(hf: str, kv: bool) -> Rule:
    return Rule(hf, heads_to_rows, lambda c: (c.num_key_value_heads if kv else c.num_attention_heads,
                                              c.hidden_size, c.head_dim), rows_to_heads)


_L = "model.layers.{}."

# Keras variable path → rule. Fully enumerated: Gemma 2 has every row (post-norms included).
KERAS_TO_HF: dict[str, Rule] = {
    EMBED: Rule("model.embed_tokens.weight", same, lambda c: (c.vocab_size, c.hidden_size), same),
    FINAL_NORM: _norm("model.norm.weight"),
    BLOCK + "pre_attention_norm/vars/0": _norm(_L + "input_layernorm.weight"),
    BLOCK + "post_attention_norm/vars/0": _norm(_L + "post_attention_layernorm.weight"),
    BLOCK + "pre_ffw_norm/vars/0": _norm(_L + "pre_feedforward_layernorm.weight"),
    BLOCK + "post_ffw_norm/vars/0": _norm(_L + "post_feedforward_layernorm.weight"),
    QUERY: _heads(_L + "self_attn.q_proj.weight", kv=False),
    KEY: _heads(_L + "self_attn.k_proj.weight", kv=True),
    BLOCK + "attention/value_dense/vars/0": _heads(_L + "self_attn.v_proj.weight", kv=True),
    BLOCK + "attention/output_dense/vars/0": Rule(_L + "self_attn.o_proj.weight", output_to_o_proj,
                                                  lambda c: (c.num_attention_heads, c.head_dim, c.hidden_size),
                                                  o_proj_to_output),
    BLOCK + "gating_ffw/vars/0": Rule(_L + "mlp.gate_proj.weight", transpose,
                                      lambda c: (c.hidden_size, c.intermediate_size), transpose),
    BLOCK + "gating_ffw_2/vars/0": Rule(_L + "mlp.up_proj.weight", transpose,
                                        lambda c: (c.hidden_size, c.intermediate_size), transpose),
    LINEAR: Rule(_L + "mlp.down_proj.weight", transpose, lambda c: (c.intermediate_size, c.hidden_size), transpose),
}


def expand(layers: int) -> Iterator[tuple[str, str, Rule]]:
    """(Keras variable path, HF name, rule) for every variable of a ``layers``-block model."""
    for tpl, rule in KERAS_TO_HF.items():
        for i in range(layers) if "{}" in tpl else [0]:
            yield tpl.format(block_suffix(i)), rule.target.format(i), rule


def keras_shapes(cfg: Gemma2Config) -> dict[str, Shape]:
    return {name: rule.shape(cfg) for name, _, rule in expand(cfg.num_hidden_layers)}


def num_blocks(names: Iterator[str] | list[str]) -> int:
    """Decoder blocks among variable paths: the highest block index + 1."""
    idx = [int(m.group(1) or 0) for n in names if (m := re.match(r"layers/gemma_decoder_block(?:_(\d+))?/", n))]
    return max(idx) + 1 if idx else 0


def kernel_groups(layers: int) -> dict[str, str]:
    """The ``…/vars`` group of every mapped variable → that variable's path."""
    return {name.rpartition("/")[0]: name for name, _, _ in expand(layers)}


# ---- config.json ------------------------------------------------------------------------------

BACKBONE = "GemmaBackbone"
REQUIRED = ("vocabulary_size", "num_layers", "num_query_heads", "num_key_value_heads", "hidden_dim",
            "intermediate_dim", "head_dim")
# GemmaBackbone's constructor defaults (KerasHub 0.32 gemma_backbone.py): what KerasHub builds when a key is absent.
DEFAULTS: dict[str, Any] = {"query_head_dim_normalize": True, "use_post_ffw_norm": False,
                            "use_post_attention_norm": False, "attention_logit_soft_cap": None,
                            "final_logit_soft_cap": None, "use_sliding_window_attention": False,
                            "sliding_window_size": 4096, "layer_norm_epsilon": 1e-6}
GEMMA2_FLAGS = ("use_post_attention_norm", "use_post_ffw_norm", "use_sliding_window_attention")


def backbone_config(obj: Mapping[str, Any], where: Path) -> dict[str, Any]:
    """The GemmaBackbone arguments of a KerasHub ``config.json`` (``{"class_name", "config"}``, or the bare
    arguments), KerasHub's defaults filled in; Gemma 1 and Gemma 3 backbones are refused."""
    cls = obj.get("class_name")
    inner = obj.get("config") if cls is not None else obj
    if cls is not None and cls != BACKBONE:
        family = " (Gemma 3: not supported, this tool converts Gemma 2)" if str(cls).startswith("Gemma3") else ""
        raise ConfigError(f"class_name is {cls!r}{family}; a KerasHub Gemma 2 preset's config.json holds a "
                          f"{BACKBONE}", where)
    if not isinstance(inner, Mapping):
        raise ConfigError("'config' is not an object: not a KerasHub backbone config", where)
    missing = [k for k in REQUIRED if k not in inner]
    if missing:
        raise ConfigError(f"missing key(s) {', '.join(missing)}: not a KerasHub {BACKBONE} config", where)
    args = {**DEFAULTS, **{k: v for k, v in inner.items() if k in (*REQUIRED, *DEFAULTS)}}
    off = [k for k in GEMMA2_FLAGS if args[k] is not True]
    if len(off) == len(GEMMA2_FLAGS):
        raise ConfigError(f"{', '.join(f'{k} false' for k in off)}: this is a Gemma 1 {BACKBONE}; this tool "
                          "converts Gemma 2 only", where)
    if off:
        raise ConfigError(f"{', '.join(f'{k} {args[k]}' for k in off)}: Gemma 2 has post-attention and post-FFW "
                          "norms and sliding-window attention (all true); this is no Gemma 2", where)
    return args


def _int(args: Mapping[str, Any], key: str, where: Path) -> int:
    v = args[key]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {v!r}", where)
    return v


def _cap(args: Mapping[str, Any], key: str, where: Path) -> float | None:
    v = args[key]
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
        raise ConfigError(f"{key} must be a positive number or null, got {v!r}", where)
    return None if v is None else float(v)


def query_pre_attn_scalar(args: Mapping[str, Any], where: Path) -> float:
    """``query_head_dim_normalize``: True → head_dim; False → hidden_dim // num_query_heads (the 27B's 144),
    as KerasHub's CachedGemmaAttention computes it (an integer division)."""
    flag = args["query_head_dim_normalize"]
    if not isinstance(flag, bool):
        raise ConfigError(f"query_head_dim_normalize must be true or false, got {flag!r}", where)
    return float(args["head_dim"] if flag else args["hidden_dim"] // args["num_query_heads"])


def to_gemma2_config(args: Mapping[str, Any], dtype: str, where: Path) -> Gemma2Config:
    """The Gemma2Config of GemmaBackbone arguments (``backbone_config``); ``dtype``: the stored one."""
    ints = {k: _int(args, k, where) for k in (*REQUIRED, "sliding_window_size")}
    if ints["intermediate_dim"] % 2:
        raise ConfigError(f"intermediate_dim {ints['intermediate_dim']} is odd; KerasHub's is twice the width of "
                          "each FFN branch", where)
    eps = args["layer_norm_epsilon"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise ConfigError(f"layer_norm_epsilon must be a positive number, got {eps!r}", where)
    try:
        return Gemma2Config(
            vocab_size=ints["vocabulary_size"], hidden_size=ints["hidden_dim"],
            intermediate_size=ints["intermediate_dim"] // 2, num_hidden_layers=ints["num_layers"],
            num_attention_heads=ints["num_query_heads"], num_key_value_heads=ints["num_key_value_heads"],
            head_dim=ints["head_dim"], query_pre_attn_scalar=query_pre_attn_scalar(args, where),
            sliding_window=ints["sliding_window_size"],
            attn_logit_softcapping=_cap(args, "attention_logit_soft_cap", where),
            final_logit_softcapping=_cap(args, "final_logit_soft_cap", where),
            rms_norm_eps=float(eps), rope_theta=ROPE_THETA, torch_dtype=dtype)
    except ConfigError as e:
        raise ConfigError(str(e), where) from None


# ---- the weights against the config ---------------------------------------------------------

def _dim(shapes: Mapping[str, Shape], name: str, ndim: int, where: Path) -> Shape:
    shape = tuple(shapes[name])
    if len(shape) != ndim:
        raise TensorMismatchError(f"{name}: expected {ndim} dimensions, got shape {list(shape)}", where)
    return shape


def check_config(cfg: Gemma2Config, shapes: Mapping[str, Shape], where: Path) -> None:
    """One ConfigError listing every size config.json states that the weights contradict (L from the blocks,
    V, H from the embedding, N, D from block 0's query, K from its key, I from its ffw_linear). Does nothing
    when one of those is missing (the name check then lists it)."""
    if any(name.format("") not in shapes for name in (EMBED, QUERY, KEY, LINEAR)):
        return
    v, h = _dim(shapes, EMBED, 2, where)
    n, _, d = _dim(shapes, QUERY.format(""), 3, where)
    k = _dim(shapes, KEY.format(""), 3, where)[0]
    i = _dim(shapes, LINEAR.format(""), 2, where)[0]
    pairs = [("num_layers", cfg.num_hidden_layers, num_blocks(list(shapes))), ("vocabulary_size", cfg.vocab_size, v),
             ("hidden_dim", cfg.hidden_size, h), ("num_query_heads", cfg.num_attention_heads, n),
             ("head_dim", cfg.head_dim, d), ("num_key_value_heads", cfg.num_key_value_heads, k),
             ("intermediate_dim", 2 * cfg.intermediate_size, 2 * i)]
    bad = [f"{key} {a} (the weights have {b})" for key, a, b in pairs if a != b]
    if bad:
        raise ConfigError(f"config.json contradicts the weights: {', '.join(bad)}", where)
