"""Hybrid KV cache: the last W - 1 keys for sliding layers, a growing cache for global layers.

Each layer cache stores keys/values *after* RoPE, in the order they arrived, together with the absolute
cache index of every slot, so the attention mask is computed from indices (spec §4.7 item 7: key j is
visible from query i iff 0 <= i - j <= W - 1 on sliding layers, j <= i on global ones). Keys are kept
in arrival order, as transformers' ``DynamicSlidingWindowLayer`` keeps them, so attention sums run over
the same keys in the same order (equal results, not merely close, also past the window).
"""

from __future__ import annotations

import torch

from reference.config import Gemma2Config

KV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # keys [B, K, S, D], values [B, K, S, D], index [S]


class FullLayerCache:
    """Keeps every key/value seen so far (global attention layers)."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.idx: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> KV:
        """Append the new keys/values [B, K, T, D] at cache indices idx [T]; return all of them."""
        if self.k is None:  # contiguous, as transformers' cat onto its empty cache makes them: same GEMMs
            self.k, self.v, self.idx = k.contiguous(), v.contiguous(), idx
        else:
            self.k = torch.cat([self.k, k], dim=2)  # [B, K, S + T, D]
            self.v = torch.cat([self.v, v], dim=2)
            self.idx = torch.cat([self.idx, idx])
        return self.k, self.v, self.idx


class SlidingLayerCache:
    """The keys of the last W - 1 positions (sliding-window layers); memory stays O(W) however long the
    text."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.k: torch.Tensor | None = None  # [B, K, ≤ W - 1, D]
        self.v: torch.Tensor | None = None
        self.idx: torch.Tensor | None = None  # [≤ W - 1]

    def update(self, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> KV:
        """Return the kept keys followed by the new ones [B, K, kept + T, D] (a prefill longer than W still
        sees its whole window), then keep the last W - 1: all a later query can see."""
        if self.k is None:
            full = k.contiguous(), v.contiguous(), idx  # as FullLayerCache
        else:
            full = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2), torch.cat([self.idx, idx])
        keep = slice(-self.window + 1, None) if self.window > 1 else slice(0, 0)
        kept = full[0][:, :, keep], full[1][:, :, keep], full[2][keep]  # views of the newest W - 1
        if full[2].shape[0] > self.window:  # a long prefill: copy, so its whole K/V is not held
            kept = tuple(t.clone() for t in kept)
        self.k, self.v, self.idx = kept
        return full


class HybridCache:
    """One cache per layer, by the layer's attention type; ``seen`` counts cached positions."""

    def __init__(self, config: Gemma2Config) -> None:
        self.layers: list[FullLayerCache | SlidingLayerCache] = [
            SlidingLayerCache(config.sliding_window) if config.is_sliding(i) else FullLayerCache()
            for i in range(config.num_hidden_layers)
        ]
        self.seen = 0

    def get_seq_length(self) -> int:
        return self.seen
