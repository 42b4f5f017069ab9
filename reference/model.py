"""The Gemma 2 forward pass in plain eager PyTorch: the bare decoder and the causal LM.

Follows ../shared/spec/GEMMA2_FORMATS.md §4.7 (transformers ``modeling_gemma2.py``, eager attention)
operation by operation, so fp32 results match transformers to float rounding and bf16 results
follow the same precision policy (norms and softmax in fp32, everything else in the activation dtype).
Symbols: B batch, T new tokens, S keys, H hidden, N query heads, K kv heads, D head_dim, V vocab.

Return rule (all classes): ``model(ids)`` gives the main tensor (logits, or the last hidden state of
the bare model); ``return_dict=True`` — or asking for a loss, hidden states, attentions or a cache —
gives a transformers-style record; ``return_dict=False`` gives its tuple.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from gemma2_convert.core.lazy import LazyTensor
from reference.cache import FullLayerCache, HybridCache, SlidingLayerCache
from reference.config import Gemma2Config
from reference.generate import generate
from reference.layers import apply_rope, attention_bias, repeat_kv, rms_norm, rope_cos_sin, softcap
from reference.outputs import BaseModelOutput, CausalLMOutput, finish
from reference.weights import WeightStore

HEAD_CHUNK_ROWS = 32768  # vocabulary rows of the output head cast at a time when streaming


class Gemma2Model:
    """The bare Gemma 2 decoder over a :class:`WeightStore` (weights may stay mmap'd or packed)."""

    def __init__(self, config: Gemma2Config, weights: WeightStore) -> None:
        self.config = config
        self.weights = weights
        self.dtype = weights.dtype
        self.checkpoint: Any = None  # the Checkpoint it was opened from, set by the loader
        self.observer: Callable[[str, torch.Tensor], None] | None = None
        """Called with (weight name, input activations [B, T, in]) before each decoder matmul (calibration)."""
        self.on_layer: Callable[[int], None] | None = None
        """Called with the layer index after each decoder layer (progress of long forwards)."""

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, config: Gemma2Config, tensors: dict, dtype: torch.dtype = torch.float32,
                     resident: bool = True) -> Any:
        """Build from {HF name: Tensor | LazyTensor} (e.g. a transformers state dict)."""
        lazy = {k: v if isinstance(v, LazyTensor) else LazyTensor.of(v) for k, v in tensors.items()}
        return cls(config, WeightStore(lazy, config, dtype, resident))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    # ---- the decoder -----------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: HybridCache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_attentions: bool = False, output_hidden_states: bool = False,
                return_dict: bool | None = None, cache_position: torch.Tensor | None = None,
                cache: HybridCache | None = None) -> Any:
        """Final-normed hidden states [B, T, H] (see the module's return rule)."""
        out = self.decode(input_ids, attention_mask, position_ids, past_key_values or cache, inputs_embeds,
                          use_cache, output_attentions, output_hidden_states, cache_position)
        extras = output_attentions or output_hidden_states or bool(use_cache)
        return finish(out, out.last_hidden_state, return_dict, extras)

    def decode(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, cache: HybridCache | None = None,
               inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
               output_attentions: bool = False, output_hidden_states: bool = False,
               cache_position: torch.Tensor | None = None) -> BaseModelOutput:
        """The decoder stack; ``attention_mask`` [B, past + T] (1 = real token) masks padding keys and,
        unless ``position_ids`` is given, positions count only real tokens (left padding is exact)."""
        c, w = self.config, self.weights
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if use_cache and cache is None:
            cache = HybridCache(c)
        B, T = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        past = cache.seen if cache is not None else 0
        q_idx = cache_position if cache_position is not None else torch.arange(past, past + T)  # [T]
        if attention_mask is not None and attention_mask.shape[1] <= int(q_idx[-1]):
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions; it must cover the cache "
                             f"and the new tokens ({int(q_idx[-1]) + 1})")
        if position_ids is None:
            position_ids = _positions(attention_mask, q_idx, B)
        cos, sin = rope_cos_sin(position_ids, c, self.dtype)
        if inputs_embeds is None:
            normalizer = torch.tensor(math.sqrt(c.hidden_size), dtype=torch.float32).to(self.dtype)  # §4.7.1
            h = w.embed(input_ids) * normalizer  # [B, T, H]
        else:
            h = inputs_embeds.to(self.dtype)  # used as given, like transformers 5 (the scale is in embed_tokens)
        hidden, attns = ([h] if output_hidden_states else None), ([] if output_attentions else None)
        for i in range(c.num_hidden_layers):
            layer_cache = cache.layers[i] if cache is not None else None
            h = self._layer(i, h, cos, sin, q_idx, attention_mask, layer_cache, attns)
            if self.on_layer is not None:
                self.on_layer(i)
            if hidden is not None:
                hidden.append(h)
        if cache is not None:
            cache.seen = max(cache.seen, int(q_idx[-1]) + 1)
        h = rms_norm(h, w.get("model.norm.weight"), c.rms_norm_eps)
        if hidden is not None:
            hidden[-1] = h  # transformers reports the final-normed state last
        return BaseModelOutput(h, cache, tuple(hidden) if hidden else None, tuple(attns) if attns else None)

    def _layer(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_idx: torch.Tensor,
               attention_mask: torch.Tensor | None, layer_cache: FullLayerCache | SlidingLayerCache | None,
               attns: list | None) -> torch.Tensor:
        """§4.7.3: sandwich-normed attention block then sandwich-normed GeGLU block."""
        c, p = self.config, f"model.layers.{i}."
        get, lin = self.weights.get, self._linear
        a = rms_norm(h, get(p + "input_layernorm.weight"), c.rms_norm_eps)
        a = self._attention(i, a, cos, sin, q_idx, attention_mask, layer_cache, attns)
        h = h + rms_norm(a, get(p + "post_attention_layernorm.weight"), c.rms_norm_eps)
        m = rms_norm(h, get(p + "pre_feedforward_layernorm.weight"), c.rms_norm_eps)
        m = lin(F.gelu(lin(m, p + "mlp.gate_proj.weight"), approximate="tanh")
                * lin(m, p + "mlp.up_proj.weight"), p + "mlp.down_proj.weight")  # §4.7.4
        return h + rms_norm(m, get(p + "post_feedforward_layernorm.weight"), c.rms_norm_eps)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``x @ W[name]^T``, reporting the input to ``observer`` when one is set."""
        if self.observer is not None:
            self.observer(name, x)
        return F.linear(x, self.weights.get(name))

    def _attention(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_idx: torch.Tensor,
                   attention_mask: torch.Tensor | None, layer_cache: FullLayerCache | SlidingLayerCache | None,
                   attns: list | None) -> torch.Tensor:
        """§4.7.6: GQA attention with query_pre_attn_scalar scaling and softcap before the mask."""
        c, p, lin = self.config, f"model.layers.{i}.self_attn.", self._linear
        B, T, _ = x.shape
        N, K, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = lin(x, p + "q_proj.weight").view(B, T, N, D).transpose(1, 2)  # [B, N, T, D]
        k = lin(x, p + "k_proj.weight").view(B, T, K, D).transpose(1, 2)  # [B, K, T, D]
        v = lin(x, p + "v_proj.weight").view(B, T, K, D).transpose(1, 2)  # [B, K, T, D]
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
        if attns is not None:
            attns.append(probs)
        out = torch.matmul(probs, repeat_kv(v, N // K))  # [B, N, T, D]
        out = out.transpose(1, 2).reshape(B, T, N * D)  # [B, T, N·D]
        return lin(out, p + "o_proj.weight")  # [B, T, H]

    def verify_outputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What verification compares for one prompt [1, T]: rows of outputs [P, C], and targets or None."""
        return self(ids)[0], None


