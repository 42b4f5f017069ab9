"""The benchmark harness on the tiny preset: every benchmark runs its real commands (one run, a few cases of
each kind), writes its report section into tmp_path and removes its scratch files. Not a timing test."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import report, synth

pytestmark = pytest.mark.slow  # every benchmark's real commands as child processes (~1 min)

REPO = Path(__file__).resolve().parent.parent


def _bench(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args, "--doc", str(tmp / "BENCH.md"),
                           "--workdir", str(tmp / "scratch")], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_bench_all_tiny_writes_every_section_and_cleans_up(tmp_path):
    p = _bench("all", "--size", "tiny", "--runs", "1", "--quick", tmp=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    p = _bench("scale", "--sizes", "tiny", "--runs", "1", tmp=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    doc = tmp_path / "BENCH.md"
    data = report.read_data(doc)
    assert {"orig-to-hf", "keras", "gguf", "quant", "forward", "scale", "targets", "machine"} <= set(data)
    assert data["orig-to-hf"]["cases"]["gemma2-convert orig-to-hf --no-verify"]["peak_anon_gb"] > 0
    assert data["keras"]["cases"]["gemma2-convert orig-to-hf --no-verify (KerasHub preset)"]["peak_anon_gb"] > 0
    assert data["scale"]["rows"][0]["verify"]["passed"] is True
    kernels = data["quant"]["kernels"]
    assert [v["same_bytes"] for t in ("Q8_0", "Q4_0") for v in kernels[t].values()].count(False) == 0
    text = doc.read_text(encoding="utf-8")
    assert "## Targets" in text and "convert_hf_to_gguf.py: **skipped**" in text
    assert "| Keras→HF: wall ≤ 1.5× cp (TINY) |" in text and "| Keras→HF: peak RssAnon ≤ 2 GB" in text
    assert list((tmp_path / "scratch").iterdir()) == [], "scratch files left behind"
    if importlib.util.find_spec("matplotlib") is None:
        assert "chart skipped: matplotlib is not installed" in p.stdout
    else:
        assert (tmp_path / "benchmarks.png").stat().st_size > 10_000


def test_bench_imatrix_tiny(tmp_path):
    """Ours and llama-imatrix on the same tiny model and text: a report row each, and the same statistics."""
    p = _bench("imatrix", "--size", "tiny", "--runs", "1", "--quick", tmp=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    data = report.read_data(tmp_path / "BENCH.md")["imatrix"]
    assert len(data["cases"]) == 2 and not data["llama_missing"] and data["worst_cosine"][0] >= 0.999
    assert list((tmp_path / "scratch").iterdir()) == [], "scratch files left behind"


def test_bench_verify_tiny(tmp_path):
    """verify against its floor: both compute modes pass, with a read time, a matmul rate and a ratio each."""
    p = _bench("verify", "--sizes", "tiny", "--tokens", "8", "--runs", "1", "--quick", tmp=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    data = report.read_data(tmp_path / "BENCH.md")["verify"]
    row = data["rows"][0]
    fwd = data["forward"]["results"]  # the forward cells against transformers, from the same run
    assert fwd["ref/bf16"]["prefill_tok_s"] > 0 and fwd["hf/bf16"]["decode_tok_s"] > 0
    for mode in ("exact", "fast"):
        v = row[mode]
        assert v["passed"] and v["read_s"] > 0 and v["gflop_s"] > 0 and v["ratio"] == v["wall_s"] / v["floor_s"]
    assert "| verify ≤ 1.5× its floor (TINY, exact) |" in (tmp_path / "BENCH.md").read_text(encoding="utf-8")
    assert list((tmp_path / "scratch").iterdir()) == [], "scratch files left behind"


def test_streamed_ckpt_equals_torch_save(tmp_path):
    """synth.write_orig_ckpt writes, record by record, what torch.save of the same state dict holds."""
    from gemma2_convert.formats.synthetic import random_tensors
    from gemma2_convert.formats.testing import orig_state_dict

    cfg = synth.preset("tiny")
    synth.write_orig_ckpt(tmp_path / "a.ckpt", cfg)
    synth.write_orig_ckpt(tmp_path / "shared.ckpt", cfg, share_layers=True)
    expected = orig_state_dict({k: v.load() for k, v in random_tensors(cfg, 0, torch.bfloat16).items()}, cfg)
    got = torch.load(tmp_path / "a.ckpt", weights_only=True, mmap=True)["model_state_dict"]
    assert set(got) == set(expected) | {"freqs_cis"}
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    shared = torch.load(tmp_path / "shared.ckpt", weights_only=True, mmap=True)["model_state_dict"]
    last = cfg.num_hidden_layers - 1
    assert torch.equal(shared[f"model.layers.{last}.mlp.up_proj.weight"], expected["model.layers.0.mlp.up_proj.weight"])
    assert (tmp_path / "shared.ckpt").stat().st_size < (tmp_path / "a.ckpt").stat().st_size


def test_report_sections_are_replaced_in_place(tmp_path):
    doc = tmp_path / "B.md"
    report.write_sections(doc, {"gguf": report.section("gguf", ["## one"], {"n": 1, "cmd": "a --flag"})})
    report.write_sections(doc, {"orig-to-hf": report.section("orig-to-hf", ["## two"], {"n": 2})})
    report.write_sections(doc, {"gguf": report.section("gguf", ["## three"], {"n": 3, "cmd": "a --flag"})})
    text = doc.read_text()
    assert text.count("<!-- bench:gguf -->") == 1 and "## one" not in text
    assert text.index("## two") < text.index("## three")  # written in report order
    assert report.read_data(doc) == {"gguf": {"n": 3, "cmd": "a --flag"}, "orig-to-hf": {"n": 2}}
    assert "--flag" not in text.split("<!-- data")[1]  # no "--" inside an HTML comment
    json.dumps(report.read_data(doc))


def test_chart_is_skipped_with_a_message_without_matplotlib(tmp_path, monkeypatch):
    from bench import chart

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    assert chart.draw(tmp_path / "B.md", tmp_path / "b.png").startswith("chart skipped: matplotlib is not installed")
    assert not (tmp_path / "b.png").exists()
