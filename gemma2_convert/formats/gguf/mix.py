"""Which ggml type each Gemma 2 tensor is stored as, for a ``--type`` (one predicate, one place).

* ``f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q4_k q5_k q6_k``: every matrix in that type (what
  llama.cpp's converter does for f16/bf16/q8_0, and ``llama-quantize --pure`` for the others).
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
from quant.gguf_types import file_type_id

# --type → (default ggml type, general.file_type name)
GGUF_TYPES: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q4_k": ("Q4_K", "MOSTLY_Q4_K_S"), "q5_k": ("Q5_K", "MOSTLY_Q5_K_S"), "q6_k": ("Q6_K", "MOSTLY_Q6_K"),
    "q4_k_m": ("Q4_K", "MOSTLY_Q4_K_M"), "q5_k_m": ("Q5_K", "MOSTLY_Q5_K_M"),
}
MIXES = frozenset({"q4_k_m", "q5_k_m"})
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
    key = type_name.lower()
    if key not in GGUF_TYPES:
        raise UnsupportedError(f"unknown GGUF type {type_name!r}; choose one of {', '.join(GGUF_TYPES)}")
    return key


def file_type(type_name: str) -> int:
    """``general.file_type`` for a ``--type``."""
    return file_type_id(GGUF_TYPES[check_type(type_name)][1])


def use_more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp's layer picker (C integer division; i − n/8 ≥ 0 whenever the modulo is reached)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _mix_type(name: str, cols: int, default: str, n_layers: int) -> tuple[str, str]:
    if name == "token_embd.weight":  # tied with the output head: quantized like output.weight
        return ("Q8_0", "tied embedding, rows not a multiple of 256") if cols % 256 else ("Q6_K", "tied embedding")
    m = _LAYER.match(name)
    if m and (name.endswith(".attn_v.weight") or name.endswith(".ffn_down.weight")):
        if use_more_bits(int(m.group(1)), n_layers):
            return "Q6_K", "mix: more bits"
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
