"""Model-level bad inputs to orig-to-hf (tensor names, shapes, config, damaged data): one error line on stderr
naming the file and the problem (warnings, one line each, may precede it), a non-zero exit, and nothing at
the output path. File-level damage (truncation, pickles that run code, foreign files) and --force are in
the corpus, tests/badinputs/, for every command."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemma2_convert.formats.testing import write_orig_ckpt
from tests.conftest import TINY_CONFIGS, hf_state_dict, make_hf_model

CFG = TINY_CONFIGS["gqa2"]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, Path]:
    """A valid tiny model.ckpt and its config.json."""
    d = tmp_path_factory.mktemp("good")
    ckpt = write_orig_ckpt(d / "model.ckpt", hf_state_dict(make_hf_model(CFG)), CFG)
    (d / "config.json").write_text(json.dumps(CFG.to_hf_dict()))
    return ckpt, d / "config.json"


def run(*args: object, subprocess_: bool = False) -> subprocess.CompletedProcess:
    """The command in this process (click's runner), or as a real subprocess."""
    argv = ["orig-to-hf", *map(str, args)]
    if subprocess_:
        return subprocess.run([sys.executable, "-m", "gemma2_convert.cli.main", *argv], capture_output=True, text=True,
                              timeout=120)
    from click.testing import CliRunner

    from gemma2_convert.cli.main import cli

    r = CliRunner().invoke(cli, argv)
    return subprocess.CompletedProcess(argv, r.exit_code, r.stdout, r.stderr)


def assert_clean_failure(r: subprocess.CompletedProcess, out: Path, *patterns: str) -> str:
    assert r.returncode != 0, r.stdout
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for p in patterns:
        assert re.search(p, lines[0]), (p, lines[0])
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*")), "output left behind"
    return lines[0]


def _save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def test_missing_and_unexpected_tensors_are_all_listed(tmp_path, good):
    sd = torch.load(good[0], weights_only=True)["model_state_dict"]
    for k in ("model.layers.3.mlp.up_proj.weight", "model.layers.0.input_layernorm.weight"):
        del sd[k]
    sd["model.layers.1.self_attn.q_norm.weight"] = torch.zeros(32)
    bad = _save(tmp_path / "model.ckpt", {"model_state_dict": sd})
    assert_clean_failure(run(bad, tmp_path / "out", "--config", good[1]), tmp_path / "out", re.escape(str(bad)),
                         r"missing 2 tensors: model\.layers\.0\.input_layernorm\.weight, "
                         r"model\.layers\.3\.mlp\.up_proj\.weight", r"unexpected 1 tensors: .*q_norm")


def test_shapes_inconsistent_with_config(tmp_path, good):
    cfg = json.loads(good[1].read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    line = assert_clean_failure(run(good[0], tmp_path / "out", "--config", tmp_path / "config.json"),
                                tmp_path / "out", re.escape(str(good[0])), "inconsistent with the config")
    assert "mlp.down_proj.weight: expected [64, 128], got [64, 96]" in line


def test_unpublished_shapes_need_a_config(tmp_path, good):
    assert_clean_failure(run(good[0], tmp_path / "out"), tmp_path / "out", "match no published Gemma 2 size",
                         "--config config.json")


def test_variant_contradicting_shapes(tmp_path, good):
    assert_clean_failure(run(good[0], tmp_path / "out", "--variant", "9b"), tmp_path / "out",
                         re.escape(str(good[0])), "--variant 9b contradicts the tensor shapes: vocab_size 128 "
                         r"\(expected 256000\), hidden_size 64 \(expected 3584\)")


def test_corrupt_tensor_bytes_fail_verification(tmp_path, good):
    import zipfile

    data = bytearray(good[0].read_bytes())
    with zipfile.ZipFile(good[0]) as z:  # flip bytes inside the largest tensor record
        info = max(z.infolist(), key=lambda i: i.file_size)
    start = info.header_offset + 30 + len(info.filename.encode()) + 64
    data[start + 1000: start + 1004] = b"\x7f\x7f\x7f\x7f"
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(bytes(data))
    assert_clean_failure(run(bad, tmp_path / "out", "--config", good[1]), tmp_path / "out", re.escape(str(bad)),
                         "corrupt data .*CRC")


def test_failed_verification_leaves_nothing(tmp_path, good, monkeypatch):
    import gemma2_convert.pipeline.convert as convert
    from gemma2_convert.core.errors import VerificationError

    real = convert.verify

    def broken(a, b, **kw):
        rep = real(a, b, **kw)
        rep.passed, rep.failures = False, ["max |Δ logits| 1 > 0"]
        return rep

    monkeypatch.setattr(convert, "verify", broken)
    out = tmp_path / "out"
    with pytest.raises(VerificationError, match=r"verification failed: max \|Δ logits\| 1 > 0"):
        convert.orig_to_hf(good[0], out, shape=convert.ShapeOptions(config=good[1]))
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
