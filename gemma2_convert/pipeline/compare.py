"""One tensor of two checkpoints compared: equal after the expected cast, else SQNR and max |Δ|.

Two tensors of the same dtype are first compared byte for byte (``same_bytes``: C's ``memcmp``, at memory
speed; ``torch.equal`` of bfloat16 runs about ten times slower): identical bytes are equal values. Only when
the bytes differ (or the dtypes do) are the values compared (``torch.equal`` after the cast: -0.0 equals 0.0).
"""

from __future__ import annotations

import ctypes
import math
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from gemma2_convert.core.lazy import LazyTensor
from quant.metrics import sqnr_db

COMPARE_ELEMENTS = 1 << 24  # compared per step: casts and differences of at most 16 M elements at a time
SPLIT_BYTES = 16 << 20  # the least bytes per thread of a comparison of bytes


def _memcmp() -> Callable[[int, int, int], int] | None:
    """C's ``memcmp`` (ctypes releases the GIL while it runs); None where the C library is not found."""
    try:
        fn = ctypes.cdll.msvcrt.memcmp if sys.platform == "win32" else ctypes.CDLL(None).memcmp
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_MEMCMP = _memcmp()


def same_bytes(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether x and y are bit-identical: same dtype and shape, and the same bytes (False when undecided: the
    caller compares the values). One pass at memory speed for contiguous CPU tensors."""
    if x.dtype != y.dtype or x.shape != y.shape or _MEMCMP is None:
        return False
    if not (x.is_contiguous() and y.is_contiguous() and x.device.type == y.device.type == "cpu"):
        return False
    n = x.numel() * x.element_size()
    return n == 0 or x.data_ptr() == y.data_ptr() or _memcmp_parts(x.data_ptr(), y.data_ptr(), n)


def _memcmp_parts(a: int, b: int, n: int) -> bool:
    """Whether ``n`` bytes at addresses a and b are equal, compared in as many parts as torch has threads,
    each on its own thread (ctypes releases the GIL: the page faults and reads of a mapped file run in
    parallel)."""
    parts = min(torch.get_num_threads(), max(1, n // SPLIT_BYTES))
    step = -(-n // parts)
    res = [0] * parts

    def run(k: int) -> None:
        res[k] = _MEMCMP(a + k * step, b + k * step, min(step, n - k * step))  # type: ignore[misc]

    others = [threading.Thread(target=run, args=(k,)) for k in range(1, parts)]
    for t in others:
        t.start()
    run(0)
    for t in others:
        t.join()
    return not any(res)


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
    if same_bytes(x, y) or all(torch.equal(xb.to(yb.dtype), yb) for xb, yb in _row_blocks(x, y)):
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
        equal = equal and (same_bytes(xb, yb) or torch.equal(xb.to(yb.dtype), yb))
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
