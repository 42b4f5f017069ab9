"""MLX output: ``gemma2-quantize --format mlx`` writes mlx-lm's layout; ``mlx_lm.load`` + an MLX forward (CPU) gives
the reference's logits on the same (dequantized) weights. Sequences stay within the sliding window: mlx-lm 0.32.2's
Gemma 2 applies none (../shared/spec/ROUND2_FACTS.md), so it agrees with transformers only up to it."""

from __future__ import annotations

import json

import pytest
import torch

from gemma2_convert.core.errors import ConversionError, FormatError
from gemma2_convert.formats import open_checkpoint
from gemma2_convert.formats.tokenizer.tiny import make_tiny_spm
from gemma2_convert.pipeline.load import from_pretrained
from gemma2_convert.pipeline.quantize import QuantizeOptions, quantize_checkpoint
from quant.mlx_affine import pack_affine, unpack_codes
from quant.qparams import choose_qparams, dequantize, quantize
from quant.qtensor import QuantTensor
from reference import Gemma2ForCausalLM
from reference.config import Gemma2Config
from tests.conftest import make_hf_model

import mlx.core as mx
import mlx_lm

CFG = Gemma2Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
                   sliding_window=16, max_position_embeddings=256, torch_dtype="float32")


@pytest.fixture(scope="module")
def src_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    make_hf_model(CFG, seed=5).save_pretrained(d)
    make_tiny_spm(d / "tokenizer.model", CFG.vocab_size)
    return d


def mlx_logits(out, ids: torch.Tensor) -> torch.Tensor:
    mx.set_default_device(mx.cpu)
    model, _tok = mlx_lm.load(str(out))
    return torch.from_numpy(__import__("numpy").array(model(mx.array(ids.numpy())).astype(mx.float32)))


@pytest.mark.parametrize("bits,group,sym", [
    (4, 32, True), *(pytest.param(*p, marks=pytest.mark.slow)
                     for p in [(4, 64, False), (8, 128, True), (4, 128, True), (8, 32, False)])])
def test_mlx_lm_runs_our_output_with_the_reference_logits(src_dir, tmp_path, bits, group, sym):
    out = tmp_path / "mlx"
    res = quantize_checkpoint(src_dir, out, QuantizeOptions(bits, group, sym, "rtn", "mlx", embedding="int8"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == bits and cfg["quantization"]["group_size"] == group
    assert cfg["quantization"]["mode"] == "affine" and cfg["quantization_config"] == cfg["quantization"]
    ours = from_pretrained(out, Gemma2ForCausalLM)
    assert sum(isinstance(t, QuantTensor) for t in ours.checkpoint.tensors.values()) == 2 * 7 + 1
    ids = torch.randint(3, CFG.vocab_size, (2, CFG.sliding_window), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ours(ids)
    got = mlx_logits(out, ids)
    diff = (got - ref).abs()
    assert diff.max() <= 1e-3, f"max |Δ| {diff.max():.3e} at {divmod(int(diff.argmax()), ref.shape[-1])}"
    assert res.quality["mean_kl"] < (0.01 if bits == 8 else 0.3)


def test_affine_mapping_is_our_dequantization():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    for sym in (True, False):
        s, z = choose_qparams(w, 4, 32, sym)
        q = quantize(w, s, z, 4)
        words, scales, biases = pack_affine(q, s, z, 4)
        u = unpack_codes(words, 4, 64)
        assert torch.equal(u.to(torch.int16) - 8, q.to(torch.int16))
        ours = dequantize(q, s, z)
        theirs = mx.dequantize(mx.array(words.numpy()), mx.array(scales.numpy()), mx.array(biases.numpy()),
                               group_size=32, bits=4)
        assert torch.allclose(torch.from_numpy(__import__("numpy").array(theirs)), ours, atol=1e-6, rtol=0)


def test_mlx_lm_own_quantized_model_reads(src_dir, tmp_path):
    """A directory written by mlx-lm's own convert reads back (its codes as QuantTensors)."""
    from mlx_lm.convert import convert

    out = tmp_path / "theirs"
    convert(str(src_dir), str(out), quantize=True, q_group_size=32, q_bits=4)
    ckpt = open_checkpoint(out)
    assert ckpt.format == "mlx" and "sliding window" in ckpt.metadata["note"]
    q = ckpt.tensors["model.layers.0.mlp.down_proj.weight"]
    assert isinstance(q, QuantTensor) and (q.bits, q.group_size, q.kind) == (4, 32, "affine")
    model, _ = mlx_lm.load(str(out))
    w = model.model.layers[0].mlp.down_proj
    deq = mx.dequantize(w.weight, w.scales, w.biases, group_size=32, bits=4)
    assert torch.allclose(q.load(), torch.from_numpy(__import__("numpy").array(deq)), atol=1e-6, rtol=0)


def test_config_without_quantization_is_refused(src_dir, tmp_path):
    out = tmp_path / "mlx"
    quantize_checkpoint(src_dir, out, QuantizeOptions(4, 32, True, "rtn", "mlx", verify=False))
    cfg = json.loads((out / "config.json").read_text())
    del cfg["quantization"], cfg["quantization_config"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="no 'quantization' object.*weight/scales/biases"):
        open_checkpoint(out)


def test_mismatched_group_size_is_refused(src_dir, tmp_path):
    out = tmp_path / "mlx"
    quantize_checkpoint(src_dir, out, QuantizeOptions(4, 32, True, "rtn", "mlx", verify=False))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization"]["group_size"] = 64
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="group size of the config and of the tensors differ"):
        open_checkpoint(out)


def test_channel_groups_are_not_an_mlx_layout(src_dir, tmp_path):
    with pytest.raises(ConversionError, match="MLX stores groups of 32, 64, 128"):
        quantize_checkpoint(src_dir, tmp_path / "m", QuantizeOptions(4, None, True, "rtn", "mlx"))
