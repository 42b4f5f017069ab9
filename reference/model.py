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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from gemma2_convert.core.lazy import LazyTensor
from reference.cache import FullLayerCache, HybridCache, SlidingLayerCache
from reference.config import Gemma2Config
from reference.generate import generate
from reference.layers import (
    apply_rope,
    attention_bias,
    repeat_kv,
    rms_norm,
    rope_cos_sin,
    softcap_,
)
from reference.lora import LowRank, merge_all
from reference.outputs import BaseModelOutput, CausalLMOutput, finish
from reference.packing import Packer
from reference.weights import WeightStore

HEAD_CHUNK_ROWS = 32768  # vocabulary rows of the output head cast at a time when streaming
LayerCache = FullLayerCache | SlidingLayerCache
Rows = tuple[torch.Tensor, torch.Tensor | None]  # outputs [P, C] and their targets [P] (or None)


@dataclass
class Stream:
    """One sequence's state through the decoder stack. ``run_layer`` advances several at once, fetching each
    weight once for all of them (verification runs every prompt of both models layer by layer this way)."""

    h: torch.Tensor  # [B, T, H] hidden states entering the next layer
    cos: torch.Tensor  # [B, 1, T, D]
    sin: torch.Tensor  # [B, 1, T, D]
    q_idx: torch.Tensor  # [T] cache index of each new token
    attention_mask: torch.Tensor | None = None  # [B, past + T], 1 = real token
    caches: Sequence[LayerCache] | dict[int, LayerCache] | None = None  # by layer index
    attns: list | None = None  # attention probabilities, appended per layer when asked
    masks: dict = field(default_factory=dict)  # window → (key indices [S], additive mask), for later layers

    def mask(self, k_idx: torch.Tensor, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """``attention_bias`` for these keys, computed once per attention type and reused by the later layers
        (every layer of a type sees the same key indices)."""
        hit = self.masks.get(window)
        same = hit is not None and hit[1].dtype == dtype and hit[0].shape == k_idx.shape
        if same and torch.equal(hit[0], k_idx):
            return hit[1]
        key_valid = self.attention_mask[:, k_idx] if self.attention_mask is not None else None  # [B, S]
        bias = attention_bias(self.q_idx, k_idx, key_valid, window, dtype)  # [B|1, 1, T, S]
        self.masks[window] = (k_idx, bias)
        return bias


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
        self.adapters: dict[str, tuple[LowRank, ...]] = {}
        """Weight name → low-rank updates run unmerged on top of it (``reference.lora``; the output head's
        updates are under ``lm_head.weight`` even when the head is the tied embedding)."""
        self.packer = Packer(2 * sum(t.numel for t in weights.tensors.values() if len(t.shape) == 2))
        """bf16 weights in oneDNN's layout (``reference.packing``): bit-identical products, without a copy of
        the weight on every one."""

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
        h = self._embed(input_ids) if inputs_embeds is None else inputs_embeds.to(self.dtype)  # [B, T, H]
        attns = [] if output_attentions else None
        s = Stream(h, cos, sin, q_idx, attention_mask, cache.layers if cache is not None else None, attns)
        hidden = [h] if output_hidden_states else None
        for i in range(c.num_hidden_layers):
            self.run_layer(i, [s])
            if self.on_layer is not None:
                self.on_layer(i)
            if hidden is not None:
                hidden.append(s.h)
        h = s.h
        if cache is not None:
            cache.seen = max(cache.seen, int(q_idx[-1]) + 1)
        h = rms_norm(h, w.get("model.norm.weight"), c.rms_norm_eps)
        if hidden is not None:
            hidden[-1] = h  # transformers reports the final-normed state last
        return BaseModelOutput(h, cache, tuple(hidden) if hidden else None, tuple(attns) if attns else None)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """§4.7.1: embedding rows [B, T, H] times sqrt(H) rounded to the activation dtype
        (``inputs_embeds`` are used as given, like transformers 5: the scale is in embed_tokens)."""
        normalizer = torch.tensor(math.sqrt(self.config.hidden_size), dtype=torch.float32).to(self.dtype)
        rows = self.weights.embed(ids)  # [B, T, H]
        for u in self.adapters.get("model.embed_tokens.weight", ()):
            rows = u.lookup(ids, rows)
        return rows * normalizer

    def start(self, ids: torch.Tensor) -> Stream:
        """A stream for prompt ids [B, T] without padding or cache, ready for ``run_layer(0, ...)``."""
        q_idx = torch.arange(ids.shape[1])  # [T]
        cos, sin = rope_cos_sin(q_idx[None].expand(ids.shape[0], -1), self.config, self.dtype)
        return Stream(self._embed(ids), cos, sin, q_idx)

    def _layer(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_idx: torch.Tensor,
               attention_mask: torch.Tensor | None, layer_cache: LayerCache | None,
               attns: list | None) -> torch.Tensor:
        """Layer ``i`` on one sequence (``run_layer`` with a single stream)."""
        caches = {i: layer_cache} if layer_cache is not None else None
        s = Stream(h, cos, sin, q_idx, attention_mask, caches, attns)
        self.run_layer(i, [s])
        return s.h

    def observe_layer(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      q_idx: torch.Tensor) -> None:
        """Layer ``i`` on hidden states ``h`` [B, T, H] only as far as ``observer`` needs (calibration): every
        decoder matmul's input is observed, and the layer stops after down_proj's; its product and the output
        are never computed (``h`` is left as it was)."""
        self.run_layer(i, [Stream(h, cos, sin, q_idx)], observe_only=True)

    def run_layer(self, i: int, streams: list[Stream], observe_only: bool = False) -> None:
        """§4.7.3 on every stream: sandwich-normed attention block then sandwich-normed GeGLU block (§4.7.4).
        Each weight is fetched once for all streams; each stream's arithmetic is that of a lone forward.
        ``observe_only``: stop once down_proj's input is observed, the streams left mid-layer
        (:meth:`observe_layer`)."""
        c, p, get, lin = self.config, f"model.layers.{i}.", self.weights.get, self._linear_all
        eps = c.rms_norm_eps
        w = get(p + "input_layernorm.weight")
        attn = self._attention_all(i, [rms_norm(s.h, w, eps) for s in streams], streams)
        w = get(p + "post_attention_layernorm.weight")
        for s, a in zip(streams, attn):
            s.h = s.h + rms_norm(a, w, eps)
        w = get(p + "pre_feedforward_layernorm.weight")
        m = [rms_norm(s.h, w, eps) for s in streams]
        g = [F.gelu(x, approximate="tanh") for x in lin(m, p + "mlp.gate_proj.weight")]  # [B, T, I] each
        g = [x * y for x, y in zip(g, lin(m, p + "mlp.up_proj.weight"))]
        if observe_only:
            for x in g:
                if self.observer is not None:
                    self.observer(p + "mlp.down_proj.weight", x)
            return
        out = lin(g, p + "mlp.down_proj.weight")
        w = get(p + "post_feedforward_layernorm.weight")
        for s, x in zip(streams, out):
            s.h = s.h + rms_norm(x, w, eps)

    def _linear_all(self, xs: list[torch.Tensor], name: str) -> list[torch.Tensor]:
        """``x @ W[name]^T`` for each x, the weight fetched once; inputs go to ``observer`` when one is set."""
        if self.observer is not None:
            for x in xs:
                self.observer(name, x)
        w = self.weights.get(name)
        updates = self.adapters.get(name, ())
        out = self.packer.linear(name, w, xs, self.weights.keeps(name))
        return [adapted_linear(x, w, y, updates) for x, y in zip(xs, out)]

    def _attention_all(self, i: int, xs: list[torch.Tensor], streams: list[Stream]) -> list[torch.Tensor]:
        """§4.7.6 on each stream; the projections fetch their weights once."""
        p, lin = f"model.layers.{i}.self_attn.", self._linear_all
        q, k, v = lin(xs, p + "q_proj.weight"), lin(xs, p + "k_proj.weight"), lin(xs, p + "v_proj.weight")
        out = [self._attend(i, *qkv, s) for *qkv, s in zip(q, k, v, streams)]
        return lin(out, p + "o_proj.weight")  # [B, T, H] each

    def _attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: Stream) -> torch.Tensor:
        """GQA attention of one stream's projections [B, T, N·D | K·D] with query_pre_attn_scalar scaling and
        softcap before the mask → [B, T, N·D]."""
        c = self.config
        B, T, _ = q.shape
        N, K, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = q.view(B, T, N, D).transpose(1, 2)  # [B, N, T, D]
        k = k.view(B, T, K, D).transpose(1, 2)  # [B, K, T, D]
        v = v.view(B, T, K, D).transpose(1, 2)  # [B, K, T, D]
        q, k = apply_rope(q, s.cos, s.sin), apply_rope(k, s.cos, s.sin)
        k_idx = s.q_idx
        if s.caches is not None:
            k, v, k_idx = s.caches[i].update(k, v, s.q_idx)  # [B, K, S, D], [S]
        window = c.sliding_window if c.is_sliding(i) else None
        scores = torch.matmul(q, repeat_kv(k, N // K).transpose(2, 3))  # [B, N, T, S]
        scores = softcap_(scores.mul_(c.query_pre_attn_scalar ** -0.5), c.attn_logit_softcapping)
        scores = scores.add_(s.mask(k_idx, window, scores.dtype))  # in place, the ops of ``scores + mask``
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        if s.attns is not None:
            s.attns.append(probs)
        out = torch.matmul(probs, repeat_kv(v, N // K))  # [B, N, T, D]
        return out.transpose(1, 2).reshape(B, T, N * D)  # [B, T, N·D]

    def verify_outputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What verification compares for one prompt [1, T]: rows of outputs [P, C], and targets or None."""
        return self(ids)[0], None

    def finish_streams(self, streams: list[Stream], prompts: list[torch.Tensor]) -> list[Rows]:
        """``verify_outputs`` of each prompt whose stream has run every layer (final norm, then the head)."""
        w = self.weights.get("model.norm.weight")
        return self.head_rows([rms_norm(s.h, w, self.config.rms_norm_eps) for s in streams], prompts)

    def head_rows(self, hs: list[torch.Tensor], prompts: list[torch.Tensor]) -> list[Rows]:
        """``verify_outputs`` from final-normed hidden states [1, T, H] of each prompt: the hidden states."""
        return [(h[0], None) for h in hs]


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
        return self.logits_all([h])[0]

    def logits_all(self, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``logits`` of each h, every chunk of the head's rows fetched once for all of them."""
        w = self.weights
        chunks: list[list[torch.Tensor]] = [[] for _ in hs]
        name = w.output_head()
        for start, rows in w.row_chunks(name, HEAD_CHUNK_ROWS):
            for out, y in zip(chunks, self.packer.linear(name, rows, hs, w.keeps(name))):  # kept: one chunk
                out.append(y)
        whole = [c[0] if len(c) == 1 else torch.cat(c, dim=-1) for c in chunks]  # [B, T, V] each
        updates = self.adapters.get("lm_head.weight", ())  # an adapter's head update, run unmerged
        if updates:  # the frozen head itself (the whole [V, H] cast) only for DoRA's norms or stacked updates
            frozen = len(updates) > 1 or any(u.magnitude is not None for u in updates)
            head = w.get(w.output_head()) if frozen else None
            whole = [adapted_linear(h, head, x, updates) for h, x in zip(hs, whole)]
        return [softcap_(x, self.config.final_logit_softcapping).float() for x in whole]  # x: ours to overwrite

    def verify_outputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self(ids)[0, :-1], ids[0, 1:]  # next-token predictions and their targets

    def head_rows(self, hs: list[torch.Tensor], prompts: list[torch.Tensor]) -> list[Rows]:
        return [(x[0, :-1], ids[0, 1:]) for x, ids in zip(self.logits_all(hs), prompts)]

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        """Greedy or sampled continuation with the hybrid KV cache; see :func:`reference.generate.generate`."""
        return generate(self, input_ids, max_new_tokens, **kwargs)


def adapted_linear(x: torch.Tensor, w: torch.Tensor | None, out: torch.Tensor,
                   updates: tuple[LowRank, ...]) -> torch.Tensor:
    """``out = x @ wᵀ`` [..., out] with each low-rank update applied in turn, unmerged (DoRA's norm is taken of the
    weight merged so far). ``w`` may be None for one plain LoRA update, which needs only ``out``."""
    for i, u in enumerate(updates):
        out = u.linear(x, w if i == 0 else merge_all(w, updates[:i]), out)
    return out


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
