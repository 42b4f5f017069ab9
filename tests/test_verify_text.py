"""``verify --text FILE``: the user's own text compared too, with both models' perplexity on it."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from gemma2_convert.cli.main import cli
from gemma2_convert.pipeline.convert import convert
from gemma2_convert.formats.options import ConvertOptions

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MODEL, TEXT = FIXTURES / "gemma2-tiny-trained", FIXTURES / "eval.txt"


def _verify(a: Path, b: Path, *extra: str):
    return CliRunner().invoke(cli, ["verify", str(a), str(b), "--text", str(TEXT), "--json", *extra])


def test_text_is_compared_and_its_perplexity_reported(tmp_path):
    copy = tmp_path / "copy.safetensors"
    convert(MODEL, copy, ConvertOptions(to="safetensors", verify=False))
    r = _verify(MODEL, copy)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    text = rep["text"]
    assert text["tokens"] > 500 and text["max_abs_logits"] == 0 and text["top1"] == 1.0
    assert text["ppl_a"] == text["ppl_b"] and 1.0 < text["ppl_a"] < 100  # a trained model on in-domain text
    assert rep["tokens"] < text["tokens"]  # the fixed prompts are still compared, and reported apart


def test_text_failures_are_named(tmp_path):
    q4 = tmp_path / "q4_0.gguf"
    convert(MODEL, q4, ConvertOptions(to="gguf", gguf_type="q4_0", verify=False))
    r = _verify(MODEL, q4, "--tolerance", "lossy", "--max-kl", "1e-9", "--min-top1", "0")
    assert r.exit_code == 3
    rep = json.loads(r.stdout)
    assert rep["text"]["mean_kl"] > 1e-9 and any(f.startswith("on the text: mean KL") for f in rep["failures"])


def test_text_needs_a_tokenizer(tmp_path):
    bare = tmp_path / "bare.safetensors"
    convert(MODEL, bare, ConvertOptions(to="safetensors", verify=False))
    (tmp_path / "other").mkdir()
    moved = tmp_path / "other" / "bare.safetensors"
    bare.rename(moved)  # no tokenizer.model beside it any more
    r = _verify(moved, MODEL)
    assert r.exit_code == 2 and "--text needs the model's tokenizer" in r.output


def test_auto_judges_a_quantized_file_by_its_types(tmp_path):
    """``verify ORIGINAL model-Q4_0.gguf`` with the default tolerance passes a healthy file (it is judged by the
    GGUF type's bounds, not as a cast) and still fails a broken one."""
    q4 = tmp_path / "q4_0.gguf"
    convert(MODEL, q4, ConvertOptions(to="gguf", gguf_type="q4_0", verify=False))
    r = CliRunner().invoke(cli, ["verify", str(MODEL), str(q4), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["passed"] and rep["tensors_equal"] < rep["tensors_total"] and rep["max_abs_logits"] > 0
    broken = tmp_path / "broken"  # every norm off by one: the classic "+1 stored twice" conversion bug
    convert(MODEL, broken, ConvertOptions(to="hf", verify=False))
    from safetensors.torch import load_file, save_file

    f = broken / "model.safetensors"
    sd = load_file(f)
    save_file({k: v + 1 if k.endswith("norm.weight") else v for k, v in sd.items()}, f, metadata={"format": "pt"})
    convert(broken, tmp_path / "broken.gguf", ConvertOptions(to="gguf", gguf_type="q4_0", verify=False))
    r = CliRunner().invoke(cli, ["verify", str(MODEL), str(tmp_path / "broken.gguf"), "--json"])
    assert r.exit_code == 3 and not json.loads(r.stdout)["passed"]


def test_report_states_what_was_proven_and_a_changed_config_fails(tmp_path):
    copy = tmp_path / "copy"
    convert(MODEL, copy, ConvertOptions(to="hf", verify=False))
    r = CliRunner().invoke(cli, ["verify", str(MODEL), str(copy), "--json"])
    assert r.exit_code == 0, r.output
    proof = json.loads(r.stdout)["proof"]
    assert proof[0].startswith("tensors: ") and "all equal" in proof[0]
    assert proof[1] == "config: every field the forward pass reads is equal" and "identical" in proof[2]
    cfg = json.loads((copy / "config.json").read_text())
    cfg["query_pre_attn_scalar"] = cfg["query_pre_attn_scalar"] * 2  # the wrong query scale of some converters
    (copy / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(cli, ["verify", str(MODEL), str(copy), "--json"])
    rep = json.loads(r.stdout)
    assert r.exit_code == 3 and rep["proof"] == []
    assert any(f.startswith("the configs differ in what the forward pass reads: query_pre_attn_scalar")
               for f in rep["failures"]), rep["failures"]
