"""Low-rank adapters (LoRA, rsLoRA, DoRA) as PEFT 0.22 computes them: merged into a weight, or run unmerged.

Layout contract (PEFT's ``lora_A`` / ``lora_B``; s = ``lora_alpha / r``, or ``lora_alpha / √r`` with rsLoRA):

* linear ``W [out, in]``: ``A [r, in]``, ``B [out, r]``; ``ΔW = s · B @ A`` [out, in] and the unmerged output
  is ``x @ Wᵀ + s · (x @ Aᵀ) @ Bᵀ`` (``peft/tuners/lora/layer.py`` ``Linear.forward``).
* embedding ``E [V, H]``: ``A [r, V]``, ``B [H, r]``; ``ΔE = s · (B @ A)ᵀ`` [V, H] and the unmerged lookup is
  ``E[ids] + s · Aᵀ[ids] @ Bᵀ`` (``Embedding.forward``).
* DoRA (``use_dora``; ``peft/tuners/lora/dora.py``): a magnitude ``m [out]``; ``W' = m / ‖W + ΔW‖ · (W +
  ΔW)``, the norm taken over each output row (``torch.linalg.norm(weight, dim=1)``), so the unmerged output is
  ``m / ‖W + ΔW‖ · (x @ Wᵀ + s · (x @ Aᵀ) @ Bᵀ)``.

Everything is computed in float32; callers cast once to the dtype they store.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gemma2_convert.core.lazy import LazyTensor


@dataclass(frozen=True)
class LowRank:
    """One adapter's low-rank update of one weight."""

    a: LazyTensor
    """``lora_A``: [r, in] (embedding: [r, V])."""
    b: LazyTensor
    """``lora_B``: [out, r] (embedding: [H, r])."""
    scale: float
    """``lora_alpha / r`` (rsLoRA: ``lora_alpha / √r``)."""
    magnitude: LazyTensor | None = None
    """DoRA's magnitude vector [out]; None for plain LoRA."""
    embedding: bool = False
    """The weight is an embedding table [V, H] (A and B swap roles: ΔE = (B @ A)ᵀ)."""

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def added(self, w: torch.Tensor) -> torch.Tensor:
        """``W + ΔW`` in float32, one fused ``addmm`` (a new tensor; ``w`` is not modified)."""
        a, b = self.a.load().float(), self.b.load().float()
        if self.embedding:
            return torch.addmm(w.float(), a.T, b.T, alpha=self.scale)  # [V, r] @ [r, H]
        return torch.addmm(w.float(), b, a, alpha=self.scale)  # [out, r] @ [r, in]

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        """``W + ΔW`` (DoRA: rescaled per output row to the magnitude), float32."""
        merged = self.added(w)
        if self.magnitude is None:
            return merged
        return merged.mul_((self.magnitude.load().float() / row_norm(merged))[:, None])  # [out, in]

    def linear(self, x: torch.Tensor, w: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The adapted output given the frozen weight ``w`` [out, in] and ``base_out = x @ wᵀ`` [..., out]."""
        a, b = self.a.load().to(x.dtype), self.b.load().to(x.dtype)
        out = base_out + self.scale * F.linear(F.linear(x, a), b)  # [..., out]
        if self.magnitude is None:
            return out
        norm = row_norm(self.added(w))  # [out], detached in PEFT too
        return (self.magnitude.load().float() / norm).to(x.dtype) * out

    def lookup(self, ids: torch.Tensor, base_rows: torch.Tensor) -> torch.Tensor:
        """Embedding rows with the update, given ``base_rows = E[ids]`` [B, T, H]."""
        a, b = self.a.load().to(base_rows.dtype), self.b.load().to(base_rows.dtype)
        return base_rows + self.scale * F.linear(F.embedding(ids, a.T), b)  # [B, T, H]


def row_norm(w: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each output row of ``w`` [out, in] → [out] (PEFT's DoRA weight norm)."""
    return torch.linalg.norm(w, dim=1)


def merge_all(w: torch.Tensor, updates: tuple[LowRank, ...]) -> torch.Tensor:
    """``w`` with each adapter's update merged in turn, float32."""
    out = w.float()
    for u in updates:
        out = u.merge(out)
    return out
