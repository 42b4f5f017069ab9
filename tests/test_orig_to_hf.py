"""orig-to-hf / orig-to-safetensors: gemma_pytorch checkpoints built from transformers models convert to
outputs that transformers loads with bit-equal tensors, equal logits and the same tokenizer ids."""

from __future__ import annotations

import json

import pytest
import torch

from gemma2_convert.core.progress import Progress, Warnings
from gemma2_convert.pipeline.convert import orig_to_hf, orig_to_safetensors
from gemma2_convert.pipeline.verify import verify_paths
from gemma2_convert.formats import open_checkpoint
from gemma2_convert.formats.gemma_pytorch import dequantize_int8, fuse_qkv, orig_shapes, split_qkv
from gemma2_convert.formats.orig_config import ShapeOptions, infer_config
from gemma2_convert.formats.testing import dequantized_hf, quantize_int8, write_orig_ckpt, write_orig_sharded
from gemma2_convert.pipeline.load import from_pretrained
from reference import Gemma2ForCausalLM
from reference.config import PRESETS
from tests.conftest import TINY_CONFIGS, hf_state_dict, make_hf_model

TEXT = ("Hello  world!\n\n\tdef f(x):\n        return x * 3.14159 + 2718\nПривет, мир! 東京は日本の首都です。 "
        "🙂🚀 <start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")


def _assert_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if not torch.equal(a, b):
        d = (a.float() - b.float()).abs()
        i = int(d.argmax())
        raise AssertionError(f"{what}: max |Δ| {d.max().item():.3g} at flat index {i}: {a.flatten()[i]} vs "
                             f"{b.flatten()[i]}")


def test_split_qkv_rows_and_fuse_roundtrip():
    cfg = TINY_CONFIGS["gqa4"]  # N=8, K=2, D=8
    w = torch.arange((8 + 2 * 2) * 8 * 3, dtype=torch.float32).reshape(-1, 3)
    q, k, v = split_qkv(w, cfg)
    assert (q.shape, k.shape, v.shape) == ((64, 3), (16, 3), (16, 3))
    assert q[0, 0] == 0 and k[0, 0] == 64 * 3 and v[0, 0] == 80 * 3  # rows [N·D | K·D | K·D]
    assert q.data_ptr() == w.data_ptr()  # views: nothing copied
    assert torch.equal(fuse_qkv(q, k, v), w)


def test_dequantize_int8_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-128, 128, (5, 7), generator=g, dtype=torch.int8)
    s = torch.rand(5, generator=g).to(torch.bfloat16)
    naive = torch.stack([torch.stack([(w[i, j].to(torch.bfloat16) * s[i]) for j in range(7)]) for i in range(5)])
    _assert_equal(dequantize_int8(w, s), naive, "dequantize")


@pytest.mark.parametrize("variant,scalar", [("2b", 256), ("9b", 256), ("27b", 144)])
def test_variant_detected_from_shapes(variant, scalar):
    cfg = PRESETS[variant]
    found, how = infer_config(orig_shapes(cfg), cfg.num_hidden_layers, ShapeOptions(), None)
    assert found == cfg and found.query_pre_attn_scalar == scalar and variant in how


CASES = [("mha", "single"), ("gqa2", "single"), ("gqa4", "sharded"), ("gqa2", "int8"), ("mha", "int8-sharded")]


