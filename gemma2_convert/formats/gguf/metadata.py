"""Gemma 2 config ↔ GGUF metadata: the keys llama.cpp reads, and our provenance keys.

llama.cpp keys (GEMMA2_FORMATS.md §5.1; read by ``src/llama-model.cpp`` ``load_hparams`` and
``src/models/gemma2.cpp`` in the llama.cpp vendored by llama-cpp-python 0.3.36). Keys under
``gemma2_convert.`` are ours; llama.cpp ignores them. They record how the file was made and what
reading it back must undo: the true ``query_pre_attn_scalar``, the factor folded into ``attn_q``,
the norm convention, the float32 low bits lost by ``1 + w`` (so norms read back bit-exactly), the
source dtype, a fingerprint of the source weights, and the ``tokenizer.model`` itself (the
``tokenizer.ggml.*`` keys are llama.cpp's rewrite of it and cannot rebuild it exactly), so that
``gguf-to-hf`` writes complete, identical tokenizer files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gemma2_convert.core.errors import ConfigError
from gemma2_convert.formats.gguf.names import ARCH, llama_cpp_query_scalar
from gemma2_convert.formats.gguf.values import (
    Value,
    ValueType,
    array,
    boolean,
    f32,
    string,
    u32,
)
from reference.config import FULL, SLIDING, Gemma2Config, alternating_layer_types

PREFIX = "gemma2_convert."
K_VERSION = PREFIX + "version"
K_SOURCE = PREFIX + "source"
K_SOURCE_FORMAT = PREFIX + "source_format"
K_SOURCE_DTYPE = PREFIX + "source_dtype"
K_SOURCE_FINGERPRINT = PREFIX + "source_xxh3_128"
"""XXH3-128 (hex) of the canonical source weights: each tensor's ``name|dtype|shape`` line and bytes, in write order."""
K_SOURCE_SHA256 = PREFIX + "source_sha256"
"""The same fingerprint as sha256, in files written by earlier builds (read, no longer written)."""
K_QUERY_SCALAR = PREFIX + "query_pre_attn_scalar"
K_QUERY_FOLD = PREFIX + "query_scale_folded"
K_NORM = PREFIX + "norm_convention"
K_NORM_RESIDUAL = PREFIX + "norm_residual."  # + GGUF tensor name: arr[f32]
K_HF_CONFIG = PREFIX + "hf_config"
K_TOKENIZER_MODEL = PREFIX + "tokenizer_model"  # arr[u8]: the SentencePiece tokenizer.model, verbatim
NORM_CONVENTION = "one_plus_w"
"""GGUF norms hold ``1 + w`` (llama.cpp multiplies plainly); HF's zero-centred ``w`` is recovered by −1."""


def k(key: str) -> str:
    """``attention.head_count`` → ``gemma2.attention.head_count``."""
    return f"{ARCH}.{key}"


def model_metadata(cfg: Gemma2Config, file_type: int, name: str) -> list[tuple[str, Value]]:
    """``general.*`` and ``gemma2.*`` keys for ``cfg`` (what llama.cpp reads for the gemma2 arch)."""
    meta = [
        ("general.architecture", string(ARCH)),
        ("general.type", string("model")),
        ("general.name", string(name)),
        ("general.file_type", u32(file_type)),
        ("general.quantization_version", u32(2)),
        ("general.alignment", u32(32)),
        (k("context_length"), u32(cfg.max_position_embeddings)),
        (k("embedding_length"), u32(cfg.hidden_size)),
        (k("block_count"), u32(cfg.num_hidden_layers)),
        (k("feed_forward_length"), u32(cfg.intermediate_size)),
        (k("attention.head_count"), u32(cfg.num_attention_heads)),
        (k("attention.head_count_kv"), u32(cfg.num_key_value_heads)),
        (k("attention.key_length"), u32(cfg.head_dim)),
        (k("attention.value_length"), u32(cfg.head_dim)),
        (k("attention.layer_norm_rms_epsilon"), f32(cfg.rms_norm_eps)),
        (k("attention.sliding_window"), u32(cfg.sliding_window)),
        (k("rope.freq_base"), f32(cfg.rope_theta)),
    ]
    if cfg.attn_logit_softcapping is not None:
        meta.append((k("attn_logit_softcapping"), f32(cfg.attn_logit_softcapping)))
    if cfg.final_logit_softcapping is not None:
        meta.append((k("final_logit_softcapping"), f32(cfg.final_logit_softcapping)))
    if cfg.layer_types != alternating_layer_types(cfg.num_hidden_layers):
        # llama.cpp reads a per-layer bool array (true = sliding) instead of its default pattern of 2.
        meta.append((k("attention.sliding_window_pattern"),
                     array(ValueType.BOOL, [t == SLIDING for t in cfg.layer_types])))
    return meta


