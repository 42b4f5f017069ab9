"""The hybrid KV cache against recomputation, and greedy generation against transformers."""

from __future__ import annotations

import pytest
import torch

from reference import Gemma2ForCausalLM, HybridCache
from tests.conftest import TINY_CONFIGS, hf_state_dict, make_hf_model, with_slow


def _model(name: str, seed: int = 0):
    cfg = TINY_CONFIGS[name]
    hf = make_hf_model(cfg, seed=seed)
    return cfg, hf, Gemma2ForCausalLM.from_tensors(cfg, hf_state_dict(hf))


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("prefill", [3, 13])  # shorter and longer than the window
def test_cached_steps_equal_recomputation(name, prefill):
    """Feeding tokens one step at a time through the cache gives the logits of a full forward,
    across several window boundaries."""
    cfg, _, model = _model(name)
    T = prefill + 3 * cfg.sliding_window
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(2))
    full = model(ids)
    cache = HybridCache(cfg)
    steps = [model(ids[:, :prefill], cache=cache)]
    for t in range(prefill, T):
        steps.append(model(ids[:, t:t + 1], cache=cache))
    got = torch.cat(steps, dim=1)
    d = (got - full).abs().max().item()
    assert d <= 1e-4, f"max |Δ| {d:.3e} between cached and recomputed logits"


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_cached_steps_equal_transformers_bitwise(name):
    """Prefill then one token at a time past the window twice: every step's fp32 logits equal transformers'
    with its cache, bit for bit (the sliding cache keeps keys in arrival order, as transformers does)."""
    cfg, hf, model = _model(name, seed=3)
    T = 8 + 2 * cfg.sliding_window
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(4))
    theirs, ours, hf_cache, cache = [], [], None, HybridCache(cfg)
    with torch.no_grad():
        for a, b in [(0, 5), *((t, t + 1) for t in range(5, T))]:
            out = hf(ids[:, a:b], past_key_values=hf_cache, use_cache=True)
            theirs.append(out.logits)
            hf_cache = out.past_key_values
            ours.append(model(ids[:, a:b], cache=cache))
    bad = [i for i, (x, y) in enumerate(zip(ours, theirs)) if not torch.equal(x, y)]
    first = (ours[bad[0]] - theirs[bad[0]]).abs().max().item() if bad else 0.0
    assert not bad, f"steps {bad} differ; the first by max |Δ| {first:.3e}"


def test_sliding_cache_memory_is_bounded():
    cfg, _, model = _model("gqa2")
    cache = HybridCache(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 5 * cfg.sliding_window))
    model(ids, cache=cache)
    assert cache.layers[0].k.shape[2] == cfg.sliding_window - 1  # sliding: all a later query can see
    assert cache.layers[1].k.shape[2] == ids.shape[1]  # global: everything


@pytest.mark.parametrize("name", with_slow(sorted(TINY_CONFIGS), "gqa2", "gqa4"))  # mha stays fast
def test_greedy_matches_transformers_generate(name):
    cfg, hf, model = _model(name, seed=7)
    ids = torch.randint(3, cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=40, do_sample=False)
    got = model.generate(ids, max_new_tokens=40)
    assert got.shape == ref.shape, f"lengths differ: ours {got.shape[1]}, transformers {ref.shape[1]}"
    assert torch.equal(got, ref), f"first difference at step {(got != ref).nonzero()[0].tolist()}"


@pytest.mark.slow
def test_greedy_left_padded_batch_matches_transformers():
    cfg, hf, model = _model("gqa2", seed=9)
    ids = torch.randint(3, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(10))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = cfg.pad_token_id, 0
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    got = model.generate(ids, max_new_tokens=40, attention_mask=mask)
    assert torch.equal(got, ref), f"ours {got.tolist()}\ntransformers {ref.tolist()}"
    alone = model.generate(ids[:1, 3:], max_new_tokens=40)
    assert torch.equal(got[0, 3:3 + alone.shape[1]], alone[0])


def test_cache_and_no_cache_generate_alike():
    cfg, _, model = _model("mha", seed=11)
    ids = torch.randint(3, cfg.vocab_size, (2, 4))
    assert torch.equal(model.generate(ids, 30), model.generate(ids, 30, use_cache=False))


def test_sampling_is_seeded():
    cfg, _, model = _model("gqa4", seed=12)
    ids = torch.randint(3, cfg.vocab_size, (1, 4))
    a = model.generate(ids, 20, do_sample=True, temperature=0.8, top_k=10, seed=123)
    b = model.generate(ids, 20, do_sample=True, temperature=0.8, top_k=10, seed=123)
    c = model.generate(ids, 20, do_sample=True, temperature=0.8, top_k=10, seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
