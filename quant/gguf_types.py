"""The GGML tensor types this package reads and writes, and llama.cpp's ``general.file_type`` ids.

Numbers follow gguf-py ``constants.py`` (``GGMLQuantizationType``, ``GGML_QUANT_SIZES``,
``LlamaFileType``) and ``ggml-common.h``; ``tests/test_gguf_quants.py`` checks them against the
installed ``gguf`` package. This module does not import ``gguf`` itself.

A block of ``block_size`` consecutive row elements is stored in ``type_size`` bytes; blocks run
along the contiguous row (ggml ``ne[0]``, the ``in_features`` of a ``[out, in]`` weight).
"""

from __future__ import annotations

from dataclasses import dataclass

from gemma2_convert.core.errors import UnsupportedError, name_list


@dataclass(frozen=True)
class GGMLType:
    """One GGML tensor type."""

    name: str
    """The ggml type name, e.g. ``"Q4_K"``."""
    ggml_id: int
    """Value of ``gguf.GGMLQuantizationType`` / ``enum ggml_type``, written into the tensor info."""
    block_size: int
    """Row elements per block (1 for the float types)."""
    type_size: int
    """Bytes per block."""

    @property
    def bits_per_weight(self) -> float:
        """Storage cost per element, scales included."""
        return 8.0 * self.type_size / self.block_size

    @property
    def is_quantized(self) -> bool:
        """True for block-quantized types, False for F32/F16/BF16."""
        return self.block_size > 1


GGML_TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in (
        GGMLType("F32", 0, 1, 4),
        GGMLType("F16", 1, 1, 2),
        GGMLType("BF16", 30, 1, 2),
        GGMLType("Q4_0", 2, 32, 18),
        GGMLType("Q4_1", 3, 32, 20),
        GGMLType("Q5_0", 6, 32, 22),
        GGMLType("Q5_1", 7, 32, 24),
        GGMLType("Q8_0", 8, 32, 34),
        GGMLType("Q4_K", 12, 256, 144),
        GGMLType("Q5_K", 13, 256, 176),
        GGMLType("Q6_K", 14, 256, 210),
    )
}
"""The types handled by ``quant.gguf_codec``, keyed by ggml name."""

FILE_TYPES: dict[str, int] = {
    "ALL_F32": 0,
    "MOSTLY_F16": 1,
    "MOSTLY_Q4_0": 2,
    "MOSTLY_Q4_1": 3,
    "MOSTLY_Q8_0": 7,
    "MOSTLY_Q5_0": 8,
    "MOSTLY_Q5_1": 9,
    "MOSTLY_Q4_K_S": 14,
    "MOSTLY_Q4_K_M": 15,
    "MOSTLY_Q5_K_S": 16,
    "MOSTLY_Q5_K_M": 17,
    "MOSTLY_Q6_K": 18,
    "MOSTLY_BF16": 32,
}
"""``general.file_type`` values (llama.cpp ``enum llama_ftype`` / gguf-py ``LlamaFileType``)."""

_FILE_TYPE_ALIASES: dict[str, str] = {
    "F32": "ALL_F32",
    "F16": "MOSTLY_F16",
    "BF16": "MOSTLY_BF16",
    "Q4_0": "MOSTLY_Q4_0",
    "Q4_1": "MOSTLY_Q4_1",
    "Q8_0": "MOSTLY_Q8_0",
    "Q5_0": "MOSTLY_Q5_0",
    "Q5_1": "MOSTLY_Q5_1",
    "Q4_K_S": "MOSTLY_Q4_K_S",
    "Q4_K_M": "MOSTLY_Q4_K_M",
    "Q5_K_S": "MOSTLY_Q5_K_S",
    "Q5_K_M": "MOSTLY_Q5_K_M",
    "Q6_K": "MOSTLY_Q6_K",
}


def ggml_type(name: str) -> GGMLType:
    """The GGMLType called ``name`` (case-insensitive); UnsupportedError lists the valid names."""
    key = name.upper()
    if key not in GGML_TYPES:
        raise UnsupportedError(
            f"unsupported GGML tensor type {name!r}; valid types: {name_list(GGML_TYPES)}"
        )
    return GGML_TYPES[key]


def file_type_id(name: str) -> int:
    """The ``general.file_type`` id for ``name`` (``"Q4_K_M"`` or ``"MOSTLY_Q4_K_M"``)."""
    key = name.upper()
    key = _FILE_TYPE_ALIASES.get(key, key)
    if key not in FILE_TYPES:
        valid = list(FILE_TYPES) + list(_FILE_TYPE_ALIASES)
        raise UnsupportedError(f"unsupported GGUF file type {name!r}; valid names: {name_list(valid, 40)}")
    return FILE_TYPES[key]
