"""Data safety: an interrupted or starved run leaves nothing and says why; free space is checked before
writing; no command replaces an existing output without --force, or ever its own input; NaN/Inf and
float16 overflows are refused unless --allow-nonfinite."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gemma2_convert.core.errors import DiskSpaceError, NonFiniteError
from gemma2_convert.core.progress import Warnings
from tests.badinputs.corpus import CFG, Good, build_good
from tests.badinputs.runner import REPO, ForkServer, tree_digest


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Good:
    return build_good(tmp_path_factory.mktemp("good"))


@pytest.fixture(scope="module")
def server():
    s = ForkServer()
    yield s
    s.close()


def assert_nothing_left(out: Path) -> None:
    assert not out.exists(), f"{out} was left behind"
    assert not list(out.parent.glob(f".{out.name}.*")), sorted(p.name for p in out.parent.iterdir())


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


# ---- interrupted runs ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory) -> tuple[Path, Path]:
    """A ~200 MB gemma_pytorch checkpoint: writing and verifying it takes seconds."""
    from gemma2_convert.formats.synthetic import random_tensors
    from gemma2_convert.formats.testing import write_orig_ckpt

    cfg = CFG.replace(vocab_size=65536, hidden_size=768, intermediate_size=256, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64)
    d = tmp_path_factory.mktemp("big")
    sd = {k: v.load() for k, v in random_tensors(cfg, 0, torch.float32).items()}
    ckpt = write_orig_ckpt(d / "model.ckpt", sd, cfg)
    (d / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    return ckpt, d / "config.json"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_conversion_leaves_nothing(sig, big_ckpt, tmp_path):
    ckpt, config = big_ckpt
    digest = tree_digest(ckpt)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "gemma2_convert", "orig-to-hf", str(ckpt), str(out), "--config",
                             str(config)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not any(p.stat().st_size for p in tmp_path.glob(".out.partial-*/*.safetensors")):  # mid-write
        assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()}"
        assert time.monotonic() < deadline, "the write never started"
        time.sleep(0.005)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    lines = [ln for ln in stderr.strip().splitlines() if not ln.startswith("warning: ")]
    assert proc.returncode == 130, stderr
    assert lines == [f"error: {out}: interrupted by signal {sig.name}; the partial output was removed"], stderr
    assert_nothing_left(out)
    assert tree_digest(ckpt) == digest


@pytest.fixture(scope="module")
def big_hf(tmp_path_factory) -> Path:
    """A ~130 MB bf16 HF directory (with a tokenizer) of the big_ckpt shapes."""
    from gemma2_convert.formats.hf import write_hf_dir
    from gemma2_convert.formats.synthetic import random_tensors
    from gemma2_convert.formats.tokenizer.tiny import make_tiny_spm

    cfg = CFG.replace(vocab_size=65536, hidden_size=768, intermediate_size=256, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64)
    d = tmp_path_factory.mktemp("big-hf")
    tok = make_tiny_spm(d / "tokenizer.model", 512)
    (d / "hf").mkdir()
    write_hf_dir(d / "hf", cfg, list(random_tensors(cfg, 0, torch.bfloat16).items()), tokenizer=tok)
    return d / "hf"


def test_interrupted_gguf_write_leaves_nothing(big_hf, tmp_path):
    """A signal while the GGUF writer waits for its threads is the interrupt (exit 130), not an error of the
    tensor being written."""
    out = tmp_path / "out.gguf"
    proc = subprocess.Popen([sys.executable, "-m", "gemma2_convert", "to-gguf", str(big_hf), str(out), "--type", "f16",
                             "--no-verify"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not any(p.stat().st_size > (8 << 20) for p in tmp_path.glob(".out.gguf.partial-*")):  # mid-write
        assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()}"
        assert time.monotonic() < deadline, "the write never started"
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    lines = [ln for ln in stderr.strip().splitlines() if not ln.startswith("warning: ")]
    assert proc.returncode == 130, stderr
    assert lines == [f"error: {out}: interrupted by signal SIGINT; the partial output was removed"], stderr
    assert_nothing_left(out)


# ---- disk full -------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["orig-to-hf", "orig-to-gguf", "gguf-to-hf", "gemma2-quantize"])
def test_disk_full_leaves_nothing(command, good, server, tmp_path):
    """RLIMIT_FSIZE in the child: the first write past 50 kB fails as a full disk would (EFBIG / ENOSPC)."""
    out = tmp_path / ("out.gguf" if command == "orig-to-gguf" else "out")
    src = good.gguf if command == "gguf-to-hf" else good.hf if command == "gemma2-quantize" else good.ckpt
    argv = ["gemma2-convert", command, src, out] if command != "gemma2-quantize" else \
        ["gemma2-quantize", src, out, "--group-size", "32", "--no-verify"]
    if command.startswith("orig-"):
        argv += ["--config", good.config]
    r = server.run(argv, cwd=tmp_path, fsize=50_000)
    line = one_error_line(r.stderr)
    assert r.rc == 28, r.describe()
    assert line == f"error: {out}: no space left while writing (File too large: disk full or file size limit); " \
                   "the partial output was removed", line
    assert_nothing_left(out)


# ---- free space, checked before writing --------------------------------------------------------

def test_free_space_is_checked_before_writing(good, tmp_path, monkeypatch):
    import gemma2_convert.formats.output as output
    from gemma2_convert.pipeline.convert import orig_to_hf
    from gemma2_convert.formats.orig_config import ShapeOptions
    from gemma2_convert.pipeline.gguf import gguf_to_hf, to_gguf
    from gemma2_convert.pipeline.quantize import QuantizeOptions, quantize_checkpoint

    monkeypatch.setattr(output, "free_bytes", lambda path: 123_456)
    runs = {
        "orig-to-hf": lambda out: orig_to_hf(good.ckpt, out, shape=ShapeOptions(config=good.config)),
        "to-gguf": lambda out: to_gguf(good.hf, out, type_name="f32"),
        "gguf-to-hf": lambda out: gguf_to_hf(good.gguf, out),
        "quantize": lambda out: quantize_checkpoint(good.hf, out, QuantizeOptions(group_size=32, verify=False)),
    }
    for name, run in runs.items():
        out = tmp_path / name
        with pytest.raises(DiskSpaceError, match=r"needs about [\d.]+ [KM]B for the output but only 123\.5 KB is free"):
            run(out)
        assert_nothing_left(out)


def test_free_space_error_through_the_cli(good, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import gemma2_convert.formats.output as output
    from gemma2_convert.cli.main import cli

    monkeypatch.setattr(output, "free_bytes", lambda path: 10)
    out = tmp_path / "x.gguf"
    r = CliRunner().invoke(cli, ["to-gguf", str(good.hf), str(out)])
    assert r.exit_code == 28
    assert re.fullmatch(rf"error: {re.escape(str(out))}: needs about [\d.]+ [KM]B for the output but only 10 B is free "
                        "on its filesystem; free some space or write elsewhere", one_error_line(r.stderr))
    assert_nothing_left(out)


# ---- --force and inputs ----------------------------------------------------------------------

WRITERS = {
    "orig-to-hf": ("ckpt", "dir", ["--no-verify"]), "orig-to-safetensors": ("ckpt", "model.safetensors", ["--no-verify"]),
    "orig-to-gguf": ("ckpt", "model.gguf", ["--no-verify"]), "to-gguf": ("hf", "model.gguf", ["--no-verify"]),
    "gguf-to-hf": ("gguf", "dir", ["--no-verify"]), "gemma2-quantize": ("hf", "dir", ["--no-verify", "--group-size", "32"]),
}


def _argv(command: str, src: Path, out: Path, extra: list[str], good: Good) -> list[object]:
    head = ["gemma2-quantize"] if command == "gemma2-quantize" else ["gemma2-convert", command]
    cfg = ["--config", good.config] if command.startswith("orig-") else []
    return head + [src, out, *extra, *cfg]


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_existing_output_needs_force(command, good, server, tmp_path):
    kind, name, extra = WRITERS[command]
    src = getattr(good, kind)
    out = tmp_path / ("out" if name == "dir" else name)
    if name == "dir":
        out.mkdir()
        (out / "keep.txt").write_text("user data")
    else:
        out.write_text("user data")
    before = tree_digest(out)
    r = server.run(_argv(command, src, out, extra, good), cwd=tmp_path)
    assert r.rc == 2 and one_error_line(r.stderr) == f"error: {out}: already exists; pass --force to replace it " \
                                                     "(the old output is kept until the new one is complete)", r.describe()
    assert tree_digest(out) == before
    r = server.run(_argv(command, src, out, extra + ["--force"], good), cwd=tmp_path)
    assert r.rc == 0, r.describe()
    assert tree_digest(out) != before and not list(tmp_path.glob(".out*")) and not list(tmp_path.glob(".model*"))


def test_output_may_not_replace_its_input(good, server, tmp_path):
    import shutil

    gguf = tmp_path / "model.gguf"
    shutil.copy(good.gguf, gguf)
    hf = tmp_path / "hf"
    shutil.copytree(good.hf, hf)
    digests = tree_digest(gguf), tree_digest(hf)
    for argv, src in ((["gemma2-convert", "to-gguf", gguf, gguf, "--force"], gguf),
                      (["gemma2-convert", "gguf-to-hf", gguf, tmp_path, "--force"], gguf),
                      (["gemma2-quantize", hf, hf, "--force"], hf)):
        r = server.run(argv, cwd=tmp_path)
        assert r.rc == 2, r.describe()
        assert "the output would replace the input" in one_error_line(r.stderr) and str(src) in r.stderr
    assert (tree_digest(gguf), tree_digest(hf)) == digests


# ---- non-finite weights and float16 overflow -----------------------------------------------------

def _ckpt_with(good: Good, tmp_path: Path, name: str, index: tuple[int, int], value: float) -> Path:
    """The corpus model as a model.ckpt (its tokenizer next to it) with one weight set to ``value``."""
    import shutil

    from gemma2_convert.formats.testing import write_orig_ckpt
    from tests.badinputs.corpus import tensors

    sd = tensors()
    sd[name][index] = value
    shutil.copy(good.tokenizer, tmp_path / "tokenizer.model")
    return write_orig_ckpt(tmp_path / "model.ckpt", sd, CFG)


def test_float16_overflow_is_refused_unless_allowed(good, server, tmp_path):
    ckpt = _ckpt_with(good, tmp_path, "model.layers.1.self_attn.o_proj.weight", (2, 3), 1e6)
    for command, out, fix in (("orig-to-hf", tmp_path / "hf", "--dtype float16"),
                              ("orig-to-gguf", tmp_path / "m.gguf", "--type f16")):
        base = ["gemma2-convert", command, ckpt, out, *fix.split(), "--config", good.config, "--no-verify"]
        r = server.run(base, cwd=tmp_path)
        assert r.rc == 2, r.describe()
        line = one_error_line("\n".join(ln for ln in r.lines if not ln.startswith("warning: float16 output")))
        assert re.search(r"tensor '(model\.layers\.1\.self_attn\.o_proj|blk\.1\.attn_output)\.weight': values beyond "
                         r"the float16 range \(max \|w\| 1e\+06 > 65504\) would be stored as inf; use --(dtype "
                         r"bfloat16|type bf16)", line), line
        assert_nothing_left(out)
        r = server.run(base + ["--allow-nonfinite"], cwd=tmp_path)
        assert r.rc == 0, r.describe()
        assert "written as is (--allow-nonfinite)" in r.stderr and out.exists()


def test_nonfinite_library_errors_name_the_tensor(good, tmp_path):
    from gemma2_convert.pipeline.convert import orig_to_safetensors
    from gemma2_convert.formats.orig_config import ShapeOptions

    ckpt = _ckpt_with(good, tmp_path, "model.layers.0.mlp.gate_proj.weight", (1, 2), math.nan)
    out = tmp_path / "x.safetensors"
    with pytest.raises(NonFiniteError, match=r"model\.ckpt: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight': 1 NaN "
                                             r"and 0 ±Inf value\(s\), the first at index \[1, 2\]; .* pass "
                                             r"--allow-nonfinite"):
        orig_to_safetensors(ckpt, out, shape=ShapeOptions(config=good.config))
    assert_nothing_left(out)
    seen = Warnings()
    res = orig_to_safetensors(ckpt, out, shape=ShapeOptions(config=good.config), verify=False,
                              allow_nonfinite=True, progress=seen)
    warnings = seen.messages
    assert res.warnings == warnings and "1 NaN and 0 ±Inf" in warnings[0] and out.is_file()

