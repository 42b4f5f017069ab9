"""GGUF writing and reading without llama.cpp: names, transforms, on-disk layout, round trips."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
import xxhash
from click.testing import CliRunner

from gemma2_convert.cli.main import cli
from gemma2_convert.formats import open_checkpoint
from gemma2_convert.formats.gguf.names import (GGUF_TO_HF, add_one, fold_query, gguf_name, hf_name,
                                               llama_cpp_query_scalar, norm_residual, query_fold_ratio, sub_one,
                                               unfold_query)
from gemma2_convert.formats.gguf.reader import GGUFFile
from gemma2_convert.formats.gguf.values import Value, ValueType, array, boolean, f32, string, u32
from gemma2_convert.formats.gguf.writer import TensorPlan, write_gguf
from gemma2_convert.pipeline.gguf import gguf_to_hf, to_gguf
from gemma2_convert.formats.gguf.mix import choose_type, use_more_bits
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats.tokenizer.spm import gguf_vocab
from gemma2_convert.pipeline.load import from_pretrained
from reference import Gemma2ForCausalLM
from reference.config import Gemma2Config
from reference.weights import expected_shapes
from tests.gguf_helpers import CONFIGS, first_diff, tensors, write_model


@pytest.fixture(scope="module")
def fold_model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("fold") / "hf", CONFIGS["fold"])


@pytest.fixture(scope="module")
def fold_f32(fold_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "fold-f32.gguf"
    to_gguf(fold_model, out, type_name="f32")
    return out


# ---- names and pure transforms ---------------------------------------------------------------

@pytest.mark.parametrize("preset", ["2b", "27b"])
def test_name_table_is_a_bijection(preset):
    cfg = Gemma2Config.preset(preset)
    names = [gguf_name(n) for n in expected_shapes(cfg)]
    assert len(set(names)) == len(names) == 2 + 11 * cfg.num_hidden_layers
    assert [hf_name(n) for n in names] == list(expected_shapes(cfg))
    assert len(GGUF_TO_HF) == 14
    assert gguf_name("lm_head.weight") == "output.weight"  # an untied head (a merged adapter) only
    with pytest.raises(Exception, match="no Gemma 2 counterpart"):
        gguf_name("model.lm_head.weight")


def test_norm_plus_one_and_residual_are_exact():
    g = torch.Generator().manual_seed(0)
    for w in (torch.randn(4096, generator=g) * 0.3, torch.randn(4096, generator=g) * 8,
              (torch.randn(4096, generator=g) * 1e-4).to(torch.bfloat16)):
        stored = add_one(w)
        assert stored.dtype == torch.float32 and torch.equal(stored, 1.0 + w.float())
        assert torch.equal(sub_one(stored) + norm_residual(w), w.float()), first_diff(sub_one(stored), w)


def test_llama_cpp_query_scale_by_depth():
    """src/models/gemma2.cpp: 46 layers → n_embd / n_head (integer), every other depth → head_dim."""
    for preset in ("2b", "9b", "27b"):  # the published models need no fold
        cfg = Gemma2Config.preset(preset)
        assert llama_cpp_query_scalar(cfg) == cfg.query_pre_attn_scalar and query_fold_ratio(cfg) == 1.0
    assert llama_cpp_query_scalar(CONFIGS["depth46"]) == 64.0 and query_fold_ratio(CONFIGS["depth46"]) == 2 ** 0.5
    assert llama_cpp_query_scalar(CONFIGS["fold"]) == 64.0
    odd = Gemma2Config.preset("27b").replace(num_hidden_layers=30, layer_types=())
    assert llama_cpp_query_scalar(odd) == 128.0  # pruned 27B: llama.cpp falls back to head_dim


def test_query_fold_inverts_within_one_ulp():
    q = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    r = query_fold_ratio(CONFIGS["fold"])
    back = unfold_query(fold_query(q, r), r)
    ulp = torch.nextafter(q.abs(), torch.tensor(float("inf"))) - q.abs()
    assert ((back - q).abs() <= ulp).all()
    qb = q.to(torch.bfloat16)
    assert torch.equal(unfold_query(fold_query(qb, r), r).to(torch.bfloat16), qb)


def test_q4_k_m_mix_on_the_2b_shapes():
    """QUANT_FORMATS §1.5: tied embedding Q6_K, Q6_K attn_v / ffn_down on 13 of 26 layers."""
    cfg = Gemma2Config.preset("2b")
    types = {gguf_name(n): choose_type(gguf_name(n), s, "q4_k_m", 26).qtype for n, s in expected_shapes(cfg).items()}
    assert types["token_embd.weight"] == "Q6_K" and types["output_norm.weight"] == "F32"
    for kind in ("attn_v", "ffn_down"):
        picked = [i for i in range(26) if types[f"blk.{i}.{kind}.weight"] == "Q6_K"]
        assert picked == [i for i in range(26) if use_more_bits(i, 26)] and len(picked) == 13
    assert {types[f"blk.{i}.attn_q.weight"] for i in range(26)} == {"Q4_K"}


def test_fallback_for_short_rows():
    c = choose_type("blk.0.attn_q.weight", (128, 96), "q4_k", 4)
    assert c.qtype == "Q5_0" and "fallback" in c.reason
    assert choose_type("blk.0.attn_q.weight", (128, 100), "q8_0", 4).qtype == "F16"
    assert choose_type("token_embd.weight", (512, 64), "q4_k_m", 4).qtype == "Q8_0"


# ---- on-disk layout ---------------------------------------------------------------------------

def test_layout_is_byte_identical_to_gguf_py(tmp_path):
    """Same metadata and tensors through gguf-py's GGUFWriter give the same bytes."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 64, generator=g), torch.randn(5, 32, generator=g)
    meta = [("general.architecture", string("gemma2")), ("x.u32", u32(7)), ("x.f32", f32(0.5)),
            ("x.bool", boolean(True)), ("x.f64", Value(ValueType.FLOAT64, 1 / 3)),
            ("x.strs", array(ValueType.STRING, ["a", "", "▁b"])), ("x.f32s", array(ValueType.FLOAT32, [1.5, -2])),
            ("x.i32s", array(ValueType.INT32, [1, -3, 6]))]
    ours = tmp_path / "ours.gguf"
    write_gguf(ours, meta, [TensorPlan("a", LazyTensor.of(a), "F32"), TensorPlan("b", LazyTensor.of(b), "Q8_0"),
                            TensorPlan("c", LazyTensor.of(a), "F16")])
    theirs = tmp_path / "theirs.gguf"
    w = gguf.GGUFWriter(str(theirs), "gemma2")
    w.add_uint32("x.u32", 7)
    w.add_float32("x.f32", 0.5)
    w.add_bool("x.bool", True)
    w.add_float64("x.f64", 1 / 3)
    w.add_array("x.strs", ["a", "", "▁b"])
    w.add_array("x.f32s", [1.5, -2.0])
    w.add_key_value("x.i32s", [1, -3, 6], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
    w.add_tensor("a", a.numpy())
    qb = gguf.quants.quantize(b.numpy(), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("b", qb, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c", a.numpy().astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert ours.read_bytes() == theirs.read_bytes()


def test_metadata_llama_cpp_reads(fold_f32):
    r = gguf.GGUFReader(str(fold_f32))
    kv = {f.name: f.contents() for f in r.fields.values()}
    cfg = CONFIGS["fold"]
    expected = {
        "general.architecture": "gemma2", "general.file_type": 0, "general.quantization_version": 2,
        "gemma2.context_length": 256, "gemma2.embedding_length": 256, "gemma2.block_count": 5,
        "gemma2.feed_forward_length": 512, "gemma2.attention.head_count": 4, "gemma2.attention.head_count_kv": 2,
        "gemma2.attention.key_length": 64, "gemma2.attention.value_length": 64,
        "gemma2.attention.sliding_window": 16, "gemma2.attn_logit_softcapping": 50.0,
        "gemma2.final_logit_softcapping": 30.0, "gemma2.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_space_prefix": False,
        "gemma2_convert.query_pre_attn_scalar": 48.0, "gemma2_convert.norm_convention": "one_plus_w",
        "gemma2_convert.query_scale_folded": (64 / 48) ** 0.5, "gemma2_convert.source_dtype": "float32",
    }
    for key, want in expected.items():
        assert kv[key] == pytest.approx(want) if isinstance(want, float) else kv[key] == want, key
    assert abs(kv["gemma2.attention.layer_norm_rms_epsilon"] - cfg.rms_norm_eps) < 1e-12
    assert "<start_of_turn>" in kv["tokenizer.ggml.tokens"] and "output.weight" not in {t.name for t in r.tensors}
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert set(types.values()) == {"F32"} and len(types) == 2 + 11 * 5


def test_tokenizer_keys_equal_gguf_vocab(fold_model, fold_f32):
    f = GGUFFile(fold_f32)
    want = gguf_vocab(fold_model / "tokenizer.model", 512).metadata()
    for key, value in want.items():
        got = f.kv[key]
        assert (np.allclose(got, value) if key.endswith("scores") else got == value), key


def test_source_fingerprint_is_the_xxh3_128_of_the_canonical_weights(fold_model, fold_f32):
    src = open_checkpoint(fold_model)
    h = xxhash.xxh3_128()
    for t in GGUFFile(fold_f32).tensors.values():
        x = src.tensors[hf_name(t.name)].load()
        h.update(f"{t.name}|{str(x.dtype).removeprefix('torch.')}|{list(x.shape)}\n".encode())
        h.update(x.contiguous().view(torch.uint8).numpy().tobytes())
    assert GGUFFile(fold_f32).kv["gemma2_convert.source_xxh3_128"] == h.hexdigest()
    assert "gemma2_convert.source_sha256" not in GGUFFile(fold_f32).kv


# ---- round trips -------------------------------------------------------------------------------

def test_f32_round_trip_reproduces_the_hf_tensors(tmp_path):
    """No fold: every tensor (norms included) reads back bit-exactly, and gguf-to-hf writes them back."""
    src = write_model(tmp_path / "hf", CONFIGS["mha"], seed=3)
    out = tmp_path / "m.gguf"
    to_gguf(src, out, type_name="f32")
    back = tmp_path / "back"
    gguf_to_hf(out, back)
    want = tensors(CONFIGS["mha"], 3)
    got = open_checkpoint(back).tensors
    assert set(got) == set(want)
    for name, w in want.items():
        assert torch.equal(got[name].load(), w), f"{name}: {first_diff(got[name].load(), w)}"
    assert json.loads((back / "config.json").read_text())["query_pre_attn_scalar"] == 32
    # the embedded tokenizer.model comes back verbatim, with the HF tokenizer files built from it
    assert (back / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert (back / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_folded_bf16_source_round_trips_exactly(tmp_path):
    """A folded attn_q of a bfloat16 model lands back on the bfloat16 grid: gguf-to-hf is exact."""
    src = write_model(tmp_path / "hf", CONFIGS["fold"], seed=4, dtype=torch.bfloat16)
    out = tmp_path / "m.gguf"
    to_gguf(src, out, type_name="f32")
    back = tmp_path / "back"
    res = gguf_to_hf(out, back)
    assert res.config.torch_dtype == "bfloat16"
    got = open_checkpoint(back).tensors
    for name, w in tensors(CONFIGS["fold"], 4, torch.bfloat16).items():
        assert torch.equal(got[name].load(), w), f"{name}: {first_diff(got[name].load(), w)}"


def test_folded_f32_source_reads_back_within_one_ulp(fold_model, fold_f32):
    got = open_checkpoint(fold_f32).tensors
    for name, w in tensors(CONFIGS["fold"]).items():
        x = got[name].load()
        if name.endswith("q_proj.weight"):
            ulp = torch.nextafter(w.abs(), torch.tensor(float("inf"))) - w.abs()
            assert ((x - w).abs() <= ulp).all(), first_diff(x, w)
        else:
            assert torch.equal(x, w), f"{name}: {first_diff(x, w)}"


@pytest.mark.parametrize("type_name", ["q8_0", "q4_k_m", "bf16"])
def test_reference_on_gguf_equals_the_dequantized_weights(fold_model, tmp_path, type_name):
    """GGUF → reference logits == logits of a model built from gguf-py's dequantization of the file."""
    out = tmp_path / "m.gguf"
    to_gguf(fold_model, out, type_name=type_name, verify=False)
    r = gguf.GGUFReader(str(out))
    ratio = float(r.fields["gemma2_convert.query_scale_folded"].contents())
    weights = {}
    for t in r.tensors:
        x = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).copy())
        x = x.reshape(tuple(int(d) for d in reversed(t.shape)))
        name = hf_name(t.name)
        if name.endswith("norm.weight"):
            key = "gemma2_convert.norm_residual." + t.name
            x = x - 1 + (torch.tensor(r.fields[key].contents()) if key in r.fields else 0)
        elif name.endswith("q_proj.weight"):
            x = (x.double() / ratio).float()
        weights[name] = LazyTensor.of(x)
    from reference.weights import WeightStore

    cfg = CONFIGS["fold"]
    manual = Gemma2ForCausalLM(cfg, WeightStore(weights, cfg, torch.float32))
    loaded = from_pretrained(out, Gemma2ForCausalLM, dtype=torch.float32)
    ids = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(ids), manual(ids))


def test_llama_cpp_style_file_is_read(tmp_path):
    """A file as llama.cpp's converter writes it (no provenance keys, +1 norms, HF tensor order)."""
    cfg = CONFIGS["mha"]
    src = tensors(cfg, 6)
    path = tmp_path / "lc.gguf"
    w = gguf.GGUFWriter(str(path), "gemma2")
    for key, v in [("context_length", 256), ("embedding_length", 256), ("block_count", 3),
                   ("feed_forward_length", 256), ("attention.head_count", 8), ("attention.head_count_kv", 8),
                   ("attention.key_length", 32), ("attention.value_length", 32), ("attention.sliding_window", 8)]:
        w.add_uint32(f"gemma2.{key}", v)
    w.add_float32("gemma2.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32("gemma2.attn_logit_softcapping", 20.0)
    w.add_float32("gemma2.final_logit_softcapping", 15.0)
    w.add_file_type(1)
    for name, x in src.items():
        data = (x + 1).numpy() if name.endswith("norm.weight") else x.numpy().astype(np.float16)
        w.add_tensor(gguf_name(name), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ck = open_checkpoint(path)
    assert ck.format == "gguf" and ck.config.query_pre_attn_scalar == 32 and ck.config.vocab_size == 512
    for name, x in src.items():
        want = x.to(torch.float16) if not name.endswith("norm.weight") else (x + 1) - 1
        assert torch.equal(ck.tensors[name].load(), want), name


def test_requantize_a_gguf_keeps_its_vocabulary(fold_f32, tmp_path):
    out = tmp_path / "q8.gguf"
    to_gguf(fold_f32, out, type_name="q8_0")
    a, b = GGUFFile(fold_f32), GGUFFile(out)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.chat_template",
                "gemma2_convert.tokenizer_model"):
        assert a.kv[key] == b.kv[key]
    assert b.kv["general.file_type"] == 7 and b.kv["gemma2_convert.query_scale_folded"] == a.kv[
        "gemma2_convert.query_scale_folded"]


def test_orig_to_gguf_and_cli(tmp_path):
    from gemma2_convert.formats.testing import write_orig_ckpt

    cfg = CONFIGS["mha"]
    ckpt = write_orig_ckpt(tmp_path / "orig" / "model.ckpt", tensors(cfg, 7), cfg)
    from gemma2_convert.formats.tokenizer.tiny import make_tiny_spm

    make_tiny_spm(tmp_path / "orig" / "tokenizer.model", 512)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    runner = CliRunner()
    res = runner.invoke(cli, ["orig-to-gguf", str(ckpt), str(tmp_path / "o.gguf"), "--type", "q8_0",
                              "--config", str(tmp_path / "config.json"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["type"] == "q8_0" and report["verify"]["passed"]
    res = runner.invoke(cli, ["gguf-to-hf", str(tmp_path / "o.gguf"), str(tmp_path / "hf"), "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["to-gguf", str(tmp_path / "hf"), str(tmp_path / "o.gguf"), "--tokenizer",
                              str(tmp_path / "orig" / "tokenizer.model")])
    assert res.exit_code == 2 and "already exists; pass --force" in res.output


def test_non_alternating_layers_round_trip(tmp_path):
    """A layer pattern other than Gemma 2's is written as llama.cpp's per-layer sliding_window_pattern."""
    cfg = CONFIGS["pattern"]
    out = tmp_path / "p.gguf"
    to_gguf(write_model(tmp_path / "hf", cfg), out, type_name="f32", verify=False)
    assert GGUFFile(out).kv["gemma2.attention.sliding_window_pattern"] == [False, True, True, False]
    assert open_checkpoint(out).config.layer_types == cfg.layer_types
    plain = tmp_path / "plain.gguf"
    to_gguf(write_model(tmp_path / "hf2", CONFIGS["mha"]), plain, type_name="f32", verify=False)
    assert "gemma2.attention.sliding_window_pattern" not in GGUFFile(plain).kv  # llama.cpp's default applies
