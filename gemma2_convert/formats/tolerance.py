"""What verification demands of a written output: the writer that made it knows, so it says."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass
class Tolerance:
    """Pass/fail bounds. The default is a lossless conversion: every tensor equal to its source
    (after casting the source to the output's dtype) and identical logits."""

    tensors_equal: bool = True
    max_abs: float = 0.0
    max_kl: float = 0.0
    min_top1: float = 1.0
    min_sqnr_db: float = float("-inf")
    """Lossy: the least SQNR any tensor may have against its source (the stored types' floor, registry
    ``min_sqnr_db``); a tensor below it is not quantization noise (norms off by one, q/k swapped)."""
    basis: str = ""
    """Where lossy bounds come from, for the report (``"Q4_K, the loosest type stored"``)."""

    @property
    def lossless(self) -> bool:
        """Every tensor equal and identical logits: equal weights and config compute the same function."""
        return self.tensors_equal and self.max_abs == 0.0

    @staticmethod
    def cast() -> Tolerance:
        """A dtype change: tensors equal after the cast; logits close (rounding only)."""
        return Tolerance(True, float("inf"), 1e-2, 0.9)

    @staticmethod
    def lossy(max_kl: float, min_top1: float, max_abs: float = float("inf"),
              min_sqnr_db: float = float("-inf")) -> Tolerance:
        """Quantization: tensors differ; bounds on the logits (and a floor on each tensor's SQNR)."""
        return Tolerance(False, max_abs, max_kl, min_top1, min_sqnr_db)

    def because(self, basis: str) -> Tolerance:
        """This tolerance, saying where its bounds come from."""
        return replace(self, basis=basis)
