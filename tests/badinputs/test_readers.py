"""Every reader on every bad input, in this process: the only exception is a ConversionError naming the
input (a reader may also decline by opening a file that is valid for it, as the non-finite cases are)."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from gemma2_convert.core.errors import ConversionError
from gemma2_convert.formats import READERS
from gemma2_convert.formats.orig_config import ShapeOptions
from tests.badinputs.runner import REPO


@pytest.mark.parametrize("reader", sorted(READERS))
def test_reader_raises_only_conversion_errors(reader, corpus):
    if reader == "orbax":
        pytest.importorskip("tensorstore")
    opened, bad = [], []
    for case in corpus.values():
        try:
            ckpt = READERS[reader].open(case.path, options=ShapeOptions(config=case.config))
            for t in ckpt.tensors.values():
                t.load()
            opened.append(case.name)
        except ConversionError as e:
            if str(case.path) not in str(e):
                bad.append(f"{case.name}: the error does not name the input: {e}")
        except Exception as e:  # noqa: BLE001  (what the test is looking for)
            bad.append(f"{case.name}: {type(e).__name__}: {e}")
    assert not bad, "\n".join(bad)
    assert set(opened) <= {"hf-nan-weight", "ckpt-inf-weight", "gguf-nan-weight"}, opened


# The child records its own peak RSS (VmHWM of its address space) when it exits: ``ru_maxrss`` from
# ``wait4`` would also count the memory of this (large) process, which the child briefly shares before exec.
LAUNCHER = ("import atexit, runpy, sys\n"
            "out = sys.argv.pop(1)\n"
            "def peak():\n"
            "    with open('/proc/self/status') as f, open(out, 'w') as o:\n"
            "        o.write(next(l for l in f if l.startswith('VmHWM')).split()[1])\n"
            "atexit.register(peak)\n"
            "runpy.run_module('gemma2_convert', run_name='__main__', alter_sys=True)\n")


def _child_peak_mb(args: list[str], tmp) -> tuple[float, int, str]:
    """Run ``python -m gemma2_convert ARGS`` as a real child; its own peak RSS in MB, exit code and stderr."""
    peak = tmp / "peak.txt"
    r = subprocess.run([sys.executable, "-c", LAUNCHER, str(peak), *args], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    return int(peak.read_text()) / 1024, r.returncode, r.stderr


def test_one_terabyte_header_fails_fast_with_small_rss(corpus, tmp_path):
    """Real subprocesses: a header claiming 1 TB costs no more memory than printing the version (the fork
    server's matrix bounds every lying case the same way)."""
    base, rc, err = _child_peak_mb(["--version"], tmp_path)
    assert rc == 0, err
    out = tmp_path / "out.gguf"
    for name, argv in (("safetensors-header-claims-1TB", ["inspect"]), ("gguf-tensor-claims-1TB", ["to-gguf"])):
        lie = corpus[name].path
        t0 = time.perf_counter()
        peak, rc, err = _child_peak_mb(argv + [str(lie)] + ([str(out)] if argv == ["to-gguf"] else []), tmp_path)
        seconds = time.perf_counter() - t0
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert re.search(corpus[name].problem, err), err
        assert peak < base + 32, f"{name}: peak RSS {peak:.0f} MB vs {base:.0f} MB for --version"
        assert seconds < 60 and not out.exists()
        print(f"{name} {argv[0]}: peak RSS {peak:.0f} MB (--version: {base:.0f} MB), {seconds:.1f}s")
