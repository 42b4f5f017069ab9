"""Client of ``forkserver``: run a command line as a child process and collect what a user would see."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    argv: list[str]
    rc: int
    stdout: str
    stderr: str
    seconds: float
    rss_growth_mb: float
    """Peak RSS of the child above that of a trivial command (``--version``) forked the same way."""
    timed_out: bool

    @property
    def lines(self) -> list[str]:
        return self.stderr.strip().splitlines()

    def describe(self) -> str:
        return (f"$ {' '.join(self.argv)}\n  rc={self.rc} {self.seconds:.2f}s +{self.rss_growth_mb:.0f} MB"
                f"{' TIMED OUT' if self.timed_out else ''}\n  stderr: {self.stderr.strip()!r}")


class ForkServer:
    """One long-lived ``python -m tests.badinputs.forkserver``; ``run`` forks a child per command."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="forkserver-"))
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.badinputs.forkserver"], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self.proc.stdout.readline()
        if "ready" not in ready:
            raise RuntimeError(f"fork server did not start: {ready!r}")
        self.n = 0
        self.baseline_kb = 0
        self.baseline_kb = self._raw(["gemma2-convert", "--version"], REPO, 60, None)[0]["maxrss_kb"]

    def _raw(self, args: list[str], cwd: Path, timeout: float, fsize: int | None) -> tuple[dict, str, str]:
        self.n += 1
        out, err = self.tmp / f"{self.n}.out", self.tmp / f"{self.n}.err"
        req = {"argv": args, "cwd": str(cwd), "timeout": timeout, "fsize": fsize, "stdout": str(out),
               "stderr": str(err)}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        rep = json.loads(self.proc.stdout.readline())
        texts = out.read_text(errors="replace"), err.read_text(errors="replace")
        out.unlink()
        err.unlink()
        return rep, *texts

    def run(self, argv: list[object], cwd: Path | None = None, timeout: float = 120,
            fsize: int | None = None) -> Result:
        args = [str(a) for a in argv]
        rep, stdout, stderr = self._raw(args, cwd or REPO, timeout, fsize)
        return Result(args, rep["rc"], stdout, stderr, rep["seconds"],
                      max(0, rep["maxrss_kb"] - self.baseline_kb) / 1024, rep["timed_out"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        for f in self.tmp.iterdir():
            f.unlink()
        self.tmp.rmdir()


def tree_digest(path: Path) -> str:
    """sha256 over every file under ``path`` (relative name + bytes): proof that an input was not modified."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()
