"""Every bad input through every command, as a child process: a non-zero exit, exactly one stderr line
naming the input and (for the commands that read that far) the problem, no traceback, nothing written,
the input unchanged, no code from the input run, and no allocation to match a lying header."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.badinputs.corpus import COMMANDS, ORIG_COMMANDS, Case, Good
from tests.badinputs.families import FAMILY_NAMES
from tests.badinputs.runner import Result, tree_digest

MAX_RSS_GROWTH_MB = 256
"""Any case: the tiny model's conversion before it fails stays far below this."""
MAX_LYING_RSS_GROWTH_MB = 32
MAX_LYING_SECONDS = 15
TAKES_CONFIG = ORIG_COMMANDS + ("verify", "inspect")
CALIBRATION = Path(__file__).resolve().parents[1] / "fixtures" / "calibration.txt"


def argv(cmd: str, case: Case, good: Good, out: Path) -> list[object]:
    cfg = ["--config", case.config] if case.config is not None and cmd in TAKES_CONFIG else []
    return {
        "orig-to-hf": ["gemma2-convert", "orig-to-hf", case.path, out / "hf"],
        "orig-to-safetensors": ["gemma2-convert", "orig-to-safetensors", case.path, out / "model.safetensors"],
        "orig-to-gguf": ["gemma2-convert", "orig-to-gguf", case.path, out / "model.gguf"],
        "to-gguf": ["gemma2-convert", "to-gguf", case.path, out / "model.gguf"],
        "gguf-to-hf": ["gemma2-convert", "gguf-to-hf", case.path, out / "hf"],
        "verify": ["gemma2-convert", "verify", good.hf, case.path],
        "inspect": ["gemma2-convert", "inspect", case.path, "--scan"],
        "gemma2-quantize": ["gemma2-quantize", case.path, out / "quantized", "--group-size", "32"],
        "imatrix": ["gemma2-convert", "imatrix", case.path, "--calibration", CALIBRATION, "-o", out / "im.gguf",
                    "--chunk-size", "16", "--chunks", "1"],
    }[cmd] + cfg


def problems(r: Result, cmd: str, case: Case, out: Path, digest: str) -> list[str]:
    found = []
    if r.timed_out:
        found.append("timed out")
    if r.rc == 0:
        found.append("exit code 0")
    if "Traceback" in r.stderr or r.rc == 99:
        found.append("traceback")
    line = r.lines[0] if r.lines else ""
    if len(r.lines) != 1 or not line.startswith("error: "):
        found.append(f"stderr is not one error line ({len(r.lines)} lines)")
    elif str(case.path) not in line:
        found.append("the error line does not name the input")
    elif cmd in case.reads and not re.search(case.problem, line):
        found.append(f"the error line does not match {case.problem!r}")
    if any(out.iterdir()):
        found.append(f"left behind: {sorted(p.name for p in out.iterdir())}")
    if tree_digest(case.path) != digest:
        found.append("the input was modified")
    if case.marker is not None and case.marker.exists():
        found.append("code from the input ran")
    limit = MAX_LYING_RSS_GROWTH_MB if case.lying else MAX_RSS_GROWTH_MB
    if r.rss_growth_mb > limit:
        found.append(f"RSS grew {r.rss_growth_mb:.0f} MB > {limit} MB")
    if case.lying and r.seconds > MAX_LYING_SECONDS:
        found.append(f"took {r.seconds:.1f}s")
    return found


@pytest.mark.slow  # every case × every command as child processes; test_debug_*, test_readers stay fast
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_command_fails_cleanly(family, corpus, good, server, tmp_path):
    if family == "orbax_lies":
        pytest.importorskip("tensorstore", reason="the Orbax cases need pip install 'gemma2-convert[flax]'")
    cases = [c for c in corpus.values() if c.family == family]
    assert cases
    report = []
    for case in cases:
        digest = tree_digest(case.path)
        for cmd in COMMANDS:
            out = tmp_path / case.name / cmd
            out.mkdir(parents=True)
            r = server.run(argv(cmd, case, good, out), cwd=out)
            found = problems(r, cmd, case, out, digest)
            if found:
                report.append(f"[{case.name} × {cmd}] {'; '.join(found)}\n{r.describe()}")
    assert not report, f"{len(report)} failure(s):\n\n" + "\n\n".join(report)


def test_debug_shows_the_traceback(corpus, server, tmp_path):
    case = corpus["gguf-version-9"]
    for argv in (["gemma2-convert", "--debug", "inspect", case.path],
                 ["gemma2-quantize", case.path, tmp_path / "q", "--debug"]):
        r = server.run(argv, cwd=tmp_path)
        assert r.rc != 0 and "Traceback" in r.stderr and "GGUF version 9 is not supported" in r.stderr, r.describe()
        assert not any(tmp_path.iterdir())
