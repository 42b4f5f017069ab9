"""Which ggml type each Gemma 2 tensor is stored as, for a ``--type`` (one predicate, one place).

* one key per registered ggml type (``quant.gguf_types``: f32, f16, bf16, q8_0, q3_k, q4_k, q6_k, iq4_xs, …;
  ``gemma2-convert formats`` lists them): every matrix in that type (what llama.cpp's converter does for
  f16/bf16/q8_0, and ``llama-quantize --pure`` for the others). ``q6_k`` is also exactly what llama-quantize's
  Q6_K file type stores for Gemma 2 (its only rule, the tied embedding in Q6_K or else Q8_0, is Q6_K's fallback).
* llama-quantize's mixes (:data:`MIXES`; ``src/llama-quant.cpp`` ``llama_tensor_get_type_impl``, QUANT_FORMATS.md
  §1.5): ``q2_k q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m q5_k_s q5_k_m``, and ``iq4_xs_mix`` for its IQ4_XS file type
  (``iq4_xs`` keeps meaning IQ4_XS everywhere). ``q2_k`` is the mix, not Q2_K everywhere, which only
  ``llama-quantize --pure`` writes. Every mix stores the tied ``token_embd`` as the output head: Q6_K, or Q8_0
  if its rows are not whole 256-blocks; rules on ``attn_v``, ``attn_output`` and ``ffn_down`` follow by layer.
  llama.cpp counts those tensors in file order, which it sorts by layer, so its counters are the layer index.
  With an importance matrix (``--imatrix``) the rules a mix keeps only without one (:attr:`Mix.without_imatrix`:
  IQ4_XS's Q5_K ``ffn_down``) are dropped, as llama.cpp's ``qs.has_imatrix`` drops them.
* Always: 1-D tensors and norms F32. A row length that is not a multiple of the block size falls
  back as llama.cpp's ``tensor_type_fallback`` does, and the choice records why.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from gemma2_convert.core.errors import UnsupportedError
from quant.gguf_codec import fallback_type
from quant.gguf_types import GGML_TYPES, file_type_id, ggml_type

Rule = Callable[[int, int, int], "str | None"]
"""(layer, n_layers, n_gqa) -> the ggml type of that layer's tensor, or None for the mix's default."""
MORE_BITS, MORE_BITS_UNALIGNED = "Q6_K", "Q8_0"
"""The tied embedding's type in every mix (the output head's rule), and its type when the rows are not whole
Q6_K blocks."""


def use_more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp's layer picker (C integer division; i − n/8 ≥ 0 whenever the modulo is reached)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _always(qtype: str) -> Rule:
    return lambda i, n, gqa: qtype


@dataclass(frozen=True)
class Mix:
    """One llama-quantize file type: its default ggml type and the per-layer rules that override it."""

    default: str
    """The ggml type of the matrices no rule singles out (``llama_ftype_get_default_type``)."""
    rules: dict[str, Rule] = field(default_factory=dict)
    """Tensor role (``attn_v``, ``attn_output``, ``ffn_down``) -> its rule."""
    but: str = ""
    """What the rules do, for the help line."""
    file_type: str = ""
    """The ``general.file_type`` name; ``MOSTLY_`` + the key upper-cased when empty."""
    without_imatrix: dict[str, Rule] = field(default_factory=dict)
    """Rules that hold only when no importance matrix is given (llama-quant.cpp's ``!qs.has_imatrix``)."""


MIXES: dict[str, Mix] = {
    "q2_k": Mix("Q2_K", {"attn_v": lambda i, n, gqa: "Q4_K" if gqa >= 4 else "Q3_K",
                         "attn_output": _always("Q3_K"), "ffn_down": _always("Q3_K")},
                "Q3_K for attn_v, attn_output and ffn_down"),
    "q3_k_s": Mix("Q3_K"),
    "q3_k_m": Mix("Q3_K", {"attn_v": lambda i, n, gqa: "Q5_K" if i < 2 else "Q4_K",
                           "attn_output": _always("Q4_K"),
                           "ffn_down": lambda i, n, gqa: "Q5_K" if i < n // 16 else "Q4_K"},
                  "Q4_K for attn_v, attn_output and ffn_down, Q5_K for attn_v on layers 0-1 and ffn_down on the "
                  "first n/16"),
    "q3_k_l": Mix("Q3_K", {role: _always("Q5_K") for role in ("attn_v", "attn_output", "ffn_down")},
                  "Q5_K for attn_v, attn_output and ffn_down"),
    "q4_k_s": Mix("Q4_K", {"attn_v": lambda i, n, gqa: "Q5_K" if i < 4 else None,
                           "ffn_down": lambda i, n, gqa: "Q5_K" if i < n // 8 else None},
                  "Q5_K for attn_v on layers 0-3 and ffn_down on the first n/8"),
    "q4_k_m": Mix("Q4_K", {role: lambda i, n, gqa: "Q6_K" if use_more_bits(i, n) else None
                           for role in ("attn_v", "ffn_down")},
                  "Q6_K for attn_v and ffn_down on the layers llama.cpp's use_more_bits picks (about half)"),
    "q5_k_s": Mix("Q5_K"),
    "q5_k_m": Mix("Q5_K", {role: lambda i, n, gqa: "Q6_K" if use_more_bits(i, n) else None
                           for role in ("attn_v", "ffn_down")},
                  "Q6_K for attn_v and ffn_down on the layers llama.cpp's use_more_bits picks (about half)"),
    "iq4_xs_mix": Mix("IQ4_XS", {"attn_v": lambda i, n, gqa: "Q5_K" if gqa >= 4 else None},
                      "Q5_K for ffn_down on the first n/8 layers (llama-quantize without an imatrix)",
                      "MOSTLY_IQ4_XS", {"ffn_down": lambda i, n, gqa: "Q5_K" if i < n // 8 else None}),
}
"""llama-quantize's mixes for Gemma 2 (no Falcon, expert or 70B branches), keyed by ``--type``."""

GGUF_TYPES: dict[str, tuple[str, str]] = {
    **{t.name.lower(): (t.name, t.file_type) for t in GGML_TYPES.values()},
    **{key: (mix.default, mix.file_type or f"MOSTLY_{key.upper()}") for key, mix in MIXES.items()},
}
"""``--type`` -> (default ggml type, ``general.file_type`` name): one key per registered ggml type (every matrix in
that type), then the mixes (``q2_k`` replaces the pure Q2_K key in place)."""
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.weight$")


@dataclass(frozen=True)
class TypeChoice:
    """The type of one GGUF tensor and why it is not the requested default, if it is not."""

    name: str
    """GGUF tensor name."""
    qtype: str
    """ggml type written."""
    reason: str = ""
    """'' for the default; otherwise e.g. 'norm', 'mix: attn_v', 'fallback: 300 % 256 ≠ 0'."""


def check_type(type_name: str) -> str:
    """The ``--type`` key for ``type_name`` (case-insensitive); UnsupportedError lists the valid keys."""
    key = type_name.lower()
    if key not in GGUF_TYPES:
        raise UnsupportedError(f"unknown GGUF type {type_name!r}; choose one of {', '.join(GGUF_TYPES)}")
    return key


def file_type(type_name: str) -> int:
    """``general.file_type`` for a ``--type``."""
    return file_type_id(GGUF_TYPES[check_type(type_name)][1])


def type_help() -> dict[str, str]:
    """One help line per ``--type`` key, built from the registry (``quant.gguf_types``): what it stores."""
    lines = {}
    for key, (name, ftype) in GGUF_TYPES.items():
        t = ggml_type(name)
        what = f"matrices {t.name}, {t.bits_per_weight:g} bits/weight"
        if key in MIXES:
            more = ggml_type(MORE_BITS)
            label = ftype.removeprefix("MOSTLY_")
            rules = f", {MIXES[key].but}" if MIXES[key].but else ""
            lines[key] = (f"llama-quantize's {label} mix: {what}, but {more.name} ({more.bits_per_weight:g}) "
                          f"for the tied embedding{rules}; norms F32")
        else:
            lines[key] = f"{what} ({t.help}); norms F32"
    return lines


def _mix_type(mix: Mix, name: str, cols: int, n_layers: int, n_gqa: int, imatrix: bool) -> tuple[str, str]:
    if name in ("token_embd.weight", "output.weight"):  # tied with the output head: quantized like output.weight
        block = ggml_type(mix.default).block_size  # llama.cpp checks the default type's block (256 in every mix)
        if cols % block:
            return MORE_BITS_UNALIGNED, f"tied embedding, rows not a multiple of {block}"
        return MORE_BITS, "tied embedding"
    m = _LAYER.match(name)
    rules = mix.rules if imatrix else {**mix.rules, **mix.without_imatrix}
    rule = rules.get(m.group(2)) if m else None
    qtype = rule(int(m.group(1)), n_layers, n_gqa) if rule else None
    return (mix.default, "") if qtype in (None, mix.default) else (qtype, f"mix: {m.group(2)}")


def choose_type(name: str, shape: tuple[int, ...], type_name: str, n_layers: int, n_gqa: int = 2,
                imatrix: bool = False) -> TypeChoice:
    """The ggml type of GGUF tensor ``name`` with PyTorch ``shape`` under ``--type type_name``.

    ``n_gqa``: query heads per KV head (``num_attention_heads // num_key_value_heads``), which the Q2_K and IQ4_XS
    mixes look at (≥ 4 gives attn_v more bits); 2 for every Gemma 2 size. ``imatrix``: an importance matrix is
    given (drops the mix's ``without_imatrix`` rules).
    """
    key = check_type(type_name)
    default = GGUF_TYPES[key][0]
    if len(shape) < 2 or name.endswith("_norm.weight"):
        return TypeChoice(name, "F32", "norm" if name.endswith("norm.weight") else "1-D")
    cols = shape[-1]
    mix = MIXES.get(key)
    qtype, reason = _mix_type(mix, name, cols, n_layers, n_gqa, imatrix) if mix else (default, "")
    final = fallback_type(qtype, cols)
    if final != qtype:
        reason = f"fallback: row of {cols} is not a multiple of {qtype}'s block"
    return TypeChoice(name, final, reason)
