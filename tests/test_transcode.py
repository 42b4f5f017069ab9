"""Quantized in, quantized out: codes moved between compressed-tensors, GGUF and MLX without re-quantizing.

Every kept weight must decode to the same numbers (bit-identical where both decoders compute alike), the real
clients must run the result (llama.cpp, transformers + compressed-tensors, mlx-lm), and a group the target cannot
hold exactly must be counted, refused without --requantize, and reported with it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma2_convert.core.errors import ConversionError
from gemma2_convert.formats import open_checkpoint
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.formats.tokenizer.tiny import make_tiny_spm
from gemma2_convert.formats.transcode_items import TranscodeError
from gemma2_convert.pipeline.convert import convert
from gemma2_convert.pipeline.load import from_pretrained
from gemma2_convert.pipeline.quantize import QuantizeOptions, quantize_checkpoint
from quant.qtensor import QuantTensor
from reference import Gemma2ForCausalLM
from tests.conftest import make_hf_model
from tests.gguf_helpers import llama_logits
from tests.test_mlx import CFG

IDS = [2] + torch.randint(3, CFG.vocab_size, (CFG.sliding_window * 3 - 1,),
                          generator=torch.Generator().manual_seed(3)).tolist()


@pytest.fixture(scope="module")
def src_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    make_hf_model(CFG, seed=7).save_pretrained(d)
    make_tiny_spm(d / "tokenizer.model", CFG.vocab_size)
    return d


def fp16_scales(d) -> None:
    """Round every stored scale (and bias) to an fp16 value, kept in its float32 dtype: a checkpoint whose
    parameters a GGUF block holds exactly (what a quantizer with fp16 scales writes)."""
    f = d / "model.safetensors"
    t = load_file(f)
    t = {k: (v.half().float() if k.endswith(("weight_scale", ".scales", ".biases")) else v) for k, v in t.items()}
    save_file(t, f, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def ct_dir(src_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("ct") / "int4-g32"
    quantize_checkpoint(src_dir, d, QuantizeOptions(4, 32, True, "rtn", "hf", verify=False))
    fp16_scales(d)
    return d


def all_equal(a, b) -> None:
    ca, cb = open_checkpoint(a), open_checkpoint(b)
    assert sorted(ca.tensors) == sorted(cb.tensors)
    for n, t in ca.tensors.items():
        x, y = t.load().float(), cb.tensors[n].load().float()
        assert torch.equal(x, y), f"{n}: max |Δ| {(x - y).abs().max():.3g} at {int((x - y).abs().argmax())}"


def reference_logits(path) -> torch.Tensor:
    with torch.no_grad():
        return from_pretrained(path, Gemma2ForCausalLM)(torch.tensor([IDS]))[0]


def llama_cpp_logits(path) -> torch.Tensor:
    """llama.cpp's float32 logits of IDS on the GGUF at ``path``."""
    return llama_logits(path, IDS)


