"""bf16 linear weights in oneDNN's blocked layout, copied into it once instead of on every product.

``F.linear`` on bf16 (a CPU with oneDNN's bf16 kernels) runs oneDNN's matmul, which first copies the whole
weight [N, K] into the tiled layout its kernel reads, on every call: for a prompt of a few tokens, or one
decoded token, that copy moves as many bytes as the product itself. ``mkldnn._reorder_linear_weight`` makes
the copy once and ``mkldnn._linear_pointwise`` runs the same kernel on it, so the results are bit-identical
to ``F.linear`` (tests/test_packing.py: every Gemma 2 shape, 1 and 2 threads) — and prefill and decode skip
the copy. fp32 is left alone: ``F.linear`` runs MKL there, and oneDNN's fp32 kernel rounds differently.

A :class:`Packer` keeps the packed copy of a weight the model keeps resident (one more copy of the linear
weights, so only when they fit: ``fits_resident``); a streamed weight used by several inputs at once (verify's
prompts, layer by layer) is packed for that call only; anything else goes to ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gemma2_convert.core.memory import fits_resident


def can_pack(w: torch.Tensor, xs: list[torch.Tensor]) -> bool:
    """Whether ``F.linear(x, w)`` runs oneDNN's bf16 kernel for every x, with no gradient wanted: then the
    packed product gives the same bits."""
    grad = torch.is_grad_enabled() and (w.requires_grad or any(x.requires_grad for x in xs))
    return (w.dtype == torch.bfloat16 and w.dim() == 2 and w.device.type == "cpu" and not grad
            and all(x.dtype == torch.bfloat16 for x in xs)
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] in oneDNN's blocked layout (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(w)


def packed_linear(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``x @ wᵀ`` [..., N] from x [..., K] and ``pack(w)``."""
    return torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")


class Packer:
    """Packed copies of one model's resident bf16 weights, by name."""

    def __init__(self, nbytes: int) -> None:
        """``nbytes``: what packing every resident linear weight would take; they are kept only if it fits."""
        self.nbytes = nbytes
        self.keep: bool | None = None
        """Whether resident weights are kept packed: decided at the first one (``fits_resident(nbytes)``)."""
        self._packed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name → (weight, its packed copy)

    def linear(self, name: str, w: torch.Tensor, xs: list[torch.Tensor],
               resident: bool) -> list[torch.Tensor]:
        """``F.linear(x, w)`` for each x, bit for bit; ``resident``: w is the model's kept copy of ``name``."""
        if not can_pack(w, xs):
            return [F.linear(x, w) for x in xs]
        hit = self._packed.get(name)
        if hit is not None and hit[0] is w:  # the same tensor as when packed (a replaced weight is repacked)
            p = hit[1]
        elif resident and self._keeps():
            p = pack(w)
            self._packed[name] = (w, p)
        elif len(xs) > 1:  # one copy for all of them instead of one per product
            p = pack(w)
        else:
            return [F.linear(xs[0], w)]
        return [packed_linear(x, p) for x in xs]

    def kept(self) -> list[str]:
        """Names of the weights held packed."""
        return sorted(self._packed)

    def _keeps(self) -> bool:
        if self.keep is None:
            self.keep = fits_resident(self.nbytes)
        return self.keep
