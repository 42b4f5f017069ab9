"""The Gemma2Config of a checkpoint that stores none (gemma_pytorch ``model.ckpt``), from tensor shapes.

The published sizes are recognised by their shapes (spec §0) and get their published
hyper-parameters, including ``query_pre_attn_scalar`` 256 / 256 / 144 for 2B / 9B / 27B (spec §4.6;
never the 224 of transformers' conversion script). Any other shape (pruned fine-tunes, tiny test
models) needs a ``config.json``, or the head layout plus ``query_pre_attn_scalar``: the fused qkv
matrix [(N+2K)·D, H] fixes N·D and K·D but not N, K and D apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from gemma2_convert.core.errors import ConfigError, TensorMismatchError
from reference.config import PRESETS, Gemma2Config

VARIANTS = ("2b", "9b", "27b")
HEAD_FLAGS = "--num-heads/--num-kv-heads/--head-dim with --query-pre-attn-scalar"


@dataclass(frozen=True)
class Dims:
    """What the tensor shapes alone determine."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    q_dim: int
    """N·D: columns of o_proj."""
    kv_dim: int
    """K·D: (qkv rows − N·D) / 2."""

    @staticmethod
    def of(c: Gemma2Config) -> Dims:
        return Dims(c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.q_dim, c.kv_dim)

    def diff(self, other: Dims) -> str:
        """'hidden_size 2304 (expected 3584), …' for the fields that differ."""
        return ", ".join(f"{f.name} {getattr(self, f.name)} (expected {getattr(other, f.name)})"
                         for f in fields(self) if getattr(self, f.name) != getattr(other, f.name))

    def __str__(self) -> str:
        return ", ".join(f"{f.name} {getattr(self, f.name)}" for f in fields(self))


@dataclass(frozen=True)
class ShapeOptions:
    """How the user pins the config: a variant, a config.json, or head-layout overrides."""

    variant: str = "auto"
    """'auto' (detect from shapes), '2b', '9b' or '27b'."""
    config: Gemma2Config | Path | None = None
    """A config (or config.json) to use instead of detection; checked against the shapes."""
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    query_pre_attn_scalar: float | None = None

    def loaded_config(self) -> Gemma2Config | None:
        if self.config is None or isinstance(self.config, Gemma2Config):
            return self.config
        return Gemma2Config.from_json_file(self.config)

    @property
    def overrides(self) -> bool:
        return any(v is not None for v in (self.num_heads, self.num_kv_heads, self.head_dim,
                                            self.query_pre_attn_scalar))

    def describe_overrides(self) -> str:
        pairs = [("--num-heads", self.num_heads), ("--num-kv-heads", self.num_kv_heads),
                 ("--head-dim", self.head_dim), ("--query-pre-attn-scalar", self.query_pre_attn_scalar)]
        return " ".join(f"{k} {v}" for k, v in pairs if v is not None)


