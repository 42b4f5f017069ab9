"""The check every writer runs on each tensor as it is written: NaN/Inf, and the float16 range.

One reduction per tensor (``torch.aminmax``, about as fast as reading the memory; NaN propagates
into it, ±Inf shows as an extreme) answers both questions, on the tensor the writer has just
loaded, so the scan costs no extra pass over the files. Only a failing tensor is looked at again,
to count what is wrong and where.

A non-finite weight, or a weight that float16 would store as ±Inf (|w| ≥ 65520, which rounds to
Inf), is an error naming the tensor and the source, unless ``allow_nonfinite``: then a warning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gemma2_convert.core.errors import NonFiniteError
from gemma2_convert.core.lazy import LazyTensor

FP16_MAX = 65504.0
FP16_OVERFLOW = 65520.0
"""The smallest magnitude float16 rounds (to nearest even) to Inf."""


def extremes(t: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a floating tensor in one pass; NaN if any element is NaN."""
    lo, hi = torch.aminmax(t.detach().reshape(-1))
    return float(lo), float(hi)


def describe_nonfinite(t: torch.Tensor) -> str:
    """'3 NaN and 1 ±Inf value(s), the first at index [2, 7]' (a second pass, only for a failing tensor)."""
    bad = ~torch.isfinite(t)
    n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    first = [int(i) for i in bad.nonzero()[0]] if bool(bad.any()) else []
    return f"{n_nan} NaN and {n_inf} ±Inf value(s), the first at index {first}"


def _fp16_peak(lo: float, hi: float, transform: Callable[[torch.Tensor], torch.Tensor] | None) -> float:
    """The largest magnitude a tensor with extremes ``lo``/``hi`` has once ``transform`` (monotone) is applied."""
    if transform is not None:
        lo, hi = (float(v) for v in transform(torch.tensor([[lo, hi]], dtype=torch.float32)).reshape(-1))
    return max(-lo, hi)


def _ignore(_message: str) -> None:
    return None


@dataclass(frozen=True)
class WeightCheck:
    """What to do about a non-finite or float16-overflowing weight; call it on each tensor written.

    ``fix`` is the remedy named for an overflow (``--dtype bfloat16`` / ``--type bf16`` …); ``where``
    the source named in errors and warnings.
    """

    allow_nonfinite: bool = False
    warn: Callable[[str], None] = _ignore
    where: str | Path | None = None
    fix: str = "use --dtype bfloat16 or float32"

    def __call__(self, name: str, t: torch.Tensor, to_fp16: bool = False,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Check ``t`` (the source of tensor ``name``); ``transform`` is the monotone elementwise map the
        writer applies before storing (the +1 on norms, the query fold): the extremes go through it."""
        if self.passes(t, to_fp16, transform):
            return
        lo, hi = extremes(t)  # a second pass, only for a tensor with something to report
        if not (math.isfinite(lo) and math.isfinite(hi)):
            self._report(f"tensor {name!r}: {describe_nonfinite(t)}; the source is damaged (or was saved from "
                         "a run that overflowed)", "pass --allow-nonfinite to write it anyway")
            return
        peak = _fp16_peak(lo, hi, transform)
        self._report(f"tensor {name!r}: values beyond the float16 range (max |w| {peak:.4g} > "
                     f"{FP16_MAX:g}) would be stored as inf", f"{self.fix} (or --allow-nonfinite to write inf)")

    @staticmethod
    def passes(t: torch.Tensor, to_fp16: bool = False,
               transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> bool:
        """True when ``t`` (a whole tensor or some of its rows) has nothing to report: one pass. A writer
        may run this on each chunk as it encodes it, and the full check on the tensor once a chunk fails."""
        if not t.is_floating_point() or t.numel() == 0:
            return True
        lo, hi = extremes(t)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return False
        return not to_fp16 or _fp16_peak(lo, hi, transform) < FP16_OVERFLOW

    def _report(self, problem: str, remedy: str) -> None:
        if not self.allow_nonfinite:
            raise NonFiniteError(f"{problem}; {remedy}", self.where)
        prefix = f"{self.where}: " if self.where else ""
        self.warn(f"{prefix}{problem}; written as is (--allow-nonfinite)")


def checked_once(tensors: dict[str, LazyTensor], check: WeightCheck) -> dict[str, LazyTensor]:
    """``{name: LazyTensor}`` whose first ``load()`` of each tensor runs ``check`` on it (later loads —
    calibration, verification — do not scan again)."""
    done: set[str] = set()

    def wrap(name: str, lt: LazyTensor) -> LazyTensor:
        def load() -> torch.Tensor:
            t = lt.load()
            if name not in done:
                check(name, t)
                done.add(name)
            return t

        return LazyTensor(lt.shape, lt.dtype, load, lt.stored_nbytes)

    return {n: wrap(n, lt) for n, lt in tensors.items()}
