"""Hybrid KV cache: a ring buffer of W slots for sliding layers, a growing cache for global layers.

Each layer cache stores keys/values *after* RoPE together with the absolute cache index of every
slot, so the attention mask is computed from indices (spec §4.7 item 7: key j is visible from
query i iff 0 <= i - j <= W - 1 on sliding layers, j <= i on global ones) and slot order is irrelevant.
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
        if self.k is None:
            self.k, self.v, self.idx = k, v, idx
        else:
            self.k = torch.cat([self.k, k], dim=2)  # [B, K, S + T, D]
            self.v = torch.cat([self.v, v], dim=2)
            self.idx = torch.cat([self.idx, idx])
        return self.k, self.v, self.idx


class SlidingLayerCache:
    """A ring buffer of W slots (sliding-window layers); memory stays O(W) however long the text."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.k: torch.Tensor | None = None  # [B, K, W, D]
        self.v: torch.Tensor | None = None
        self.idx: torch.Tensor | None = None  # [W], -1 = empty slot

    def update(self, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> KV:
        """Return old valid slots + all new keys (a prefill longer than W still sees its whole
        window), then store the newest min(T, W) keys in slots ``idx % W``."""
        B, K, T, D = k.shape
        if self.k is None:
            self.k = k.new_zeros(B, K, self.window, D)
            self.v = v.new_zeros(B, K, self.window, D)
            self.idx = torch.full((self.window,), -1, dtype=torch.long)
        valid = self.idx >= 0  # [W]
        out = (
            torch.cat([self.k[:, :, valid], k], dim=2),  # [B, K, S_valid + T, D]
            torch.cat([self.v[:, :, valid], v], dim=2),
            torch.cat([self.idx[valid], idx]),
        )
        keep = slice(max(T - self.window, 0), T)
        slots = idx[keep] % self.window
        self.k[:, :, slots] = k[:, :, keep]
        self.v[:, :, slots] = v[:, :, keep]
        self.idx[slots] = idx[keep]
        return out


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