def dims_from_shapes(shapes: Mapping[str, tuple[int, ...]], layers: int, where: Path) -> Dims:
    """V, H from the embedder; N·D from o_proj [H, N·D]; K·D from qkv [(N+2K)·D, H]; I from gate_proj."""
    V, H = shapes["embedder.weight"]
    qkv_rows = shapes["model.layers.0.self_attn.qkv_proj.weight"][0]
    q_dim = shapes["model.layers.0.self_attn.o_proj.weight"][1]
    I = shapes["model.layers.0.mlp.gate_proj.weight"][0]  # noqa: E741
    kv2 = qkv_rows - q_dim
    if kv2 <= 0 or kv2 % 2:
        raise TensorMismatchError(f"model.layers.0.self_attn.qkv_proj.weight has {qkv_rows} rows but o_proj has "
                                  f"{q_dim} columns; the rows must be N·D + 2·K·D", where)
    return Dims(V, H, I, layers, q_dim, kv2 // 2)


def detect_variant(d: Dims) -> str | None:
    """The published size with exactly these shapes, or None."""
    return next((v for v in VARIANTS if Dims.of(PRESETS[v]) == d), None)


def infer_config(shapes: Mapping[str, tuple[int, ...]], layers: int, opts: ShapeOptions,
                 where: Path) -> tuple[Gemma2Config, str]:
    """The config for these tensors and a note on where it came from (for errors and provenance)."""
    dims = dims_from_shapes(shapes, layers, where)
    base, how = _base_config(dims, opts, where)
    if opts.overrides:
        base = _with_heads(base, dims, opts, where)
        how = f"{how}, {opts.describe_overrides()}" if how else f"shapes + {opts.describe_overrides()}"
    assert base is not None
    if base.head != "causal_lm" or not base.tie_word_embeddings:
        raise ConfigError(f"gemma_pytorch checkpoints are causal LMs with a tied output head; the config says "
                          f"architectures {list(base.architectures)}, tie_word_embeddings {base.tie_word_embeddings}",
                          where)
    return base, how


def _base_config(dims: Dims, opts: ShapeOptions, where: Path) -> tuple[Gemma2Config | None, str]:
    cfg = opts.loaded_config()
    if cfg is not None:
        if opts.variant != "auto":
            raise ConfigError(f"both --variant {opts.variant} and --config given; pass only one", where)
        return cfg, f"--config {opts.config}" if isinstance(opts.config, Path) else "given config"
    detected = detect_variant(dims)
    if opts.variant != "auto":
        if opts.variant not in VARIANTS:
            raise ConfigError(f"unknown --variant {opts.variant!r}; choose auto, {', '.join(VARIANTS)}", where)
        preset = PRESETS[opts.variant]
        if Dims.of(preset) != dims:
            match = f"they match {detected}" if detected else "they match no published size"
            raise ConfigError(f"--variant {opts.variant} contradicts the tensor shapes: {dims.diff(Dims.of(preset))}; "
                              f"{match}", where)
        return preset, f"--variant {opts.variant}"
    if detected:
        return PRESETS[detected], f"variant {detected} (detected from shapes)"
    if opts.overrides:
        return None, ""
    raise ConfigError(f"shapes ({dims}) match no published Gemma 2 size ({', '.join(VARIANTS)}); pass "
                      f"--config config.json, or {HEAD_FLAGS}", where)


def _with_heads(base: Gemma2Config | None, dims: Dims, opts: ShapeOptions, where: Path) -> Gemma2Config:
    n, k, d = resolve_heads(dims, opts, base, where)
    scalar = opts.query_pre_attn_scalar if opts.query_pre_attn_scalar is not None else (
        base.query_pre_attn_scalar if base else None)
    if scalar is None:
        raise ConfigError("--query-pre-attn-scalar is required for shapes of no published size (published: 256 "
                          "for 2b and 9b, 144 for 27b); or pass --config config.json", where)
    heads = dict(num_attention_heads=n, num_key_value_heads=k, head_dim=d, query_pre_attn_scalar=scalar)
    if base is not None:
        return base.replace(**heads)
    return Gemma2Config(vocab_size=dims.vocab_size, hidden_size=dims.hidden_size,
                        intermediate_size=dims.intermediate_size, num_hidden_layers=dims.num_hidden_layers, **heads)


def resolve_heads(dims: Dims, opts: ShapeOptions, base: Gemma2Config | None, where: Path) -> tuple[int, int, int]:
    """(N, K, D) from any one of the three flags (the shapes give N·D and K·D), checked for consistency."""
    n, k, d = opts.num_heads, opts.num_kv_heads, opts.head_dim
    if n is None and k is None and d is None:
        if base is None:
            raise ConfigError(f"pass at least one of --num-heads/--num-kv-heads/--head-dim ({dims})", where)
        n, k, d = base.num_attention_heads, base.num_key_value_heads, base.head_dim
    if any(x is not None and x <= 0 for x in (n, k, d)):
        raise ConfigError("--num-heads, --num-kv-heads and --head-dim must be positive", where)
    d = d or (dims.q_dim // n if n else dims.kv_dim // k)
    n = n or dims.q_dim // max(d, 1)
    k = k or dims.kv_dim // max(d, 1)
    if n * d != dims.q_dim or k * d != dims.kv_dim or n % k:
        raise ConfigError(f"heads N={n}, K={k}, D={d} give N·D={n * d} and K·D={k * d}, but the tensors have "
                          f"N·D={dims.q_dim} (o_proj columns) and K·D={dims.kv_dim} (N must be a multiple of K)",
                          where)
    return n, k, d
