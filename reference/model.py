"""The Gemma 2 forward pass in plain eager PyTorch.

Follows ../shared/spec/GEMMA2_FORMATS.md §4.7 (transformers ``modeling_gemma2.py``, eager attention)
operation by operation, so fp32 results match transformers to float rounding and bf16 results
follow the same precision policy (norms and softmax in fp32, everything else in the activation dtype).
Symbols: B batch, T new tokens, S keys, H hidden, N query heads, K kv heads, D head_dim, V vocab.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from reference.cache import FullLayerCache, HybridCache, SlidingLayerCache
from reference.config import Gemma2Config
from reference.weights import WeightStore

HEAD_CHUNK_ROWS = 32768  # vocabulary rows of the output head cast at a time when streaming


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """§4.7.2: fp32 ``x * rsqrt(mean(x²) + eps) * (1 + w)``, cast back to x's dtype."""
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + w.float())).type_as(x)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(x / cap)`` in x's dtype; identity when cap is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


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


class Gemma2ForCausalLM:
    """Gemma 2 causal LM over a :class:`WeightStore` (weights may stay mmap'd or packed)."""

    def __init__(self, config: Gemma2Config, weights: WeightStore) -> None:
        self.config = config
        self.weights = weights
        self.dtype = weights.dtype
        self.checkpoint: Any = None  # the Checkpoint it was opened from, when from_pretrained

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: str, dtype: torch.dtype = torch.float32, resident: bool | None = None, **options: object,
    ) -> Gemma2ForCausalLM:
        """Load any checkpoint the project reads (auto-detected), lazily.

        ``resident=None`` keeps weights after first use when the model fits comfortably in RAM,
        and streams them layer by layer from the mmap'd files otherwise.
        """
        from reference.loading import open_for_reference

        return open_for_reference(cls, path, dtype, resident, **options)

    @classmethod
    def from_tensors(
        cls, config: Gemma2Config, tensors: dict, dtype: torch.dtype = torch.float32, resident: bool = True,
    ) -> Gemma2ForCausalLM:
        """Build from {HF name: Tensor | LazyTensor} (e.g. a transformers state dict)."""
        from gemma2_convert.lazy import LazyTensor

        lazy = {k: v if isinstance(v, LazyTensor) else LazyTensor.of(v) for k, v in tensors.items()}
        return cls(config, WeightStore(lazy, config, dtype, resident))

    # ---- forward ---------------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, cache: HybridCache | None = None) -> torch.Tensor:
        return self.forward(input_ids, attention_mask, position_ids, cache)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, cache: HybridCache | None = None,
    ) -> torch.Tensor:
        """Logits float32 [B, T, V] for input_ids [B, T].

        ``attention_mask`` [B, past + T] (1 = real token) masks padding keys and, unless
        ``position_ids`` is given, sets positions to the count of real tokens before each one,
        so a left-padded row gives the same logits as the unpadded sequence.
        """
        h = self.hidden_states(input_ids, attention_mask, position_ids, cache)
        return self.logits(h)

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, cache: HybridCache | None = None,
    ) -> torch.Tensor:
        """The final-normed hidden states [B, T, H]."""
        c, w = self.config, self.weights
        B, T = input_ids.shape
        past = cache.seen if cache is not None else 0
        q_idx = torch.arange(past, past + T)  # [T] cache indices of the new tokens
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask must be [B, past + T] = {[B, past + T]}, got {list(attention_mask.shape)}")
        if position_ids is None:
            position_ids = _positions(attention_mask, q_idx, B)
        cos, sin = rope_cos_sin(position_ids, c, self.dtype)
        normalizer = torch.tensor(math.sqrt(c.hidden_size), dtype=torch.float32).to(self.dtype)  # §4.7.1
        h = w.embed(input_ids) * normalizer  # [B, T, H]
        for i in range(c.num_hidden_layers):
            layer_cache = cache.layers[i] if cache is not None else None
            h = self._layer(i, h, cos, sin, q_idx, attention_mask, layer_cache)
        if cache is not None:
            cache.seen += T
        return rms_norm(h, w.get("model.norm.weight"), c.rms_norm_eps)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied output head and final softcap (§4.7.8), computed in the activation dtype."""
        w = self.weights
        chunks = [F.linear(h, rows) for _, rows in w.row_chunks(w.output_head(), HEAD_CHUNK_ROWS)]
        logits = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=-1)  # [B, T, V]
        return softcap(logits, self.config.final_logit_softcapping).float()

    def _layer(
        self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_idx: torch.Tensor,
        attention_mask: torch.Tensor | None, layer_cache: FullLayerCache | SlidingLayerCache | None,
    ) -> torch.Tensor:
        """§4.7.3: sandwich-normed attention block then sandwich-normed GeGLU block."""
        c, p = self.config, f"model.layers.{i}."
        get = self.weights.get
        a = rms_norm(h, get(p + "input_layernorm.weight"), c.rms_norm_eps)
        a = self._attention(i, a, cos, sin, q_idx, attention_mask, layer_cache)
        h = h + rms_norm(a, get(p + "post_attention_layernorm.weight"), c.rms_norm_eps)
        m = rms_norm(h, get(p + "pre_feedforward_layernorm.weight"), c.rms_norm_eps)
        m = F.linear(F.gelu(F.linear(m, get(p + "mlp.gate_proj.weight")), approximate="tanh")
                     * F.linear(m, get(p + "mlp.up_proj.weight")), get(p + "mlp.down_proj.weight"))  # §4.7.4
        return h + rms_norm(m, get(p + "post_feedforward_layernorm.weight"), c.rms_norm_eps)

    def _attention(
        self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_idx: torch.Tensor,
        attention_mask: torch.Tensor | None, layer_cache: FullLayerCache | SlidingLayerCache | None,
    ) -> torch.Tensor:
        """§4.7.6: GQA attention with query_pre_attn_scalar scaling and softcap before the mask."""
        c, p = self.config, f"model.layers.{i}.self_attn."
        get = self.weights.get
        B, T, _ = x.shape
        N, K, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = F.linear(x, get(p + "q_proj.weight")).view(B, T, N, D).transpose(1, 2)  # [B, N, T, D]
        k = F.linear(x, get(p + "k_proj.weight")).view(B, T, K, D).transpose(1, 2)  # [B, K, T, D]
        v = F.linear(x, get(p + "v_proj.weight")).view(B, T, K, D).transpose(1, 2)  # [B, K, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_idx = q_idx
        if layer_cache is not None:
            k, v, k_idx = layer_cache.update(k, v, q_idx)  # [B, K, S, D], [S]
        key_valid = attention_mask[:, k_idx] if attention_mask is not None else None  # [B, S]
        window = c.sliding_window if c.is_sliding(i) else None
        scores = torch.matmul(q, repeat_kv(k, N // K).transpose(2, 3)) * c.query_pre_attn_scalar ** -0.5
        scores = softcap(scores, c.attn_logit_softcapping)  # [B, N, T, S]
        scores = scores + attention_bias(q_idx, k_idx, key_valid, window, scores.dtype)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, repeat_kv(v, N // K))  # [B, N, T, D]
        out = out.transpose(1, 2).reshape(B, T, N * D)  # [B, T, N·D]
        return F.linear(out, get(p + "o_proj.weight"))  # [B, T, H]

    # ---- generation -------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs: object) -> torch.Tensor:
        """Greedy or sampled continuation with the hybrid KV cache; see :func:`reference.generate.generate`."""
        from reference.generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)  # type: ignore[arg-type]


def _positions(attention_mask: torch.Tensor | None, q_idx: torch.Tensor, batch: int) -> torch.Tensor:
    """Position of each new token [B, T]: its cache index, or the count of real tokens before it."""
    if attention_mask is None:
        return q_idx[None].expand(batch, -1)
    pos = attention_mask.long().cumsum(-1) - 1  # [B, past + T]
    return pos.clamp(min=0)[:, q_idx]
