"""Quantized HF directories (compressed-tensors) as dequantizing lazy tensors."""

from __future__ import annotations

from pathlib import Path

from gemma2_convert.errors import UnsupportedError
from gemma2_convert.lazy import LazyTensor


def dequantizing_tensors(tensors: dict[str, LazyTensor], qconfig: dict, path: Path) -> dict[str, LazyTensor]:
    """Canonical HF names → lazy tensors that dequantize packed weights when loaded."""
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else None
    raise UnsupportedError(f"quantized checkpoints (quant_method {method!r}) are not readable yet", path)
