"""Quantized HF directories (compressed-tensors ``pack-quantized``) as dequantizing lazy tensors.

Each quantized Linear's ``weight_packed`` / ``weight_scale`` / ``weight_zero_point`` / ``weight_shape``
becomes one canonical ``<prefix>.weight`` whose ``load()`` decodes the packed data (which stays
mmap'd), so the reference runs the checkpoint without ever holding a dense copy of the model.
"""

from __future__ import annotations

from pathlib import Path

from gemma2_convert.core.errors import FormatError, UnsupportedError
from gemma2_convert.core.lazy import LazyTensor
from quant.compressed_tensors import (
    QUANT_METHOD,
    read_codes,
    read_compressed,
    spec_for_module,
)
from quant.qtensor import QuantCodes, QuantTensor

PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def _module_parts(tensors: dict[str, LazyTensor]) -> dict[str, dict[str, LazyTensor]]:
    """{module prefix: {full tensor name: lazy}} for every module that has a weight_packed."""
    modules: dict[str, dict[str, LazyTensor]] = {}
    for name, t in tensors.items():
        prefix, _, part = name.rpartition(".")
        if part in PARTS:
            modules.setdefault(prefix, {})[name] = t
    return modules


def _dequantizing(prefix: str, parts: dict[str, LazyTensor], qconfig: dict, path: Path) -> LazyTensor:
    shape_t = parts.get(f"{prefix}.weight_shape")
    scale_t = parts.get(f"{prefix}.weight_scale")
    if shape_t is None or scale_t is None or f"{prefix}.weight_packed" not in parts:
        raise FormatError(f"{prefix}: incomplete pack-quantized module, has {sorted(parts)}", path)
    shape = tuple(int(v) for v in shape_t.load().tolist())
    if len(shape) != 2 or min(shape) <= 0:
        raise FormatError(f"{prefix}.weight_shape is {list(shape)}, expected [out, in]", path)

    def load():
        try:
            return read_compressed({k: t.load() for k, t in parts.items()}, qconfig, prefix)
        except FormatError as e:
            raise FormatError(str(e), path) from None

    def codes() -> QuantCodes:
        try:
            return read_codes({k: t.load() for k, t in parts.items()}, qconfig, prefix)
        except FormatError as e:
            raise FormatError(str(e), path) from None

    try:
        spec = spec_for_module(qconfig, prefix)
    except UnsupportedError as e:
        raise UnsupportedError(str(e), path) from None
    if spec is None or shape[1] % (spec.group_size or shape[1]):
        return LazyTensor(shape, scale_t.dtype, load, stored_nbytes=sum(t.nbytes for t in parts.values()))
    return QuantTensor(shape, scale_t.dtype, load, sum(t.nbytes for t in parts.values()), None, codes=codes,
                       kind="sym" if spec.symmetric else "asym", bits=spec.bits, group_size=spec.group_len(shape[1]),
                       layout="compressed-tensors")


def dequantizing_tensors(tensors: dict[str, LazyTensor], qconfig: dict, path: Path) -> dict[str, LazyTensor]:
    """Canonical HF names → lazy tensors; quantized weights decode when loaded."""
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else None
    if method != QUANT_METHOD:
        raise UnsupportedError(f"quantization_config quant_method {method!r} is not supported; this tool reads "
                               f"{QUANT_METHOD!r} (pack-quantized)", path)
    out = {k: v for k, v in tensors.items() if k.rpartition(".")[2] not in PARTS}
    for prefix, parts in _module_parts(tensors).items():
        out[f"{prefix}.weight"] = _dequantizing(prefix, parts, qconfig, path)
    return out
