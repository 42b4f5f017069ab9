"""Verification's memory paths stream and give the whole-tensor results: a quantized GGUF's embedding is
decoded by rows (prompt lookup, comparison and tied head), never whole; ``--text`` figures are reduced
window by window, and a long prompt's head runs a few positions at a time."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import gemma2_convert.pipeline.compare as compare_mod
import gemma2_convert.pipeline.lockstep as lockstep_mod
import reference.model as model_mod
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats.gguf.file import TensorInfo
from gemma2_convert.formats.gguf.reader import dequantize, dequantize_rows
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.pipeline.compare import streamed_diff, tensor_diff
from gemma2_convert.pipeline.convert import convert
from gemma2_convert.pipeline.lockstep import Lockstep, LogitSums, logit_figures
from gemma2_convert.formats import open_checkpoint
from gemma2_convert.pipeline.verify import auto_tolerance, verify
from quant.gguf_codec import quantize_tensor
from quant.gguf_types import GGML_TYPES
from reference.model import Gemma2ForCausalLM
from reference.weights import WeightStore, expected_shapes
from tests.conftest import TINY_CONFIGS
from tests.test_reference_streaming import LargestFloat32

MODEL = Path(__file__).resolve().parent / "fixtures" / "gemma2-tiny-trained"  # vocab 2048, hidden 256


class OneTensor:
    """What ``dequantize`` reads from a GGUF file: ``raw(name)``, the tensor's bytes."""

    def __init__(self, raw: torch.Tensor) -> None:
        self._raw = raw.reshape(-1).numpy()

    def raw(self, name: str):
        return self._raw


@pytest.mark.parametrize("qtype", [t for t in GGML_TYPES if t not in ("F32", "F16", "BF16")])
def test_gguf_rows_decode_to_the_whole_tensors_rows(qtype):
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(1))
    raw = quantize_tensor(w, qtype)  # [40, row bytes]
    info = TensorInfo("token_embd.weight", (256, 40), qtype, 0, 0, raw.numel())
    f = OneTensor(raw)
    whole = dequantize(f, info)
    for start, stop in ((0, 1), (7, 8), (3, 19), (32, 48)):  # the last runs past the end
        assert torch.equal(dequantize_rows(f, info, start, stop), whole[start:stop]), (qtype, start, stop)


def _rows_only(t: torch.Tensor) -> LazyTensor:
    """A lazy tensor that must be read by rows: ``load`` fails."""
    def whole() -> torch.Tensor:
        raise AssertionError("decoded whole")
    return LazyTensor(tuple(t.shape), t.dtype, whole, rows=lambda a, b: t[a:b].clone())


@pytest.mark.parametrize("case", ["equal", "cast", "lossy"])
def test_streamed_diff_equals_tensor_diff(case, monkeypatch):
    monkeypatch.setattr(compare_mod, "COMPARE_ELEMENTS", 1000)  # several row blocks
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=g)
    noisy = x + 1e-3 * torch.randn(300, 64, generator=g)
    y = {"equal": x.clone(), "cast": x.to(torch.bfloat16), "lossy": noisy}[case]
    want = tensor_diff("w", x, y)
    got = streamed_diff("w", LazyTensor.of(x), _rows_only(y))
    assert got == want, (got, want)
    assert want.equal == (case != "lossy")


def test_logit_sums_equal_the_figures_of_all_rows_at_once():
    g = torch.Generator().manual_seed(0)
    rows = []
    for t in (5, 17, 1):
        pa = 3 * torch.randn(t, 300, generator=g)
        tgt, pb = torch.randint(0, 300, (t,), generator=g), pa + 0.3 * torch.randn(t, 300, generator=g)
        rows.append(((pa, tgt), (pb, None)))
    pa, pb = torch.cat([r[0][0] for r in rows]), torch.cat([r[1][0] for r in rows])
    tgt = torch.cat([r[0][1] for r in rows])
    whole = logit_figures([((pa, tgt), (pb, None))])
    sums = LogitSums()
    for r in rows:
        sums.add(r)
    got = sums.figures()
    assert got["tokens"] == whole["tokens"] == 23 and got["max_abs_logits"] == whole["max_abs_logits"]
    assert got["top1"] == whole["top1"] < 1
    for k in ("mean_kl", "ppl_a", "ppl_b"):
        assert math.isclose(got[k], whole[k], rel_tol=1e-12), (k, got[k], whole[k])