@pytest.mark.parametrize("name,layout", CASES)
def test_converted_dir_loads_in_transformers(tmp_path, name, layout):
    import transformers

    cfg = TINY_CONFIGS[name]
    source = make_hf_model(cfg, seed=1)
    sd = hf_state_dict(source)
    int8 = layout.startswith("int8")
    src = (write_orig_sharded(tmp_path / "orig", sd, cfg, int8=int8) if layout.endswith("sharded")
           else write_orig_ckpt(tmp_path / "model.ckpt", sd, cfg, int8=int8))
    expected = dequantized_hf(sd, cfg) if int8 else sd
    if int8:  # the source model is the dequantized one
        source.load_state_dict(expected, strict=False)
    res = orig_to_hf(src, tmp_path / "hf", shape=ShapeOptions(config=cfg))
    assert res.report is not None and res.report.passed and res.report.max_abs_logits == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    got = hf_state_dict(hf)
    assert set(got) == set(expected)
    for k, v in expected.items():
        _assert_equal(got[k], v, k)
    ids = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _assert_equal(hf(ids).logits, source(ids).logits, "logits")
    cfg_json = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg_json["query_pre_attn_scalar"] == cfg.query_pre_attn_scalar and cfg_json["torch_dtype"] == "float32"
    assert cfg_json["cache_implementation"] == "hybrid" and "lm_head.weight" not in got
    prov = json.loads((tmp_path / "hf" / "gemma2_convert.json").read_text())
    assert prov["source"]["int8"] == int8 and prov["source"]["files"][0]["fingerprint"].startswith("sha256:")


