"""Timing and memory of child processes, shared by every benchmark.

Each measured command runs as a child process. The parent samples the child's ``RssAnon`` from
``/proc/<pid>/status`` every 10 ms: anonymous memory only, since mmap'd file pages are reclaimable page
cache. Wall time is taken when the command exits and again when its output is durable (the harness
fsyncs every output file after exit: gemma2-convert fsyncs before its rename, ``cp`` and most other
tools do not). Cases run interleaved (a, b, c, a, b, c, …) so slow drift on a shared machine hits all of
them alike; tables show the median of the runs and the ratio to the anchor of the same run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

PYTHON = sys.executable
CONVERT = (PYTHON, "-c", "from gemma2_convert.cli.main import main; main()")  # the console scripts, as child commands
QUANTIZE = (PYTHON, "-c", "from gemma2_convert.cli.quantize import main; main()")
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Sample:
    exit_s: float
    durable_s: float
    peak_anon: int  # bytes
    stdout: str = ""

    def json(self) -> dict:
        """The last JSON object the command printed on stdout (``--json`` reports), or {}."""
        text = self.stdout.strip()
        for start in [i for i, ch in enumerate(text) if ch == "{"]:
            try:
                obj = json.loads(text[start:])
                return obj if isinstance(obj, dict) else {}
            except ValueError:
                continue
        return {}


@dataclass
class Case:
    """One measured command; ``out`` (a file or directory) is removed before and fsynced after each run."""

    cmd: list[str]
    out: Path | None = None
    env: dict[str, str] | None = None
    mkdir: bool = False  # create ``out`` as an empty directory before the run (cp into a directory)
    extra: dict = field(default_factory=dict)  # per-case values for the report (bytes, params, …)


def say(msg: str) -> None:
    """Progress on stdout, flushed (runs take minutes; the output is often piped to a log)."""
    print(msg, flush=True)


def rss_anon(pid: int) -> int:
    """RssAnon of a live process in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def fsync_tree(path: Path) -> None:
    if not path.exists():
        return
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove(path: Path | None) -> None:
    if path is None or not (path.exists() or path.is_symlink()):
        return
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: the repository importable (``python -m bench …`` children)."""
    env = dict(os.environ if extra is None else extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def measure(case: Case) -> Sample:
    """Run ``case.cmd`` once; kill it if the harness is interrupted."""
    remove(case.out)
    if case.mkdir and case.out is not None:
        case.out.mkdir(parents=True)
    with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        t0 = time.perf_counter()
        p = subprocess.Popen(case.cmd, stdout=so, stderr=se, env=child_env(case.env), cwd=REPO)
        peak = 0
        try:
            while p.poll() is None:
                peak = max(peak, rss_anon(p.pid))
                time.sleep(0.01)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        exit_s = time.perf_counter() - t0
        so.seek(0), se.seek(0)
        out, err = so.read(), se.read()
    if p.returncode:
        raise RuntimeError(f"{' '.join(case.cmd)} failed (exit {p.returncode}):\n{err[-3000:]}")
    if case.out is not None:
        fsync_tree(case.out)
    return Sample(exit_s, time.perf_counter() - t0, peak, out)


def interleaved(cases: dict[str, Case], runs: int, log: Callable[[str], None] = say,
                keep_last: bool = False) -> dict[str, list[Sample]]:
    """Every case ``runs`` times, round-robin. Each output is deleted after its run (so the page cache holds
    the same files for every case), except in the last round with ``keep_last`` (to compare outputs)."""
    results: dict[str, list[Sample]] = {name: [] for name in cases}
    for i in range(runs):
        for name, case in cases.items():
            s = measure(case)
            results[name].append(s)
            log(f"  run {i + 1}/{runs} {name}: {s.exit_s:.1f} s to exit, {s.durable_s:.1f} s durable, "
                f"peak RssAnon {s.peak_anon / 1e9:.2f} GB")
            if not (keep_last and i == runs - 1):
                remove(case.out)
    return results


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float], digits: int = 1) -> str:
    """``median (min–max)``, or just the value for one run."""
    m = f"{statistics.median(xs):.{digits}f}"
    return m if len(xs) == 1 else f"{m} ({min(xs):.{digits}f}–{max(xs):.{digits}f})"


def summary(samples: list[Sample]) -> dict:
    """Medians of a case's runs, for the data block of a report section and the chart."""
    inner = [s.json().get("seconds") for s in samples]
    return {
        "exit_s": median([s.exit_s for s in samples]),
        "durable_s": median([s.durable_s for s in samples]),
        "peak_anon_gb": median([s.peak_anon for s in samples]) / 1e9,
        "inner_s": median([float(x) for x in inner]) if all(isinstance(x, (int, float)) for x in inner) else None,
        "runs": len(samples),
    }


class Interrupted(Exception):
    """SIGTERM, turned into an exception so scratch directories are removed on the way out."""


@contextmanager
def scratch(prefix: str, parent: Path | None = None) -> Iterator[Path]:
    """A fresh scratch directory, removed on exit — also on Ctrl-C and SIGTERM."""
    def on_term(signum: int, frame: object) -> None:
        raise Interrupted(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, on_term)
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGTERM, old)


def free_disk(path: Path) -> int:
    return shutil.disk_usage(path).free


def tree_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
