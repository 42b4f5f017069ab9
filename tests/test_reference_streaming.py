"""Streaming (``resident=False``): a forward in float32 over bf16 weights never makes a float32 copy of the
embedding — the lookup reads only the prompt's rows and the tied output head is cast a block of rows at a
time — and its logits equal those of the resident model. Verification compares tensors in row blocks."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import reference.model as model_mod
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats.synthetic import random_tensors
from gemma2_convert.pipeline.verify import tensor_diff
from quant.metrics import sqnr_db
from reference import Gemma2ForCausalLM
from reference.config import Gemma2Config

CFG = Gemma2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                   sliding_window=8, max_position_embeddings=128, torch_dtype="bfloat16")


class LargestFloat32(TorchFunctionMode):
    """Records the element count of the largest float32 tensor any torch call returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.fixture
def weights() -> dict[str, LazyTensor]:
    return {k: LazyTensor.of(v.load()) for k, v in random_tensors(CFG, 0, torch.bfloat16).items()}


def test_streaming_forward_never_casts_the_whole_embedding(weights, monkeypatch):
    monkeypatch.setattr(model_mod, "HEAD_CHUNK_ROWS", 256)
    ids = torch.randint(0, CFG.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    streaming = Gemma2ForCausalLM.from_tensors(CFG, weights, torch.float32, resident=False)
    with LargestFloat32() as probe:
        logits = streaming(ids)
    embed = CFG.vocab_size * CFG.hidden_size
    assert probe.largest < embed // 2, f"a float32 tensor of {probe.largest} elements (embedding: {embed})"
    assert streaming.weights._cache == {}, "a streaming store kept weights"
    resident = Gemma2ForCausalLM.from_tensors(CFG, weights, torch.float32, resident=True)
    with LargestFloat32() as probe:
        expected = resident(ids)
    assert probe.largest >= embed  # the resident model does cast it (once), which the probe must see
    assert torch.equal(logits, expected), f"max |Δ| {(logits - expected).abs().max().item()}"


def test_tensor_diff_in_row_blocks_matches_whole_tensor_metrics(monkeypatch):
    import gemma2_convert.pipeline.compare as compare_mod

    monkeypatch.setattr(compare_mod, "COMPARE_ELEMENTS", 100)  # many blocks of 3 rows
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 33, generator=g)
    assert tensor_diff("w", x, x.to(torch.bfloat16)).equal
    y = x + 1e-3 * torch.randn(50, 33, generator=g)
    d = tensor_diff("w", x, y)
    assert not d.equal
    assert d.sqnr_db == pytest.approx(sqnr_db(x, y), rel=1e-9)
    assert d.max_abs == pytest.approx((x - y).abs().max().item(), rel=1e-6)