def test_ct_int4_sym_g32_to_q4_0_is_bit_identical_and_llama_cpp_runs_it(ct_dir, tmp_path):
    out = tmp_path / "q4_0.gguf"
    res = convert(ct_dir, out, ConvertOptions(to="gguf", gguf_type="q4_0"))
    assert res.report is not None and res.report.max_abs_logits == 0.0
    tr = res.details["transcode"]
    assert tr["transcoded"] == 2 * 7 and tr["inexact_groups"] == 0
    all_equal(ct_dir, out)
    assert sum(isinstance(t, QuantTensor) and t.layout == "gguf:Q4_0" for t in open_checkpoint(out).tensors.values()) \
        == 14
    got = llama_cpp_logits(out)
    want = reference_logits(ct_dir)
    d = (got - want).abs()
    # Q4_0 weights: llama.cpp's CPU matmul quantizes the activations to Q8_0 (the Q8_0 bound of
    # tests/test_gguf_llamacpp.py), the weights themselves are the compressed-tensors ones exactly
    assert d.max() <= 0.75 and (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95, f"max |Δ| {d.max():.3g}"


def test_bf16_compressed_tensors_to_q4_0_verifies(src_dir, tmp_path):
    """A compressed-tensors model quantized from bf16 weights has bf16 scales and decodes in bf16, rounding each
    value; the Q4_0 blocks hold the same scales exactly (bf16 ⊂ fp16 for these magnitudes) but decode in float32.
    The transcode keeps every code and scale, and verification judges it by BF16's rounding, not as a re-quantization."""
    bf16 = tmp_path / "bf16"
    convert(src_dir, bf16, ConvertOptions(to="hf", dtype="bfloat16"))
    ct = tmp_path / "ct-bf16"
    quantize_checkpoint(bf16, ct, QuantizeOptions(4, 32, True, "rtn", "hf", verify=False))
    res = convert(ct, tmp_path / "q4_0.gguf", ConvertOptions(to="gguf", gguf_type="q4_0"))
    assert res.report is not None and res.report.passed, res.report and res.report.failures
    assert res.details["transcode"]["inexact_groups"] == 0
    assert "decodes them in BF16" in res.report.bounds, res.report.bounds
    ca, cb = open_checkpoint(ct), open_checkpoint(tmp_path / "q4_0.gguf")
    for n, t in ca.tensors.items():  # the bf16 decode is the float32 one rounded to bf16
        assert torch.equal(t.load(), cb.tensors[n].load().to(t.dtype)), n


@pytest.mark.parametrize("type_name,bits,sym", [
    ("q4_0", 4, True), *(pytest.param(*p, marks=pytest.mark.slow) for p in [("q4_1", 4, False), ("q8_0", 8, True)])])
def test_gguf_blocks_to_compressed_tensors_load_in_transformers(src_dir, tmp_path, type_name, bits, sym):
    import transformers
    from transformers.utils.quantization_config import CompressedTensorsConfig

    gguf = tmp_path / f"{type_name}.gguf"
    convert(src_dir, gguf, ConvertOptions(to="gguf", gguf_type=type_name, verify=False))
    out = tmp_path / "ct"
    res = convert(gguf, out, ConvertOptions(to="hf", quantized="keep", requantize=not sym))
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["config_groups"]["group_0"]["weights"]["num_bits"] == bits
    tr = res.details["transcode"]
    assert tr["transcoded"] == 14
    if sym:  # Q4_0 / Q8_0 blocks are symmetric int groups with fp16 (float32-exact) scales: every group exact
        assert tr["inexact_groups"] == 0
        all_equal(gguf, out)
    kw = {} if sym else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", **kw)
    with torch.no_grad():
        got = hf(torch.tensor([IDS])).logits[0]
    want = reference_logits(out)
    assert (got - want).abs().max() <= 1e-4, f"max |Δ| {(got - want).abs().max():.3e}"


@pytest.mark.slow
def test_mlx_g32_to_q4_1_and_back_counts_inexact_groups(src_dir, tmp_path):
    mlx = tmp_path / "mlx"
    quantize_checkpoint(src_dir, mlx, QuantizeOptions(4, 32, False, "rtn", "mlx", verify=False))
    # float32 scales and biases: most are not fp16 values, so a Q4_1 block cannot hold them
    with pytest.raises(TranscodeError, match=r"groups cannot be held exactly by gguf:Q4_1.*--requantize"):
        convert(mlx, tmp_path / "no.gguf", ConvertOptions(to="gguf", gguf_type="q4_1"))
    assert not (tmp_path / "no.gguf").exists()
    # half the modules get fp16-valued parameters: exactly the groups of the others cannot be held
    stored = load_file(mlx / "model.safetensors")
    halved = {k: (v.half().float() if k.endswith((".scales", ".biases")) and ".layers.0." in k else v)
              for k, v in stored.items()}
    save_file(halved, mlx / "model.safetensors", metadata={"format": "pt"})
    scales = {k[:-len(".scales")]: v for k, v in halved.items() if k.endswith(".scales")}
    want = sum(int(((s.half().float() != s) | (halved[p + ".biases"].half().float() != halved[p + ".biases"])).sum())
               for p, s in scales.items())
    res = convert(mlx, tmp_path / "re.gguf", ConvertOptions(to="gguf", gguf_type="q4_1", requantize=True))
    tr = res.details["transcode"]
    assert tr["inexact_groups"] == want and 0 < want < tr["groups"] and tr["requantized"]
    assert {n for n, *_ in tr["inexact_tensors"]} == {p + ".weight" for p in scales if ".layers.1." in p}
    print(f"non-representable groups: {tr['inexact_groups']} of {tr['groups']}")
    # the same model with fp16-valued parameters: every group moves exactly, there and back
    fp16_scales(mlx)
    q41 = tmp_path / "q4_1.gguf"
    res = convert(mlx, q41, ConvertOptions(to="gguf", gguf_type="q4_1"))
    assert res.details["transcode"]["inexact_groups"] == 0 and res.report.max_abs_logits == 0.0
    all_equal(mlx, q41)
    back = tmp_path / "back"
    res = convert(q41, back, ConvertOptions(to="mlx"))
    assert res.details["transcode"]["inexact_groups"] == 0
    all_equal(q41, back)
    src, again = load_file(mlx / "model.safetensors"), load_file(back / "model.safetensors")
    for k in src:
        if k.endswith((".weight", ".scales", ".biases")) and src[k].dtype == torch.uint32:
            assert torch.equal(src[k].view(torch.int32), again[k].view(torch.int32)), k


def test_act_order_and_fp8_configs_are_refused(ct_dir, tmp_path):
    import shutil

    for change, pattern in [({"actorder": "group"}, "not a block layout"),
                            ({"type": "float", "num_bits": 8}, "fp8 scheme")]:
        d = tmp_path / change.get("type", "act")
        shutil.copytree(ct_dir, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["quantization_config"]["config_groups"]["group_0"]["weights"].update(change)
        (d / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ConversionError, match=pattern):
            open_checkpoint(d)


def test_keep_refuses_a_width_the_target_has_not(ct_dir, tmp_path):
    with pytest.raises(ConversionError, match="cannot become Q8_0 blocks.*--quantized dequantize"):
        convert(ct_dir, tmp_path / "x.gguf", ConvertOptions(to="gguf", gguf_type="q8_0", quantized="keep"))


def test_inspect_of_an_mlx_directory_warns_of_the_sliding_window(src_dir, tmp_path):
    from gemma2_convert.pipeline.inspect import inspect_path

    out = tmp_path / "mlx"
    quantize_checkpoint(src_dir, out, QuantizeOptions(4, 64, True, "rtn", "mlx", verify=False))
    ins = inspect_path(out)
    assert ins.format == "mlx" and "mlx affine 4-bit, group 64" in ins.metadata["quantization"]
    assert "without its sliding window" in ins.metadata["note"] and "16 tokens" in ins.metadata["note"]


def test_library_compressed_checkpoint_to_q4_0_is_bit_identical(src_dir, tmp_path):
    """The same through compressed-tensors' own compressor (``PackedQuantizationCompressor.compress``): its names
    and packing, our transcode, every weight equal."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    from gemma2_convert.core.lazy import LazyTensor
    from gemma2_convert.formats.hf import write_hf_dir
    from quant.compressed_tensors import quantization_config
    from quant.policy import is_decoder_linear
    from quant.qparams import choose_qparams
    from quant.spec import QuantSpec

    spec, dense = QuantSpec(4, 32, True, "rtn"), open_checkpoint(src_dir)
    qc = quantization_config({n.removesuffix(".weight"): spec for n in dense.tensors if is_decoder_linear(n)})
    scheme = next(iter(QuantizationConfig.model_validate(
        {k: v for k, v in qc.items() if k not in ("version", "sparsity_config", "transform_config")}
    ).config_groups.values()))
    items = []
    for name, t in dense.tensors.items():
        if not is_decoder_linear(name):
            items.append((name, t))
            continue
        w = t.load()
        scale, _ = choose_qparams(w, 4, 32, True)
        packed = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale.half().float()}, scheme)
        items += [(f"{name.removesuffix('.weight')}.{k}", LazyTensor.of(v)) for k, v in packed.items()]
    lib = tmp_path / "lib"
    lib.mkdir()
    write_hf_dir(lib, dense.config, items, extra_config={"quantization_config": qc}, tokenizer=dense.tokenizer)
    out = tmp_path / "lib.gguf"
    res = convert(lib, out, ConvertOptions(to="gguf", gguf_type="q4_0"))
    assert res.details["transcode"]["inexact_groups"] == 0 and res.report.max_abs_logits == 0.0
    all_equal(lib, out)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1"])
def test_gguf_blocks_are_codes_and_back_byte_for_byte(qtype):
    """Each 32-block type read as QuantCodes decodes as ggml does, and writes back the same bytes."""
    from quant.gguf_blocks import blocks_from_codes, codes_from_blocks
    from quant.gguf_codec import dequantize_tensor, quantize_tensor

    w = torch.randn(6, 128, generator=torch.Generator().manual_seed(2)) * 0.1
    raw = quantize_tensor(w, qtype)
    c = codes_from_blocks(raw, qtype, (6, 128))
    assert torch.equal(c.dequantize(), dequantize_tensor(raw, qtype, (6, 128)))
    assert torch.equal(blocks_from_codes(c, qtype).reshape(-1), raw.reshape(-1))


@pytest.mark.slow
def test_llm_compressor_int4_g32_to_q4_0_is_bit_identical_and_llama_cpp_runs_it(tmp_path):
    """A model quantized by llm-compressor itself (``oneshot`` + ``QuantizationModifier``, int4 sym groups of 32,
    data-free: weight-only min/max needs no calibration set), from bf16 weights as Gemma 2 ships: every code and
    scale moves into Q4_0 unchanged (the float64 values the codes stand for are equal) and llama.cpp runs it.

    llmcompressor is installed by the README's test command with --no-deps (0.14.0.1 pins transformers<=5.17 and
    compressed-tensors==0.19.0, which would replace the 5.25 / 0.20.1 the other tests use; ``datasets``, which it
    imports, comes with its own dependencies); a missing install fails here, it is not skipped."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    src, lib = tmp_path / "bf16", tmp_path / "llmc"
    make_hf_model(CFG, seed=7).to(torch.bfloat16).save_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    recipe = QuantizationModifier(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=args)},
                                  ignore=["lm_head"])
    oneshot(model=model, recipe=recipe)
    model.save_pretrained(lib, save_compressed=True)
    make_tiny_spm(lib / "tokenizer.model", CFG.vocab_size)
    out = tmp_path / "q4_0.gguf"
    res = convert(lib, out, ConvertOptions(to="gguf", gguf_type="q4_0"))
    assert res.details["transcode"]["transcoded"] == 2 * 7 and res.details["transcode"]["inexact_groups"] == 0
    assert res.report is not None and res.report.passed, res.report and res.report.failures
    ca, cb = open_checkpoint(lib), open_checkpoint(out)
    kept = [n for n, t in ca.tensors.items() if isinstance(t, QuantTensor)]
    assert len(kept) == 14
    for n in kept:
        a, b = ca.tensors[n].codes().exact(), cb.tensors[n].codes().exact()  # type: ignore[union-attr]
        assert torch.equal(a, b), f"{n}: max |Δ| {(a - b).abs().max():.3g}"
    got = llama_cpp_logits(out)
    want = reference_logits(lib)
    d = (got - want).abs()  # the Q8_0 activation bound of the test above
    assert d.max() <= 0.75 and (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95, f"max |Δ| {d.max():.3g}"