_VOCAB_TYPES: dict[str, ValueType] = {
    "tokenizer.ggml.tokens": ValueType.STRING,
    "tokenizer.ggml.scores": ValueType.FLOAT32,
    "tokenizer.ggml.token_type": ValueType.INT32,
}


def vocab_metadata(keys: Mapping[str, object]) -> list[tuple[str, Value]]:
    """Typed GGUF values for a ``GGUFVocab.metadata()`` dict (ids u32, flags bool, strings, arrays)."""
    out = []
    for key, v in keys.items():
        if key in _VOCAB_TYPES:
            out.append((key, array(_VOCAB_TYPES[key], list(v))))  # type: ignore[call-overload]
        elif isinstance(v, bool):
            out.append((key, boolean(v)))
        elif isinstance(v, int):
            out.append((key, u32(v)))
        else:
            out.append((key, string(str(v))))
    return out


def config_from_metadata(kv: Mapping[str, Any], vocab_size: int, where: str) -> Gemma2Config:
    """The Gemma2Config a gemma2 GGUF describes (ours or llama.cpp's).

    Shapes come from the llama.cpp keys; ``query_pre_attn_scalar`` from our key, else the value
    llama.cpp itself uses for this depth (so the model read is the model llama.cpp runs).
    """
    def req(key: str) -> Any:
        if key not in kv:
            raise ConfigError(f"GGUF metadata lacks {key!r}; not a complete gemma2 file", where)
        return kv[key]

    heads = int(req(k("attention.head_count")))
    base = json.loads(kv[K_HF_CONFIG]) if K_HF_CONFIG in kv else {}
    layers = int(req(k("block_count")))
    cfg: dict[str, Any] = dict(
        base, vocab_size=vocab_size, hidden_size=int(req(k("embedding_length"))),
        intermediate_size=int(req(k("feed_forward_length"))), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=int(kv.get(k("attention.head_count_kv"), heads)),
        rms_norm_eps=float(req(k("attention.layer_norm_rms_epsilon"))),
        sliding_window=int(kv.get(k("attention.sliding_window"), 4096)),
        attn_logit_softcapping=float(kv.get(k("attn_logit_softcapping"), 50.0)),
        final_logit_softcapping=float(kv.get(k("final_logit_softcapping"), 30.0)),
        rope_theta=float(kv.get(k("rope.freq_base"), 10000.0)),
        max_position_embeddings=int(kv.get(k("context_length"), 8192)),
    )
    hidden = cfg["hidden_size"]
    cfg["head_dim"] = int(kv.get(k("attention.key_length"), hidden // heads))
    cfg["layer_types"] = _layer_types(kv, layers, where)
    for role, key in (("bos", "bos_token_id"), ("pad", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in kv:
            cfg[f"{role}_token_id"] = int(kv[f"tokenizer.ggml.{key}"])
    if "tokenizer.ggml.eos_token_id" in kv and "eos_token_id" not in base:
        cfg["eos_token_id"] = int(kv["tokenizer.ggml.eos_token_id"])

    probe = Gemma2Config.from_hf_dict({**cfg, "query_pre_attn_scalar": 1.0}, where)
    cfg["query_pre_attn_scalar"] = float(kv.get(K_QUERY_SCALAR, llama_cpp_query_scalar(probe)))
    cfg.setdefault("torch_dtype", kv.get(K_SOURCE_DTYPE, "float32"))
    return Gemma2Config.from_hf_dict(cfg, where)


def _layer_types(kv: Mapping[str, Any], layers: int, where: str) -> list[str]:
    pattern = kv.get(k("attention.sliding_window_pattern"))
    if pattern is None:
        return list(alternating_layer_types(layers))
    if isinstance(pattern, int):  # a period n: layer i is sliding iff i % n < n - 1 (llama-hparams.cpp)
        return [SLIDING if pattern == 0 or i % pattern < pattern - 1 else FULL for i in range(layers)]
    if len(pattern) != layers:
        raise ConfigError(f"{k('attention.sliding_window_pattern')} has {len(pattern)} entries for "
                          f"{layers} layers", where)
    return [SLIDING if bool(x) else FULL for x in pattern]
