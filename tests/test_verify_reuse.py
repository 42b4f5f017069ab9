"""Verification reuses A's computation for B where it is provably the same: a layer whose tensors are
bit-identical in both, fed bit-identical inputs, by models of the same function. The rows are those of running
B itself, bit for bit; the first differing layer ends the reuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.pipeline.convert import convert
from gemma2_convert.pipeline.lockstep import Lockstep
from gemma2_convert.pipeline.verify import verify
from reference.model import Gemma2ForCausalLM
from reference.weights import WeightStore, expected_shapes
from tests.conftest import TINY_CONFIGS

MODEL = Path(__file__).resolve().parent / "fixtures" / "gemma2-tiny-trained"
CFG = TINY_CONFIGS["gqa4"]


def _pair(changed: str | None) -> tuple[Gemma2ForCausalLM, Gemma2ForCausalLM]:
    g = torch.Generator().manual_seed(0)
    ta = {n: 0.1 * torch.randn(s, generator=g) for n, s in expected_shapes(CFG).items()}
    tb = {n: t + 0.5 if n == changed else t.clone() for n, t in ta.items()}
    return tuple(Gemma2ForCausalLM(CFG, WeightStore({n: LazyTensor.of(t) for n, t in ts.items()}, CFG,
                                                    torch.float32, resident=False)) for ts in (ta, tb))


@pytest.mark.parametrize("changed", [None, "model.layers.1.post_feedforward_layernorm.weight",
                                     "model.norm.weight"])
def test_reuse_gives_the_rows_of_running_b(changed):
    a, b = _pair(changed)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, CFG.vocab_size, (1, t), generator=g) for t in (9, 4)]
    alone = Lockstep(a, b, compare=True).run(prompts)
    reused = Lockstep(a, b, compare=True, share=True).run(prompts)
    for (xa, xb), (ya, yb) in zip(alone.rows, reused.rows):
        assert torch.equal(xa[0], ya[0]) and torch.equal(xb[0], yb[0])
    steps = CFG.num_hidden_layers + 1
    want = {None: steps, "model.layers.1.post_feedforward_layernorm.weight": 1,
            "model.norm.weight": steps - 1}
    assert reused.shared == want[changed] and alone.shared == 0
    assert (changed is None) == all(torch.equal(r[0][0], r[1][0]) for r in reused.rows)


def test_verify_of_a_lossless_copy_reuses_every_layer_and_says_so(tmp_path):
    copy = tmp_path / "copy.safetensors"
    convert(MODEL, copy, ConvertOptions(to="safetensors", verify=False))
    rep = verify(MODEL, copy, n_tokens=16)
    layers = 1 + rep.tensors_total // 11  # 11 tensors a layer, plus the embedding and final norm
    assert rep.passed and rep.max_abs_logits == 0 and rep.reused_layers == layers
    assert any(line.startswith("forward: B reused A's output") for line in rep.proof)
    fp32 = tmp_path / "fp32.safetensors"  # a cast: equal after the cast, not bit-identical: nothing reused
    convert(MODEL, fp32, ConvertOptions(to="safetensors", dtype="float32", verify=False))
    assert verify(MODEL, fp32, n_tokens=16).reused_layers == 0