class Gemma2ForCausalLM(Gemma2Model):
    """Gemma 2 with the tied output head and final logit softcap."""

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: HybridCache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, output_attentions: bool = False,
                output_hidden_states: bool = False, return_dict: bool | None = None,
                cache_position: torch.Tensor | None = None, num_logits_to_keep: int | torch.Tensor = 0,
                logits_to_keep: int | torch.Tensor | None = None, cache: HybridCache | None = None) -> Any:
        """Logits float32 [B, T, V] (or the last ``logits_to_keep`` positions); ``labels`` [B, T] give
        the next-token cross-entropy with -100 ignored (see the module's return rule)."""
        out = self.decode(input_ids, attention_mask, position_ids, past_key_values or cache, inputs_embeds,
                          use_cache, output_attentions, output_hidden_states, cache_position)
        keep = num_logits_to_keep if logits_to_keep is None else logits_to_keep
        h = out.last_hidden_state
        h = h[:, -keep:] if isinstance(keep, int) and keep > 0 else h[:, keep] if torch.is_tensor(keep) else h
        logits = self.logits(h)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        rec = CausalLMOutput(loss, logits, out.past_key_values, out.hidden_states, out.attentions)
        extras = labels is not None or output_attentions or output_hidden_states or bool(use_cache)
        return finish(rec, logits, return_dict, extras)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Output head and final softcap (§4.7.8) in the activation dtype, returned as float32."""
        w = self.weights
        chunks = [F.linear(h, rows) for _, rows in w.row_chunks(w.output_head(), HEAD_CHUNK_ROWS)]
        logits = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=-1)  # [B, T, V]
        return softcap(logits, self.config.final_logit_softcapping).float()

    def verify_outputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self(ids)[0, :-1], ids[0, 1:]  # next-token predictions and their targets

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        """Greedy or sampled continuation with the hybrid KV cache; see :func:`reference.generate.generate`."""
        return generate(self, input_ids, max_new_tokens, **kwargs)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits[:, t] against labels[:, t + 1]; -100 labels are ignored."""
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]  # [B, T]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100)


def _positions(attention_mask: torch.Tensor | None, q_idx: torch.Tensor, batch: int) -> torch.Tensor:
    """Position of each new token [B, T]: its cache index, or the count of real tokens before it."""
    if attention_mask is None:
        return q_idx[None].expand(batch, -1)
    pos = attention_mask.long().cumsum(-1) - 1  # [B, past + T]
    return pos.clamp(min=0)[:, q_idx]
