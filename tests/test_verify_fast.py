"""verify's fast mode (bfloat16 forward) and lockstep: the stated error bound, wrong conversions still caught.

A lossless conversion computes identical logits in either mode; a wrong one must fail in the fast mode too,
and by a logit difference far above the fast mode's own rounding noise (``FAST_BOUND``), so the forward
pass — not only the tensor or config comparison — still sees each mistake.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats import open_checkpoint
from gemma2_convert.formats.tolerance import Tolerance
from gemma2_convert.pipeline.compute import FAST_BOUND, fast_tolerance
from gemma2_convert.pipeline.lockstep import Lockstep, logit_figures
from gemma2_convert.pipeline.verify import (
    default_prompts,
    reference_model,
    text_prompts,
    verify,
    verify_paths,
)
from reference import (
    Gemma2ForSequenceClassification,
    Gemma2ForTokenClassification,
    Gemma2Model,
)
from reference.weights import WeightStore, expected_shapes
from tests.conftest import TINY_CONFIGS

MODEL = Path(__file__).parent / "fixtures" / "gemma2-tiny-trained"
EVAL = Path(__file__).parent / "fixtures" / "eval.txt"


def _variant(tmp: Path, name: str, tensors=None, config=None) -> Path:
    """A copy of the trained fixture with its tensors (dict edited in place) or config.json changed."""
    d = tmp / name
    shutil.copytree(MODEL, d)
    if tensors is not None:
        sd = load_file(MODEL / "model.safetensors")
        tensors(sd)
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        cfg = json.loads((MODEL / "config.json").read_text())
        cfg.update(config)
        (d / "config.json").write_text(json.dumps(cfg))
    return d


def _fails_in_fast_mode(b: Path) -> None:
    rep = verify_paths(MODEL, b, compute="fast")
    assert rep.compute == "bfloat16" and not rep.passed, rep.failures
    noise = FAST_BOUND["max_abs_logits"]
    assert rep.max_abs_logits > noise, f"max |Δ logits| {rep.max_abs_logits:.3g}: within bf16 noise {noise}"


@pytest.mark.slow
def test_fast_mode_error_bound():
    """Fast against exact logits of one trained model: the default prompts and 8 windows of eval.txt."""
    ck = open_checkpoint(MODEL)
    exact, fast = reference_model(ck, torch.float32, False), reference_model(ck, torch.bfloat16, False)
    prompts = default_prompts(ck, 64) + text_prompts(ck, EVAL.read_text(encoding="utf-8"))[:8]
    m = logit_figures([(exact.verify_outputs(p), fast.verify_outputs(p)) for p in prompts])
    print(f"fast vs exact: {m}")
    assert m["max_abs_logits"] <= FAST_BOUND["max_abs_logits"], m
    assert m["mean_kl"] <= FAST_BOUND["mean_kl"], m
    assert m["top1"] >= FAST_BOUND["top1"], m
    assert abs(m["ppl_b"] / m["ppl_a"] - 1) <= FAST_BOUND["ppl_rel"], m


@pytest.mark.slow
def test_fast_mode_lossless_is_identical_and_lossy_verdict_matches(tmp_path):
    same = _variant(tmp_path, "same")
    rep = verify_paths(MODEL, same, compute="fast")
    assert rep.passed and rep.max_abs_logits == 0.0 and rep.tensors_equal == rep.tensors_total

    def noise(sd):  # a gentle "quantization": 2 % relative noise on every projection
        g = torch.Generator().manual_seed(0)
        for k in [k for k in sd if "proj" in k]:
            t = sd[k].float()
            sd[k] = (t + 0.02 * t.std() * torch.randn(t.shape, generator=g)).to(sd[k].dtype)

    lossy, tol = _variant(tmp_path, "noise", noise), Tolerance.lossy(0.05, 0.9)
    ex, fa = verify(MODEL, lossy, tolerance=tol), verify(MODEL, lossy, tolerance=fast_tolerance(tol),
                                                          dtype=torch.bfloat16)
    assert ex.passed and fa.passed
    assert abs(fa.mean_kl - ex.mean_kl) <= FAST_BOUND["mean_kl"], (ex.mean_kl, fa.mean_kl)
    assert abs(fa.top1 - ex.top1) <= 1 - FAST_BOUND["top1"], (ex.top1, fa.top1)


def test_fast_mode_catches_one_layers_norms_off_by_one(tmp_path):
    def off_by_one(sd):  # layer 1's norms stored with the +1 (GGUF's convention) on an HF checkpoint
        for k in [k for k in sd if k.startswith("model.layers.1.") and "norm" in k]:
            sd[k] = (sd[k].float() + 1).to(sd[k].dtype)

    _fails_in_fast_mode(_variant(tmp_path, "norms", off_by_one))


def test_fast_mode_catches_swapped_qk_rope_layout(tmp_path):
    def interleave(w: torch.Tensor, heads: int) -> torch.Tensor:  # half-split rows → interleaved pairs
        out, inn = w.shape
        return w.view(heads, 2, out // heads // 2, inn).transpose(1, 2).reshape(out, inn)

    def swapped(sd):  # q/k rows in the other RoPE layout (the Llama converter's permute, misapplied)
        for i in range(4):
            p = f"model.layers.{i}.self_attn."
            sd[p + "q_proj.weight"] = interleave(sd[p + "q_proj.weight"], 4)
            sd[p + "k_proj.weight"] = interleave(sd[p + "k_proj.weight"], 2)

    _fails_in_fast_mode(_variant(tmp_path, "qk", swapped))


def test_fast_mode_catches_a_wrong_query_scale(tmp_path):
    _fails_in_fast_mode(_variant(tmp_path, "qscale", config={"query_pre_attn_scalar": 64}))  # H / N, not 128


def test_fast_mode_catches_a_missing_softcap(tmp_path):
    _fails_in_fast_mode(_variant(tmp_path, "softcap", config={"final_logit_softcapping": None}))


class CountingLoads:
    """Wraps every lazy tensor of a checkpoint to count its loads."""

    def __init__(self, tensors: dict[str, LazyTensor]) -> None:
        self.count: dict[str, int] = dict.fromkeys(tensors, 0)
        for name, lt in tensors.items():
            tensors[name] = LazyTensor(lt.shape, lt.dtype, self._thunk(name, lt), lt.stored_nbytes)

    def _thunk(self, name: str, lt: LazyTensor):
        def load() -> torch.Tensor:
            self.count[name] += 1
            return lt.load()
        return load


def test_lockstep_reads_each_layer_once(tmp_path):
    ca, cb = open_checkpoint(MODEL), open_checkpoint(_variant(tmp_path, "same"))
    counters = CountingLoads(ca.tensors), CountingLoads(cb.tensors)
    rep = verify(ca, cb, resident=False)
    assert rep.passed
    for c in counters:
        layers = {n: k for n, k in c.count.items() if n.startswith("model.layers.")}
        assert set(layers.values()) == {1}, layers
        # each prompt's embedding rows at the start (a view of the mapped file), then the comparison and head
        assert c.count["model.embed_tokens.weight"] == 2 + 1


@pytest.mark.parametrize("cls", [Gemma2Model, Gemma2ForSequenceClassification, Gemma2ForTokenClassification])
def test_lockstep_outputs_equal_one_prompt_at_a_time(cls):
    cfg = TINY_CONFIGS["gqa4"].replace(architectures=(cls.__name__,), id2label={"0": "a", "1": "b", "2": "c"})
    g = torch.Generator().manual_seed(0)
    tensors = {n: LazyTensor.of(0.1 * torch.randn(s, generator=g)) for n, s in expected_shapes(cfg).items()}
    a = cls(cfg, WeightStore(tensors, cfg, torch.float32, resident=False))
    b = cls(cfg, WeightStore(tensors, cfg, torch.float32, resident=False))
    prompts = [torch.randint(3, cfg.vocab_size, (1, t), generator=g) for t in (5, 9)]
    run = Lockstep(a, b, compare=True).run(prompts)
    assert run.tensors_equal == len(tensors)
    for ids, (ra, rb) in zip(prompts, run.rows):
        alone = a.verify_outputs(ids)
        assert torch.equal(ra[0], alone[0]) and torch.equal(rb[0], alone[0])
