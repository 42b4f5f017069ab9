"""The command line: --help/--version, the demo, one-line errors."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from gemma2_convert.cli.main import cli
from gemma2_convert.cli.quantize import cli as qcli


def test_help_and_version():
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0 and "demo" in r.output and "Examples" in r.output
    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0 and "gemma2-convert, version" in r.output
    r = CliRunner().invoke(qcli, ["--version"])
    assert r.exit_code == 0 and "gemma2-quantize, version" in r.output


def test_commands_freeze_the_heap_at_exit():
    """main() registers gc.freeze at exit (shutdown then skips collecting torch's objects); handlers registered
    before it still run after it, and output is still flushed."""
    code = ("import atexit, gc; from gemma2_convert.cli.errors import quick_exit; "
            "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0)); quick_exit(); print('x' * 100000)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "x" * 100000 + "\nfrozen True\n", r.stderr


def test_demo_runs_and_prints_table(tmp_path):
    work = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "gemma2_convert.cli.main", "demo", "--workdir", str(work)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "240"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gemma2-convert demo" in r.stdout and "FAIL" not in r.stdout
    assert r.stdout.count("PASS") >= 2
    flax = [ln for ln in r.stdout.splitlines() if "Flax (Orbax) → HF" in ln and "│" in ln]
    has_tensorstore = importlib.util.find_spec("tensorstore") is not None
    assert len(flax) == 1 and ("PASS" if has_tensorstore else "SKIP") in flax[0], r.stdout
    if has_tensorstore:
        assert "46/46 equal tiny-hf" in flax[0] and (work / "tiny-flax" / "gemma2-tiny" / "_METADATA").is_file()
    keras = [ln for ln in r.stdout.splitlines() if "Keras (KerasHub) → HF" in ln and "│" in ln]
    has_h5py = importlib.util.find_spec("h5py") is not None
    assert len(keras) == 1 and ("PASS" if has_h5py else "SKIP") in keras[0], r.stdout
    if has_h5py:
        assert "46/46 tensors equal, max |Δ logits| 0" in keras[0] and "46/46 equal tiny-hf" in keras[0]
        assert (work / "tiny-keras" / "model.weights.h5").is_file()


def test_demo_flax_step_without_tensorstore(tmp_path, monkeypatch):
    from gemma2_convert.pipeline.demo import step_flax_to_hf
    from reference import Gemma2Config

    monkeypatch.setitem(sys.modules, "tensorstore", None)  # import tensorstore → ImportError
    row = step_flax_to_hf(tmp_path, Gemma2Config.preset("tiny"))
    assert row.skipped and row.ok and row.check == "skipped: pip install 'gemma2-convert[flax]'"
    assert not any(tmp_path.iterdir())


def test_demo_keras_step_without_h5py(tmp_path, monkeypatch):
    from gemma2_convert.pipeline.demo import step_keras_to_hf
    from reference import Gemma2Config

    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py → ImportError
    row = step_keras_to_hf(tmp_path, Gemma2Config.preset("tiny"))
    assert row.skipped and row.ok and row.check == "skipped: pip install 'gemma2-convert[keras]'"
    assert not any(tmp_path.iterdir())


def test_demo_refuses_non_empty_workdir(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    r = subprocess.run([sys.executable, "-m", "gemma2_convert.cli.main", "demo", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "already exists; pass --force" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_every_command_has_examples_and_quiet():
    """Each command's --help shows examples and a --quiet option (no progress bar)."""
    helps = {name: CliRunner().invoke(cli, [name, "--help"]) for name in cli.commands}
    helps["gemma2-quantize"] = CliRunner().invoke(qcli, ["--help"])
    assert set(helps) >= {"demo", "orig-to-hf", "orig-to-safetensors", "orig-to-gguf", "to-gguf", "gguf-to-hf",
                          "verify", "inspect", "gemma2-quantize"}
    for name, r in helps.items():
        assert r.exit_code == 0, (name, r.output)
        assert "Example" in r.output and "--quiet" in r.output, (name, r.output)


def test_usage_errors_are_one_line():
    r = CliRunner().invoke(cli, ["to-gguf", "missing.safetensors", "out.gguf"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: Invalid value for 'SRC': Path 'missing.safetensors' does not exist.")
    r = CliRunner().invoke(qcli, ["x", "y", "--bits", "3"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "Invalid value for '--bits'" in r.stderr, r.stderr


def _console(terminal: bool):
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), force_terminal=terminal, width=120, color_system=None)


def test_rich_progress_phases_on_a_terminal():
    """Nested phases are rows of one display (bytes: size and speed; other units: a count; no total: a
    spinner); it stops when the last phase ends; warnings print as one line."""
    from gemma2_convert.cli.console import RichProgress

    tty = _console(True)
    with RichProgress(console=tty) as p:
        with p.phase("writing", 4000):
            p.advance(1000, "model.layers.0.mlp.up_proj.weight")
            with p.phase("reference forward", None, "layers"):
                p.update(3, 8)
                with p.phase("scanning", None, "tensors"):
                    p.advance(5)
                    tasks = p.display.tasks
                    assert [(t.description, t.completed, t.total) for t in tasks] == [
                        ("writing", 1000, 4000), ("reference forward", 3, 8), ("scanning", 5, None)]
                    rows = _console(False)
                    rows.print(p.display.make_tasks_table(tasks))
                    text = rows.file.getvalue()
                    assert "writing model.layers.0.mlp.up_proj.weight" in text and "1.0/4.0 kB" in text, text
                    assert "3/8 layers" in text and "5 tensors" in text, text
            assert len(p.display.tasks) == 1 and p.display.live.is_started
        assert not p.display.tasks and not p.display.live.is_started
        p.warn("float16 output:\n  may overflow")
    assert "warning: float16 output: may overflow\n" in tty.file.getvalue()


@pytest.mark.parametrize("quiet, terminal", [(True, True), (False, False)])
def test_rich_progress_silent_when_quiet_or_not_a_terminal(quiet, terminal):
    from gemma2_convert.cli.console import RichProgress

    console = _console(terminal)
    with RichProgress(quiet, console=console) as p, p.phase("writing", 10):
        p.advance(5, "x")
        p.update(7)
        p.warn("[not markup]")
    assert p.display is None and console.file.getvalue() == "warning: [not markup]\n"


def test_rich_progress_stops_when_the_work_raises():
    from gemma2_convert.cli.console import RichProgress

    p = RichProgress(console=_console(True))
    with pytest.raises(KeyboardInterrupt), p:
        p.begin("writing", 10)
        p.begin("verifying", None)
        raise KeyboardInterrupt
    assert not p.display.tasks and not p.display.live.is_started
