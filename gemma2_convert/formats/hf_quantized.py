"""Quantized HF directories (compressed-tensors ``pack-quantized``) as dequantizing lazy tensors.

Each quantized Linear's ``weight_packed`` / ``weight_scale`` / ``weight_zero_point`` / ``weight_shape``
becomes one canonical ``<prefix>.weight`` whose ``load()`` decodes the packed data (which stays
mmap'd), so the reference runs the checkpoint without ever holding a dense copy of the model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch

from gemma2_convert.core.errors import FormatError, UnsupportedError
from gemma2_convert.core.lazy import LazyTensor
from quant.compressed_tensors import (
    QUANT_METHOD,
    read_codes,
    read_compressed,
    spec_for_module,
)
from quant.pack import pack_int32, unpack_int32
from quant.qtensor import QuantCodes, QuantTensor
from quant.spec import QuantSpec

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
    rows, nbytes = _row_decoder(prefix, parts, qconfig, spec, shape, path), sum(t.nbytes for t in parts.values())
    if spec is None or shape[1] % (spec.group_size or shape[1]):
        return LazyTensor(shape, scale_t.dtype, load, stored_nbytes=nbytes, rows=rows)
    return QuantTensor(shape, scale_t.dtype, load, nbytes, None, rows, codes=codes,
                       kind="sym" if spec.symmetric else "asym", bits=spec.bits, group_size=spec.group_len(shape[1]),
                       layout="compressed-tensors")


def _row_decoder(prefix: str, parts: dict[str, LazyTensor], qconfig: dict, spec: QuantSpec | None,
                 shape: tuple[int, ...], path: Path) -> Callable[[int, int], torch.Tensor]:
    """``rows(start, stop)`` of the module's weight (``spec``: its quantization), decoded as ``load`` decodes
    it, op for op: ``read_compressed`` on the rows' packed words and scales (a row's own; the zero-points,
    packed along the rows, are unpacked whole once, ``out / (32 / bits)`` words a group, and sliced), so a
    256k-row embedding is never decoded whole."""
    zp = f"{prefix}.weight_zero_point"

    @functools.cache
    def zeros(bits: int) -> torch.Tensor:
        """All rows' zero-points, unpacked (once, at the first call that needs them)."""
        return unpack_int32(parts[zp].load(), bits, shape[0], packed_dim=0)

    def rows(start: int, stop: int) -> torch.Tensor:
        stop = min(stop, shape[0])
        t = {k: lt.load() for k, lt in parts.items()}
        packed, scale = f"{prefix}.weight_packed", f"{prefix}.weight_scale"
        sliced = {**t, packed: t[packed][start:stop], scale: t[scale][start:stop],
                  f"{prefix}.weight_shape": torch.tensor([stop - start, shape[1]])}
        if zp in t and spec is not None and not spec.symmetric:  # repacked: read_compressed checks it
            sliced[zp] = pack_int32(zeros(spec.bits)[start:stop], spec.bits, packed_dim=0)
        try:
            return read_compressed(sliced, qconfig, prefix)
        except FormatError as e:
            raise FormatError(str(e), path) from None

    return rows


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
