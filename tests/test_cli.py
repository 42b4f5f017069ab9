"""The command line: --help/--version, the demo, one-line errors."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from gemma2_convert.cli import cli
from quant.cli import cli as qcli


def test_help_and_version():
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0 and "demo" in r.output and "Examples" in r.output
    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0 and "gemma2-convert, version" in r.output
    r = CliRunner().invoke(qcli, ["--version"])
    assert r.exit_code == 0 and "gemma2-quantize, version" in r.output


def test_demo_runs_and_prints_table(tmp_path):
    work = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "gemma2_convert.cli", "demo", "--workdir", str(work)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gemma2-convert demo" in r.stdout and "FAIL" not in r.stdout
    assert r.stdout.count("PASS") >= 2


def test_demo_refuses_non_empty_workdir(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    r = subprocess.run([sys.executable, "-m", "gemma2_convert.cli", "demo", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "already exists; pass --force" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "keep.txt").read_text() == "user data"
