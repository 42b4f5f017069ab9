"""One tensor of two checkpoints compared: equal after the expected cast, else SQNR and max |Δ|."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gemma2_convert.core.lazy import LazyTensor
from quant.metrics import sqnr_db

COMPARE_ELEMENTS = 1 << 24  # compared per step: casts and differences of at most 16 M elements at a time


@dataclass
class TensorDiff:
    name: str
    equal: bool
    sqnr_db: float
    max_abs: float


def _row_blocks(x: torch.Tensor, y: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Matching blocks of rows of x and y, so no cast or difference of a whole (256k-row) tensor is held."""
    if x.dim() == 0 or x.shape != y.shape:
        yield x, y
        return
    step = max(1, COMPARE_ELEMENTS // max(1, x[0].numel()))
    for i in range(0, x.shape[0], step):
        yield x[i:i + step], y[i:i + step]


def tensor_diff(name: str, x: torch.Tensor, y: torch.Tensor) -> TensorDiff:
    """x cast to y's dtype against y; when they differ, SQNR (as ``quant.metrics.sqnr_db``) and max |Δ|."""
    if x.shape != y.shape:
        return TensorDiff(name, False, sqnr_db(x.float(), y.float()), float("inf"))
    if all(torch.equal(xb.to(yb.dtype), yb) for xb, yb in _row_blocks(x, y)):
        return TensorDiff(name, True, float("inf"), 0.0)
    signal = noise = max_abs = 0.0
    for xb, yb in _row_blocks(x, y):
        xd = xb.double()
        dd = xd - yb.double()
        signal, noise = signal + float(xd.pow(2).sum()), noise + float(dd.pow(2).sum())
        max_abs = max(max_abs, float(dd.abs().max()) if dd.numel() else 0.0)
    return _from_sums(name, signal, noise, max_abs)


def streamed_diff(name: str, a: LazyTensor, b: LazyTensor) -> TensorDiff:
    """``tensor_diff`` of two lazy tensors of the same 2-D shape, read in the same row blocks: a side with
    ``rows`` decodes one block at a time (a quantized 256k-row embedding is never decoded whole); one pass."""
    step = max(1, COMPARE_ELEMENTS // max(1, math.prod(a.shape[1:])))
    whole = [lt.load() if lt.rows is None else None for lt in (a, b)]
    equal, signal, noise, max_abs = True, 0.0, 0.0, 0.0
    for i in range(0, a.shape[0], step):
        xb, yb = (t[i:i + step] if t is not None else lt.rows(i, i + step)  # type: ignore[misc]
                  for t, lt in zip(whole, (a, b)))
        equal = equal and torch.equal(xb.to(yb.dtype), yb)
        xd = xb.double()
        dd = xd - yb.double()
        signal, noise = signal + float(xd.pow(2).sum()), noise + float(dd.pow(2).sum())
        max_abs = max(max_abs, float(dd.abs().max()) if dd.numel() else 0.0)
    if equal:
        return TensorDiff(name, True, float("inf"), 0.0)
    return _from_sums(name, signal, noise, max_abs)


def _from_sums(name: str, signal: float, noise: float, max_abs: float) -> TensorDiff:
    if noise == 0.0:
        return TensorDiff(name, False, float("inf"), max_abs)
    rel = math.sqrt(noise / signal) if signal > 0 else math.inf
    return TensorDiff(name, False, -20.0 * math.log10(rel), max_abs)


def worst_diffs(diffs: list[TensorDiff], n: int = 5) -> list[TensorDiff]:
    """The ``n`` differing tensors of lowest SQNR."""
    return sorted((d for d in diffs if not d.equal), key=lambda d: d.sqnr_db)[:n]