def test_tokenizer_parity_and_head_flags(tmp_path):
    import sentencepiece as spm
    import transformers

    from gemma2_convert.formats.tokenizer.tiny import make_tiny_spm

    cfg = TINY_CONFIGS["gqa2"].replace(vocab_size=512, sliding_window=4096, max_position_embeddings=8192)
    sd = hf_state_dict(make_hf_model(cfg))
    write_orig_ckpt(tmp_path / "orig" / "model.ckpt", sd, cfg)
    make_tiny_spm(tmp_path / "orig" / "tokenizer.model", 512)  # found next to the checkpoint
    res = orig_to_hf(tmp_path / "orig", tmp_path / "hf", shape=ShapeOptions(head_dim=32, query_pre_attn_scalar=24))
    assert res.config == cfg and "--head-dim 32" in res.config_from
    assert {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"} <= set(res.files)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "orig" / "tokenizer.model"))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for line in TEXT.split("\n") + [TEXT]:
        assert tok(line, add_special_tokens=False)["input_ids"] == sp.encode(line), repr(line)
    assert tok(TEXT)["input_ids"][0] == 2  # <bos>
    assert tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == sp.encode("<start_of_turn><end_of_turn>")


def test_dtype_cast_and_fp16_warning(tmp_path):
    cfg = TINY_CONFIGS["gqa4"]
    sd = hf_state_dict(make_hf_model(cfg))
    src = write_orig_ckpt(tmp_path / "model.ckpt", sd, cfg)
    warnings: list[str] = []
    res = orig_to_hf(src, tmp_path / "bf16", shape=ShapeOptions(config=cfg), dtype="bfloat16")
    assert res.report.passed and res.report.tensors_equal == res.report.tensors_total
    assert not any("float16" in w for w in res.warnings) and "no tokenizer.model" in res.warnings[0]
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ck = open_checkpoint(tmp_path / "bf16")
    for k, v in sd.items():
        _assert_equal(ck.tensors[k].load(), v.to(torch.bfloat16), k)
    seen = Warnings()
    res = orig_to_hf(src, tmp_path / "fp16", shape=ShapeOptions(config=cfg), dtype="float16", progress=seen)
    warnings = seen.messages
    assert "float16" in warnings[0] and res.warnings == warnings


@pytest.mark.parametrize("names", ["hf", "orig"])
def test_single_safetensors_is_self_describing(tmp_path, names):
    cfg = TINY_CONFIGS["gqa2"]
    sd = hf_state_dict(make_hf_model(cfg))
    src = write_orig_ckpt(tmp_path / "model.ckpt", sd, cfg, int8=True)
    out = tmp_path / "m.safetensors"
    res = orig_to_safetensors(src, out, names=names, shape=ShapeOptions(config=cfg))
    assert res.report.passed and res.report.max_abs_logits == 0
    ck = open_checkpoint(out)
    assert ck.format == "safetensors" and ck.config == cfg and ck.metadata["gemma2.names"] == names
    from gemma2_convert.formats.safetensors import SafetensorsFile

    stored = set(SafetensorsFile(out).names())
    assert ("embedder.weight" in stored) == (names == "orig") and not any("scaler" in n for n in stored)
    for k, v in dequantized_hf(sd, cfg).items():
        _assert_equal(ck.tensors[k].load(), v, k)
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    ref = Gemma2ForCausalLM.from_tensors(cfg, dequantized_hf(sd, cfg))
    _assert_equal(from_pretrained(out, Gemma2ForCausalLM)(ids), ref(ids), "logits")


def test_verify_any_two_checkpoints(tmp_path):
    cfg = TINY_CONFIGS["mha"]
    sd = hf_state_dict(make_hf_model(cfg))
    src = write_orig_ckpt(tmp_path / "model.ckpt", sd, cfg)
    orig_to_hf(src, tmp_path / "hf", shape=ShapeOptions(config=cfg), verify=False)
    rep = verify_paths(src, tmp_path / "hf", shape=ShapeOptions(config=cfg))
    assert rep.passed and rep.tensors_equal == rep.tensors_total == len(sd)
    sd["model.layers.1.mlp.up_proj.weight"][0, 0] += 1.0
    other = write_orig_ckpt(tmp_path / "other.ckpt", sd, cfg)
    rep = verify_paths(other, tmp_path / "hf", shape=ShapeOptions(config=cfg))
    assert not rep.passed and rep.worst_tensors[0].name == "model.layers.1.mlp.up_proj.weight"


def test_verify_reports_progress_per_tensor_and_per_layer(tmp_path):
    from gemma2_convert.formats import open_checkpoint
    from gemma2_convert.pipeline.verify import verify

    cfg = TINY_CONFIGS["mha"]
    sd = hf_state_dict(make_hf_model(cfg))
    src = write_orig_ckpt(tmp_path / "model.ckpt", sd, cfg)
    orig_to_hf(src, tmp_path / "hf", shape=ShapeOptions(config=cfg), verify=False)
    ca = open_checkpoint(src, options=ShapeOptions(config=cfg))
    tensors, layers = [], []

    class Recorder(Progress):
        def advance(self, amount: int = 1, item: str = "") -> None:
            tensors.append(amount)

        def update(self, done: int, total: int | None = None) -> None:
            layers.append((done, total))

    rep = verify(ca, open_checkpoint(tmp_path / "hf"), n_tokens=16, progress=Recorder())
    assert rep.passed and rep.tensors_total == len(sd) and tensors == []
    # lockstep: one step per decoder layer (its tensors compared, both models run on every prompt), then the head
    total = cfg.num_hidden_layers + 1
    assert layers == [(i, total) for i in range(1, total + 1)]


def test_int8_quantizer_is_per_row_symmetric():
    cfg = TINY_CONFIGS["mha"]
    from gemma2_convert.formats.testing import orig_state_dict

    q = quantize_int8(orig_state_dict(hf_state_dict(make_hf_model(cfg)), cfg), cfg)
    w, s = q["model.layers.0.mlp.down_proj.weight"], q["model.layers.0.mlp.down_proj.weight_scaler"]
    assert w.dtype == torch.int8 and s.shape == (w.shape[0],) and "model.norm.weight_scaler" not in q


def test_cli_orig_to_safetensors_and_verify_json(tmp_path):
    from click.testing import CliRunner

    from gemma2_convert.cli.main import cli

    cfg = TINY_CONFIGS["gqa4"]
    src = write_orig_ckpt(tmp_path / "model.ckpt", hf_state_dict(make_hf_model(cfg)), cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    out = tmp_path / "m.safetensors"
    r = CliRunner().invoke(cli, ["orig-to-safetensors", str(src), str(out), "--config", str(tmp_path / "config.json"),
                                 "--names", "orig", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["verify"]["passed"] and res["verify"]["max_abs_logits"] == 0 and res["files"] == ["m.safetensors"]
    r = CliRunner().invoke(cli, ["verify", str(src), str(out), "--config", str(tmp_path / "config.json"), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["passed"] and rep["tensors_equal"] == rep["tensors_total"] == 2 + 11 * cfg.num_hidden_layers
