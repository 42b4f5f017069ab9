"""Gemma 2 building blocks as pure functions (../shared/spec/GEMMA2_FORMATS.md §4.7).

Symbols: B batch, T new tokens, S keys, H hidden, N query heads, K kv heads, D head_dim, V vocab.
"""

from __future__ import annotations

import torch

from reference.config import Gemma2Config


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """§4.7.2: fp32 ``x * rsqrt(mean(x²) + eps) * (1 + w)``, cast back to x's dtype."""
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + w.float())).type_as(x)


def softcap_(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(x / cap)`` in x's dtype, in place on a temporary x (transformers' three operations, without
    their two new tensors); identity when cap is None. Returns x. Out of place when x needs a gradient
    (autoround trains through the layer; an in-place op on tanh's saved output breaks its backward)."""
    if cap is not None and x.requires_grad:
        return torch.tanh(x / cap) * cap
    return x if cap is None else x.div_(cap).tanh_().mul_(cap)


def rope_cos_sin(positions: torch.Tensor, c: Gemma2Config, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """§4.7.5: fp32 angles for positions [B, T] → cos, sin [B, 1, T, D] in the activation dtype."""
    D = c.head_dim
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float) / D))  # [D/2]
    freqs = positions[..., None].float() * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split (NeoX) rotation of x [B, heads, T, D]."""
    return x * cos + rotate_half(x) * sin


def attention_bias(
    q_idx: torch.Tensor, k_idx: torch.Tensor, key_valid: torch.Tensor | None, window: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive mask [B|1, 1, T, S]: 0 where key j is visible from query i, dtype-min elsewhere.

    Visible iff j <= i (causal), i - j <= window - 1 (sliding layers, §4.7.7) and key j is not padding.
    """
    diff = q_idx[:, None] - k_idx[None, :]  # [T, S]
    visible = diff >= 0
    if window is not None:
        visible &= diff < window
    visible = visible[None, None]  # [1, 1, T, S]
    if key_valid is not None:
        visible = visible & key_valid[:, None, None, :].bool()  # [B, 1, T, S]
    zero = torch.zeros((), dtype=dtype)
    return torch.where(visible, zero, torch.finfo(dtype).min)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, K, S, D] → [B, K·n_rep, S, D], each kv head shared by n_rep consecutive query heads."""
    if n_rep == 1:
        return x
    B, K, S, D = x.shape
    return x[:, :, None].expand(B, K, n_rep, S, D).reshape(B, K * n_rep, S, D)
