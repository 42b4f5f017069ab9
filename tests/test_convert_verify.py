"""A conversion's own verification (``pipeline.convert.verify_plan``): a lossless plan confirms its logits on
a few tokens in the fast mode, because its verdict already demands equal tensors and configs (and those give
equal logits by construction); a cast or quantized plan measures its logits on 64 tokens in float32. Wrong
lossless conversions still fail, by what they changed; the source's checksums run beside the write."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import gemma2_convert.formats.hf as hf_mod
from gemma2_convert.core.errors import VerificationError
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.formats.tolerance import Tolerance
from gemma2_convert.pipeline.convert import (
    LOSSLESS_TOKENS,
    LOSSY_TOKENS,
    convert,
    verify_plan,
)

MODEL = Path(__file__).resolve().parent / "fixtures" / "gemma2-tiny-trained"  # a tokenizer: two prompts


def test_the_plan_follows_the_tolerance():
    opts = ConvertOptions()
    assert verify_plan(Tolerance(), opts) == (LOSSLESS_TOKENS, "fast")
    assert verify_plan(Tolerance.cast(), opts) == (LOSSY_TOKENS, "exact")
    assert verify_plan(Tolerance.lossy(0.05, 0.9), opts) == (LOSSY_TOKENS, "exact")
    assert verify_plan(Tolerance(), ConvertOptions(n_tokens=32)) == (32, "fast")


def test_a_lossless_conversion_confirms_on_a_few_tokens(tmp_path):
    res = convert(MODEL, tmp_path / "out", ConvertOptions(to="hf"))
    rep = res.report
    assert rep is not None and rep.passed and rep.tensors_equal == rep.tensors_total
    assert rep.compute == "bfloat16" and rep.tokens == 2 * (LOSSLESS_TOKENS - 1) and rep.max_abs_logits == 0
    assert rep.reused_layers == 4 + 1  # every decoder layer and the head: the same computation
    assert any(line.startswith("check: a lossless conversion") for line in rep.proof), rep.proof


def test_a_cast_measures_its_logits_in_float32(tmp_path):
    rep = convert(MODEL, tmp_path / "out", ConvertOptions(to="hf", dtype="float16")).report
    assert rep is not None and rep.passed and rep.compute == "float32"
    assert rep.tokens == 2 * (LOSSY_TOKENS - 1) and rep.max_abs_logits > 0


def _broken_writer(monkeypatch, items=None, config=None) -> None:
    """The HF writer, with its tensors (``items``: a function of the list) or config changed."""
    real = hf_mod.write_hf_dir

    def write(out, cfg, its, **kw):
        return real(out, config(cfg) if config else cfg, items(its) if items else its, **kw)

    monkeypatch.setattr(hf_mod, "write_hf_dir", write)


def test_a_lossless_conversion_with_one_layers_norms_off_by_one_fails(tmp_path, monkeypatch):
    def off_by_one(items):
        return [(n, t.map(lambda x: x + 1) if n.startswith("model.layers.1.") and "norm" in n else t)
                for n, t in items]

    _broken_writer(monkeypatch, items=off_by_one)
    with pytest.raises(VerificationError, match=r"4 tensor\(s\) differ, worst model\.layers\.1\..*norm"):
        convert(MODEL, tmp_path / "out", ConvertOptions(to="hf"))
    assert not (tmp_path / "out").exists()


def test_a_lossless_conversion_with_q_and_k_in_the_other_rope_layout_fails(tmp_path, monkeypatch):
    def interleave(w: torch.Tensor, heads: int) -> torch.Tensor:  # half-split rows → interleaved pairs
        out, inn = w.shape
        return w.view(heads, 2, out // heads // 2, inn).transpose(1, 2).reshape(out, inn)

    def swapped(items):  # the Llama converter's permute, misapplied to layer 0
        heads = {"q_proj": 4, "k_proj": 2}
        def permuted(name: str, t):
            kind = name.split(".")[-2]
            if not name.startswith("model.layers.0.self_attn.") or kind not in heads:
                return t
            return t.map(lambda x: interleave(x, heads[kind]))

        return [(n, permuted(n, t)) for n, t in items]

    _broken_writer(monkeypatch, items=swapped)
    with pytest.raises(VerificationError, match=r"2 tensor\(s\) differ, worst model\.layers\.0\.self_attn"):
        convert(MODEL, tmp_path / "out", ConvertOptions(to="hf"))


@pytest.mark.parametrize("change,field", [({"final_logit_softcapping": None}, "final_logit_softcapping"),
                                          ({"query_pre_attn_scalar": 64}, "query_pre_attn_scalar")])
def test_a_lossless_conversion_with_a_wrong_config_fails(tmp_path, monkeypatch, change, field):
    _broken_writer(monkeypatch, config=lambda cfg: cfg.replace(**change))
    with pytest.raises(VerificationError, match=f"configs differ in what the forward pass reads: {field}"):
        convert(MODEL, tmp_path / "out", ConvertOptions(to="hf"))


def test_source_checksums_run_beside_the_write(tmp_path, monkeypatch):
    """The source's integrity check starts before the write and its failure fails the conversion after it."""
    from gemma2_convert.core.errors import FormatError
    from gemma2_convert.formats.registry import READERS

    order: list[str] = []
    real_write = hf_mod.write_hf_dir

    def write(*a, **kw):
        order.append("write")
        return real_write(*a, **kw)

    def integrity(ckpt):
        order.append("checksums")
        raise FormatError("corrupt data (Bad CRC-32 for file 'x')", ckpt.path)

    monkeypatch.setattr(hf_mod, "write_hf_dir", write)
    monkeypatch.setitem(READERS, "hf", dataclasses.replace(READERS["hf"], integrity=integrity))
    with pytest.raises(FormatError, match="corrupt data"):
        convert(MODEL, tmp_path / "out", ConvertOptions(to="hf"))
    assert sorted(order) == ["checksums", "write"] and not (tmp_path / "out").exists()
