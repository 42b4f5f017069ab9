"""What verification demands of a written output: the writer that made it knows, so it says."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Tolerance:
    """Pass/fail bounds. The default is a lossless conversion: every tensor equal to its source
    (after casting the source to the output's dtype) and identical logits."""

    tensors_equal: bool = True
    max_abs: float = 0.0
    max_kl: float = 0.0
    min_top1: float = 1.0

    @staticmethod
    def cast() -> Tolerance:
        """A dtype change: tensors equal after the cast; logits close (rounding only)."""
        return Tolerance(True, float("inf"), 1e-2, 0.9)

    @staticmethod
    def lossy(max_kl: float, min_top1: float, max_abs: float = float("inf")) -> Tolerance:
        """Quantization: tensors differ; bounds on the logits only."""
        return Tolerance(False, max_abs, max_kl, min_top1)
