"""What makes verification run at the speed of the disk, each kept exact: tensors compared byte for byte
(``same_bytes``), streamed casts into reused memory (the head a cache-sized slice at a time, a held layer's
weights into a ``CastPool``), and a shared head output reduced once. Every result is bit-identical to the
plain computation."""

from __future__ import annotations

import math

import pytest
import torch

import gemma2_convert.pipeline.compare as compare_mod
import reference.weights as weights_mod
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.pipeline.compare import same_bytes, tensor_diff
from gemma2_convert.pipeline.lockstep import Lockstep, LogitSums, logit_figures
from reference.model import Gemma2ForCausalLM
from reference.weights import CastPool, WeightStore, expected_shapes
from tests.conftest import TINY_CONFIGS

CFG = TINY_CONFIGS["gqa4"]


def _bf16_tensors(seed: int = 0) -> dict[str, LazyTensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: LazyTensor.of((0.1 * torch.randn(s, generator=g)).bfloat16())
            for n, s in expected_shapes(CFG).items()}


def _model(tensors: dict[str, LazyTensor], resident: bool) -> Gemma2ForCausalLM:
    return Gemma2ForCausalLM(CFG, WeightStore(tensors, CFG, torch.float32, resident=resident))


def test_same_bytes_compares_every_part(monkeypatch):
    monkeypatch.setattr(compare_mod, "SPLIT_BYTES", 64)  # several threads' parts even for a small tensor
    torch.set_num_threads(max(2, torch.get_num_threads()))
    x = torch.randn(40, 33).bfloat16()
    assert same_bytes(x, x.clone())
    for i in (0, x.numel() // 2, x.numel() - 1):  # a difference in the first, a middle and the last part
        y = x.clone()
        y.view(-1)[i] += 1
        assert not same_bytes(x, y), i
    assert not same_bytes(x, x.float()) and not same_bytes(x.t(), x.t().clone())  # undecided: values decide
    zeros, negative = torch.zeros(8), -torch.zeros(8)
    assert not same_bytes(zeros, negative) and tensor_diff("w", zeros, negative).equal  # -0.0 equals 0.0


def test_streamed_head_in_cache_sized_slices_is_bit_identical(monkeypatch):
    monkeypatch.setattr(weights_mod, "CAST_SLICE_BYTES", 64 * CFG.hidden_size * 4)  # slices of 64 rows
    cfg = CFG.replace(vocab_size=1000)  # 14 slices of 64 rows, then 104: a remainder of 40 joins the last
    g = torch.Generator().manual_seed(0)
    tensors = {n: LazyTensor.of((0.1 * torch.randn(s, generator=g)).bfloat16())
               for n, s in expected_shapes(cfg).items()}
    streamed, resident = (Gemma2ForCausalLM(cfg, WeightStore(tensors, cfg, torch.float32, resident=r))
                          for r in (False, True))
    slices = list(streamed.weights.row_chunks("model.embed_tokens.weight", 32768))
    assert [(s, t.shape[0]) for s, t in slices] == [(64 * k, 64) for k in range(14)] + [(896, 104)]
    assert len({t.data_ptr() for _, t in slices}) == 1  # one buffer for every slice
    ids = torch.randint(3, cfg.vocab_size, (1, 11), generator=g)
    got, want = streamed(ids), resident(ids)
    assert torch.equal(got, want), f"max |Δ| {(got - want).abs().max().item()}"


def test_held_layers_cast_into_the_same_pool_buffers(monkeypatch):
    tensors = _bf16_tensors()
    a, b = _model(tensors, False), _model(tensors, False)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, CFG.vocab_size, (1, t), generator=g) for t in (9, 4)]
    run = Lockstep(a, b, compare=True).run(prompts)  # B computes too: both models' casts use the pool
    layer = sum(math.prod(s) * 4 for n, s in expected_shapes(CFG).items() if n.startswith("model.layers.0."))
    pool = a.weights.pool
    assert pool is b.weights.pool and 0 < pool.kept <= 2 * layer  # a layer of each model, reused by the next
    for ids, (ra, rb) in zip(prompts, run.rows):
        alone = _model(tensors, True).verify_outputs(ids)
        assert torch.equal(ra[0], alone[0]) and torch.equal(rb[0], alone[0])
    import gemma2_convert.pipeline.lockstep as lockstep_mod

    monkeypatch.setattr(lockstep_mod, "CAST_BUDGET", 0)  # no buffers: every cast fresh, the same rows
    c, d = _model(tensors, False), _model(tensors, False)
    again = Lockstep(c, d, compare=True).run(prompts)
    assert c.weights.pool.kept == 0
    assert all(torch.equal(x[0][0], y[0][0]) for x, y in zip(run.rows, again.rows))


def test_cast_pool_lends_until_release_and_keeps_its_budget():
    pool = CastPool(budget=3 * 4 * 10)
    first = pool.take((3, 10), torch.float32)
    assert first is not None and pool.take((3, 10), torch.float32) is None  # the budget is spent
    pool.give_back([first])
    assert pool.take((3, 10), torch.float32) is first and pool.take((2, 10), torch.float32) is None
    store = WeightStore(_bf16_tensors(), CFG, torch.float32, resident=False)
    store.pool = CastPool(1 << 20)
    name = "model.layers.0.mlp.up_proj.weight"
    outside = store.get(name)
    store.hold({})
    inside, other = store.get(name), store.get("model.layers.0.mlp.gate_proj.weight")
    assert torch.equal(inside, outside) and inside.data_ptr() != other.data_ptr()  # each get its own buffer
    store.release()
    store.hold({})
    assert store.get(name).data_ptr() in (inside.data_ptr(), other.data_ptr())  # reused after release


def test_logit_sums_of_a_shared_head_output_equal_computing_them():
    g = torch.Generator().manual_seed(3)
    logits, tgt = torch.randn(6, 50, generator=g), torch.randint(0, 50, (6,), generator=g)
    shared, computed = LogitSums(), LogitSums()
    shared.add(((logits, tgt), (logits, tgt)))
    computed.add(((logits, tgt), (logits.clone(), tgt)))
    assert shared.figures() == computed.figures() == logit_figures([((logits, tgt), (logits.clone(), tgt))])
    bad = logits.clone()
    bad[2, 7] = math.nan
    nan = LogitSums()
    nan.add(((bad, tgt), (bad, tgt)))
    assert math.isnan(nan.figures()["mean_kl"])  # not finite is still reported, as computing it would


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_lockstep_of_bf16_weights_equals_each_model_alone(compute):
    tensors, changed = _bf16_tensors(0), _bf16_tensors(0)
    name = "model.layers.1.mlp.down_proj.weight"
    changed[name] = LazyTensor.of(changed[name].load() + 0.5)
    a, b = (Gemma2ForCausalLM(CFG, WeightStore(t, CFG, compute, resident=False)) for t in (tensors, changed))
    ids = torch.randint(3, CFG.vocab_size, (1, 10), generator=torch.Generator().manual_seed(4))
    run = Lockstep(a, b, compare=True, share=True).run([ids])
    (ra, rb), = run.rows
    for rows, t in ((ra, tensors), (rb, changed)):
        alone = Gemma2ForCausalLM(CFG, WeightStore(t, CFG, compute, resident=True)).verify_outputs(ids)
        assert torch.equal(rows[0], alone[0])
    assert run.shared == 1 and run.tensors_equal == len(tensors) - 1
