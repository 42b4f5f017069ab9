"""``python -m bench autoround`` on the tiny preset: its real commands run (one run, the quick cases), the report
section is written with a time per layer for every command, and the scratch files are removed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # child processes quantizing a model (~1 min)

REPO = Path(__file__).resolve().parent.parent


def test_bench_autoround_tiny(tmp_path: Path) -> None:
    doc, scratch = tmp_path / "BENCH.md", tmp_path / "scratch"
    p = subprocess.run([sys.executable, "-m", "bench", "autoround", "--size", "tiny", "--runs", "1", "--quick",
                        "--doc", str(doc), "--workdir", str(scratch)], cwd=REPO, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    text = doc.read_text()
    assert "Learned rounding: time of --method autoround against gptq (TINY shapes)" in text
    assert "gemma2-quantize gptq" in text and "gemma2-quantize autoround fast" in text
    assert not any(scratch.rglob("*.gguf")) if scratch.exists() else True
