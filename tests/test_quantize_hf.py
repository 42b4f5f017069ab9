"""gemma2-quantize --format hf: compressed-tensors output that transformers loads with our logits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemma2_convert.core.errors import OutputExistsError
from gemma2_convert.pipeline.quantize import QuantizeOptions, quantize_checkpoint
from gemma2_convert.pipeline.load import from_pretrained
from reference import Gemma2ForCausalLM
from tests.conftest import TINY_CONFIGS, make_hf_model


@pytest.fixture(scope="module")
def src_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    make_hf_model(TINY_CONFIGS["gqa2"], seed=21).save_pretrained(d)
    return d


@pytest.mark.parametrize("bits,group,sym,method", [
    (4, 32, True, "mse"), (4, 32, False, "hqq"), (8, None, True, "rtn"), (4, 32, True, "rtn"),
])
def test_transformers_loads_our_output_with_our_logits(src_dir, tmp_path, bits, group, sym, method):
    import transformers
    from transformers.utils.quantization_config import CompressedTensorsConfig

    out = tmp_path / "q"
    res = quantize_checkpoint(src_dir, out, QuantizeOptions(bits, group, sym, method))
    assert res.quantized == 4 * 7 and res.output_bytes < res.source_bytes
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    # asymmetric pack-quantized only loads with dequantize=True in compressed-tensors 0.20 / transformers 5
    # (the default path expects an unpacked zero-point: see tests/test_compressed_tensors.py)
    kw = {} if sym else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", **kw)
    ours = from_pretrained(out, Gemma2ForCausalLM)
    packed = [t for t in ours.checkpoint.tensors.values() if t.packed]
    assert len(packed) == 28  # the reference keeps the quantized weights packed
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
    got = ours(ids)
    assert (got - ref).abs().max() <= 1e-4, f"max |Δ| {(got - ref).abs().max():.3e}"
    assert res.quality["mean_kl"] < (0.01 if bits == 8 else 0.25)


def test_cli_json_report_and_no_overwrite(src_dir, tmp_path):
    out = tmp_path / "q"
    cmd = [sys.executable, "-m", "gemma2_convert.cli.quantize", str(src_dir), str(out), "--group-size", "32", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["format"] == "hf" and rep["quantized"] == 28
    assert {"mean_kl", "top1", "ppl_a", "ppl_b", "weights_bytes_packed"} <= set(rep["quality"])
    assert all(t["sqnr_db"] > 15 for t in rep["tensors"])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "already exists; pass --force" in r.stderr
    with pytest.raises(OutputExistsError):
        quantize_checkpoint(src_dir, out, QuantizeOptions(4, 32))


def test_group_that_does_not_divide_is_one_clear_error(src_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "gemma2_convert.cli.quantize", str(src_dir), str(tmp_path / "q"), "--group-size", "64"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "in_features=96, not a multiple of group_size=64" in r.stderr
    assert not (tmp_path / "q").exists()


def test_default_mse_needs_no_calibration_text_on_a_long_window_model(tmp_path):
    """With a tokenizer and no --calibration, mse/hqq weigh by activations on the built-in text even when
    it is shorter than a calibration sequence (2B/9B/27B: 2048 tokens); gptq asks for real text."""
    from gemma2_convert.core.errors import ConversionError

    src = tmp_path / "long-window"
    shutil.copytree(Path(__file__).parent / "fixtures" / "gemma2-tiny-trained", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(sliding_window=4096, max_position_embeddings=8192)  # calibration sequences of 2048 tokens
    (src / "config.json").write_text(json.dumps(cfg))
    res = quantize_checkpoint(src, tmp_path / "mse", QuantizeOptions(4, 32, True, "mse", verify=False))
    assert res.out.exists()
    with pytest.raises(ConversionError, match="pass --calibration FILE"):
        quantize_checkpoint(src, tmp_path / "gptq", QuantizeOptions(4, 32, True, "gptq", verify=False))
    assert not (tmp_path / "gptq").exists()
