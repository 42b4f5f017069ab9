"""Token generation with the hybrid KV cache: greedy, or temperature / top-k sampling with a seed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from reference.cache import HybridCache

if TYPE_CHECKING:
    from reference.model import Gemma2ForCausalLM


def pick_next(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, gen: torch.Generator | None,
) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / max(temperature, 1e-5)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)[:, 0]


@torch.inference_mode()
def generate(
    model: Gemma2ForCausalLM, input_ids: torch.Tensor, max_new_tokens: int, *,
    attention_mask: torch.Tensor | None = None, do_sample: bool = False, temperature: float = 1.0,
    top_k: int | None = None, seed: int | None = None, eos_token_id: int | tuple[int, ...] | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Return input_ids [B, T] followed by up to ``max_new_tokens`` new ids [B, T + new].

    A row that emits an end-of-sequence id is continued with the pad id; generation stops when
    every row has finished. ``use_cache=False`` recomputes the whole sequence at each step (slow;
    a check of the cache). Left padding is handled through ``attention_mask``.
    """
    c = model.config
    eos = set(c.eos_token_ids if eos_token_id is None else
              ((eos_token_id,) if isinstance(eos_token_id, int) else eos_token_id))
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    B = input_ids.shape[0]
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    cache = HybridCache(c) if use_cache else None
    seq, step_ids = input_ids, input_ids
    done = torch.zeros(B, dtype=torch.bool)
    for _ in range(max_new_tokens):
        if cache is None:
            logits = model(seq, attention_mask=mask)
        else:
            logits = model(step_ids, attention_mask=mask, cache=cache)
        nxt = pick_next(logits[:, -1], do_sample, temperature, top_k, gen)  # [B]
        nxt = torch.where(done, torch.full_like(nxt, c.pad_token_id), nxt)
        done |= torch.tensor([int(t) in eos for t in nxt])
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
        step_ids = nxt[:, None]
        if bool(done.all()):
            break
    return seq