@pytest.fixture(scope="module")
def q8(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q8") / "q8_0.gguf"
    convert(MODEL, out, ConvertOptions(to="gguf", gguf_type="q8_0", verify=False))
    return out


def test_verify_never_decodes_a_quantized_embedding_whole(q8, monkeypatch):
    """With budgets scaled down to the tiny model (the embedding does not fit HOLD_BUDGET, as at 2B–27B),
    verify reads the Q8_0 embedding by rows for the lookup, the comparison and the head; its report equals the
    one that holds the decoded embedding."""
    tol = auto_tolerance(open_checkpoint(MODEL), open_checkpoint(q8))  # Q8_0's bounds, as `verify` judges it
    held = verify(MODEL, q8, tolerance=tol, n_tokens=24, resident=False)
    monkeypatch.setattr(lockstep_mod, "HOLD_BUDGET", 1 << 20)  # the decoded embedding pair is 3 MB
    monkeypatch.setattr(model_mod, "HEAD_CHUNK_ROWS", 256)
    monkeypatch.setattr(compare_mod, "COMPARE_ELEMENTS", 256 * 256)
    with LargestFloat32() as probe:
        streamed = verify(MODEL, q8, tolerance=tol, n_tokens=24, resident=False)
    embed = 2048 * 256
    assert probe.largest < embed // 2, f"a float32 tensor of {probe.largest} elements (embedding: {embed})"
    assert held.passed and streamed.passed and held.tensors_equal < held.tensors_total
    assert streamed.to_json() == held.to_json()


def test_long_prompts_head_runs_in_pieces_with_the_same_rows(monkeypatch):
    """A causal LM's head runs a few positions at a time (``LOGIT_BUDGET``), pieces of several prompts per
    call; the rows equal a whole forward's (to GEMM rounding), and a sink receives every position once."""
    cfg = TINY_CONFIGS["gqa4"]
    g = torch.Generator().manual_seed(0)
    tensors = {n: LazyTensor.of(0.1 * torch.randn(s, generator=g)) for n, s in expected_shapes(cfg).items()}
    store = lambda: WeightStore(tensors, cfg, torch.float32, resident=False)  # noqa: E731
    a, b = Gemma2ForCausalLM(cfg, store()), Gemma2ForCausalLM(cfg, store())
    prompts = [torch.randint(3, cfg.vocab_size, (1, t), generator=g) for t in (13, 2, 7)]
    monkeypatch.setattr(lockstep_mod, "LOGIT_BUDGET", 2 * 4 * cfg.vocab_size * 4)  # 4 positions a call
    run = Lockstep(a, b, compare=True).run(prompts)
    for ids, (ra, rb) in zip(prompts, run.rows):
        alone = a.verify_outputs(ids)
        assert torch.allclose(ra[0], alone[0], rtol=0, atol=1e-5)  # a GEMM of fewer rows may round otherwise
        assert torch.equal(ra[0], rb[0])
        assert torch.equal(ra[1], alone[1]) and torch.equal(rb[1], alone[1])
    sums = LogitSums()
    Lockstep(a, b, compare=False).run(prompts, lambda k, rows: sums.add(rows))
    assert sums.tokens == sum(t.shape[1] - 1 for t in prompts) and sums.figures()["max_abs_logits"] == 0


@pytest.mark.parametrize("gguf_type", ["q4_0", "q4_1", "q5_1", "q8_0", "q4_k_m"])
def test_gguf_reader_rows_equal_its_load(gguf_type, tmp_path):
    """The reader's ``rows`` decode as its ``load`` does, op for op (block types: through their codes)."""
    out = tmp_path / f"{gguf_type}.gguf"
    convert(MODEL, out, ConvertOptions(to="gguf", gguf_type=gguf_type, verify=False))
    embed = open_checkpoint(out).tensors["model.embed_tokens.weight"]
    assert embed.rows is not None
    whole = embed.load()
    for start, stop in ((0, 1), (5, 6), (100, 400), (2000, 2100)):
        assert torch.equal(embed.rows(start, stop), whole[start:stop]), (gguf_type, start, stop)
