"""gemma2-quantize --format gguf on the trained fixture, run by llama.cpp against llama.cpp's own Q4_0.

Every KL here is measured in llama.cpp: each quantized GGUF's logits against llama.cpp's logits on the
F32 GGUF of the same model, over held-out text (tests/fixtures/eval.txt).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gemma2_convert.formats import open_checkpoint
from gemma2_convert.formats.gguf.file import GGUFFile
from gemma2_convert.pipeline.gguf import to_gguf
from gemma2_convert.pipeline.llama_runner import llama_cpp_logits, llama_quantize
from gemma2_convert.pipeline.quality import eval_prompts
from gemma2_convert.pipeline.quantize import QuantizeOptions, quantize_checkpoint
from quant.metrics import kl_divergence

FIX = Path(__file__).parent / "fixtures"
MODEL, CAL, EVAL = FIX / "gemma2-tiny-trained", FIX / "calibration.txt", FIX / "eval.txt"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    import llama_cpp  # noqa: F401  (a real client of the test extra: missing is a failure, not a skip)
    d = tmp_path_factory.mktemp("q4")
    to_gguf(MODEL, d / "f32.gguf", type_name="f32")
    llama_quantize(d / "f32.gguf", d / "llama_q4_0.gguf", "Q4_0")
    llama_quantize(d / "f32.gguf", d / "llama_q4_0_bf16emb.gguf", "Q4_0", token_embedding_type="BF16")
    for m in ("rtn", "mse", "gptq"):
        quantize_checkpoint(MODEL, d / f"ours_{m}.gguf",
                            QuantizeOptions(4, 32, True, m, "gguf", calibration=CAL, eval_text=EVAL))
        quantize_checkpoint(MODEL, d / f"ours_{m}_q6k.gguf",  # the same size as llama.cpp's Q4_0
                            QuantizeOptions(4, 32, True, m, "gguf", embedding="q6_k", calibration=CAL, verify=False))
    llama_quantize(d / "f32.gguf", d / "llama_q4_1_bf16emb.gguf", "Q4_1", token_embedding_type="BF16")
    for m in ("mse", "gptq"):  # asymmetric → Q4_1
        quantize_checkpoint(MODEL, d / f"ours_{m}_asym.gguf",
                            QuantizeOptions(4, 32, False, m, "gguf", calibration=CAL, verify=False))
    prompts = [p[0].tolist() for p in eval_prompts(open_checkpoint(MODEL), EVAL.read_text(), 256, max_seqs=16)]
    base = torch.cat(llama_cpp_logits(d / "f32.gguf", prompts))
    kl = {f.stem: kl_divergence(base, torch.cat(llama_cpp_logits(f, prompts)))
          for f in sorted(d.glob("*.gguf")) if f.stem != "f32"}
    return d, kl


@pytest.mark.slow  # the module's `work`: llama.cpp quantizes and runs 8 GGUFs (~3 min)
def test_rtn_is_llama_cpp_q4_0_byte_for_byte(work):
    d, _ = work
    ours, theirs = GGUFFile(d / "ours_rtn.gguf"), GGUFFile(d / "llama_q4_0_bf16emb.gguf")
    for name, info in theirs.tensors.items():
        assert ours.tensors[name].type_name == info.type_name, name
        assert (ours.raw(name) == theirs.raw(name)).all(), name


@pytest.mark.slow  # the module's `work`: llama.cpp quantizes and runs 8 GGUFs (~3 min)
def test_q6_k_embedding_is_llama_cpp_q4_0_layout_byte_for_byte(work):
    d, _ = work
    ours, theirs = GGUFFile(d / "ours_rtn_q6k.gguf"), GGUFFile(d / "llama_q4_0.gguf")
    assert ours.tensors["token_embd.weight"].type_name == "Q6_K"
    assert (d / "ours_rtn_q6k.gguf").stat().st_size - (d / "llama_q4_0.gguf").stat().st_size < 4096  # metadata
    for name, info in theirs.tensors.items():
        assert ours.tensors[name].type_name == info.type_name, name
        assert (ours.raw(name) == theirs.raw(name)).all(), name


def test_q6_k_embedding_is_gguf_only(tmp_path):
    from gemma2_convert.core.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="q6_k is a GGUF type"):
        quantize_checkpoint(MODEL, tmp_path / "o", QuantizeOptions(4, 32, True, "rtn", "hf", embedding="q6_k"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["hqq", "gptq", "autoround"])
def test_own_codes_are_refused_for_q4_k(tmp_path, method):
    """A group other than 32 makes Q4_K, whose scales only llama.cpp's search chooses: a method that writes its
    own codes is refused before any work, not silently replaced by that search under its own name."""
    from gemma2_convert.core.errors import ConfigError

    with pytest.raises(ConfigError, match=f"--method {method} writes its own codes.*a group of 128 makes Q4_K"):
        quantize_checkpoint(MODEL, tmp_path / "o.gguf", QuantizeOptions(4, 128, True, method, "gguf"))
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.slow  # the module's `work`: llama.cpp quantizes and runs 8 GGUFs (~3 min)
def test_mse_and_gptq_beat_llama_cpp_q4_0(work):
    _, kl = work
    report = ", ".join(f"{k} {v:.2e}" for k, v in sorted(kl.items()))
    # the bar: our int4 g32 mse GGUF vs llama.cpp's own Q4_0 of the same model (defaults of each tool)
    assert kl["ours_mse"] <= 0.7 * kl["llama_q4_0"], report
    # at the same layout (bf16 embedding in both) the better scales still win, and gptq by far
    assert kl["ours_mse"] < kl["llama_q4_0_bf16emb"], report
    assert kl["ours_gptq"] <= 0.5 * kl["llama_q4_0_bf16emb"], report
    assert kl["ours_gptq"] < kl["ours_mse"] < kl["ours_rtn"], report
    # at llama.cpp's own layout and size (Q6_K embedding): rtn is llama.cpp's bytes, better scales win
    assert kl["ours_rtn_q6k"] == pytest.approx(kl["llama_q4_0"], rel=1e-6), report
    assert kl["ours_gptq_q6k"] < kl["ours_mse_q6k"] < kl["llama_q4_0"], report
    # Q4_1 (asymmetric): GPTQ's error-fed codes are written as they are, not re-rounded
    assert kl["ours_gptq_asym"] < kl["ours_mse_asym"] < kl["llama_q4_1_bf16emb"], report
