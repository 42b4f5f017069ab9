"""Float dtype names, one table: the names users type (``--dtype``), configs record (``torch_dtype``)
and provenance stores, against torch dtypes."""

from __future__ import annotations

import torch

from gemma2_convert.core.errors import ConfigError

FLOAT_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                                        "float32": torch.float32}
"""Name → torch dtype of every float dtype a checkpoint may hold or an output may be cast to."""

DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in FLOAT_DTYPES.items()}

FP16_WARNING = ("float16 output: Gemma 2 activations exceed the float16 range (about 65504) in real "
                "models, so inference in float16 may produce inf/NaN; prefer bfloat16 or float32")


def resolve_dtype(name: str) -> torch.dtype | None:
    """'auto' → None (keep each tensor's dtype); otherwise the torch dtype (ConfigError lists the names)."""
    if name == "auto":
        return None
    if name not in FLOAT_DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose auto, {', '.join(FLOAT_DTYPES)}")
    return FLOAT_DTYPES[name]


def dominant_dtype(dtypes: list[torch.dtype]) -> str:
    """The name of the most common float dtype among ``dtypes`` ('float32' when there is none)."""
    named = [d for d in dtypes if d in DTYPE_NAMES]
    return DTYPE_NAMES[max(set(named), key=named.count)] if named else "float32"


def is_widening(src: torch.dtype, dst: torch.dtype | None) -> bool:
    """True when casting ``src`` to ``dst`` is exact: the same dtype (or None: kept), or a 16-bit float
    widened to float32."""
    return dst is None or src == dst or (dst == torch.float32 and src in (torch.bfloat16, torch.float16))
