"""Which ggml type each Gemma 2 tensor is stored as, for a ``--type`` (one predicate, one place).

* one key per registered ggml type (``quant.gguf_types``: f32, f16, bf16, q8_0, q4_k, iq4_xs, …; ``gemma2-convert
  formats`` lists them): every matrix in that type (what llama.cpp's converter does for f16/bf16/q8_0, and
  ``llama-quantize --pure`` for the others).
* ``q4_k_m q5_k_m``: llama-quantize's mixes (``src/llama-quant.cpp``
  ``llama_tensor_get_type_impl``; QUANT_FORMATS.md §1.5): the tied ``token_embd`` in Q6_K (Q8_0
  if its rows are not a multiple of 256), ``attn_v`` and ``ffn_down`` in Q6_K on the layers
  ``use_more_bits`` picks, everything else Q4_K / Q5_K.
* Always: 1-D tensors and norms F32. A row length that is not a multiple of the block size falls
  back as llama.cpp's ``tensor_type_fallback`` does, and the choice records why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gemma2_convert.core.errors import UnsupportedError
from quant.gguf_codec import fallback_type
from quant.gguf_types import GGML_TYPES, file_type_id, ggml_type

MIXES: dict[str, str] = {"q4_k_m": "Q4_K", "q5_k_m": "Q5_K"}
"""llama-quantize's mixes: ``--type`` -> the ggml type of the tensors the mix does not single out. The file
type is the key's (``MOSTLY_Q4_K_M``)."""
MORE_BITS, MORE_BITS_UNALIGNED = "Q6_K", "Q8_0"
"""What a mix stores its chosen tensors as, and the tied embedding when its rows are not whole Q6_K blocks."""

GGUF_TYPES: dict[str, tuple[str, str]] = {
    **{t.name.lower(): (t.name, t.file_type) for t in GGML_TYPES.values()},
    **{key: (default, f"MOSTLY_{key.upper()}") for key, default in MIXES.items()},
}
"""``--type`` -> (default ggml type, ``general.file_type`` name): one key per registered ggml type (every
matrix in that type), then the mixes."""
_LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class TypeChoice:
    """The type of one GGUF tensor and why it is not the requested default, if it is not."""

    name: str
    """GGUF tensor name."""
    qtype: str
    """ggml type written."""
    reason: str = ""
    """'' for the default; otherwise e.g. 'norm', 'mix: more bits', 'fallback: 300 % 256 ≠ 0'."""


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
    for key, (name, _) in GGUF_TYPES.items():
        t = ggml_type(name)
        what = f"matrices {t.name}, {t.bits_per_weight:g} bits/weight"
        if key in MIXES:
            more = ggml_type(MORE_BITS)
            lines[key] = (f"llama-quantize's {key.upper()} mix: {what}, but {more.name} ({more.bits_per_weight:g}) "
                          "for the tied embedding and for attn_v/ffn_down on the layers llama.cpp picks; norms F32")
        else:
            lines[key] = f"{what} ({t.help}); norms F32"
    return lines


def use_more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp's layer picker (C integer division; i − n/8 ≥ 0 whenever the modulo is reached)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _mix_type(name: str, cols: int, default: str, n_layers: int) -> tuple[str, str]:
    if name == "token_embd.weight":  # tied with the output head: quantized like output.weight
        block = ggml_type(MORE_BITS).block_size
        if cols % block:
            return MORE_BITS_UNALIGNED, f"tied embedding, rows not a multiple of {block}"
        return MORE_BITS, "tied embedding"
    m = _LAYER.match(name)
    if m and (name.endswith(".attn_v.weight") or name.endswith(".ffn_down.weight")):
        if use_more_bits(int(m.group(1)), n_layers):
            return MORE_BITS, "mix: more bits"
    return default, ""


def choose_type(name: str, shape: tuple[int, ...], type_name: str, n_layers: int) -> TypeChoice:
    """The ggml type of GGUF tensor ``name`` with PyTorch ``shape`` under ``--type type_name``."""
    key = check_type(type_name)
    default = GGUF_TYPES[key][0]
    if len(shape) < 2 or name.endswith("_norm.weight"):
        return TypeChoice(name, "F32", "norm" if name.endswith("norm.weight") else "1-D")
    cols = shape[-1]
    qtype, reason = _mix_type(name, cols, default, n_layers) if key in MIXES else (default, "")
    final = fallback_type(qtype, cols)
    if final != qtype:
        reason = f"fallback: row of {cols} is not a multiple of {qtype}'s block"
    return TypeChoice(name, final, reason)
