"""Safe outputs: write into a temporary sibling, rename into place only when complete.

An interrupted or failed run leaves nothing at the output path; an existing output is replaced
only with ``force`` (and only after the new one is complete).
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gemma2_convert.errors import ConversionError, OutputExistsError


def check_output(path: Path, force: bool) -> None:
    """Refuse an existing non-empty output unless ``force``."""
    if not path.exists() or force:
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    raise OutputExistsError("already exists; pass --force to replace it (the old output is kept until the new "
                            "one is complete)", path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


class Interrupted(ConversionError):
    """SIGTERM / SIGINT during a write."""

    exit_code = 130


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(f"interrupted by signal {signal.Signals(signum).name}; the partial output was removed")


@contextmanager
def atomic_output(path: str | Path, force: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (a fresh directory if ``directory``); on success
    rename it to ``path``, on any exception or SIGINT/SIGTERM delete it and re-raise."""
    path = Path(path)
    check_output(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    _remove(tmp)
    if directory:
        tmp.mkdir()
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    in_main = _in_main_thread()
    if in_main:
        for s in old:
            signal.signal(s, _raise_interrupt)
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        if in_main:
            for s, h in old.items():
                signal.signal(s, h)


def _replace(tmp: Path, path: Path) -> None:
    """Move tmp to path; an existing path is moved aside first and deleted after."""
    if path.exists() or path.is_symlink():
        aside = path.with_name(f".{path.name}.old-{os.getpid()}")
        _remove(aside)
        os.replace(path, aside)
        os.replace(tmp, path)
        _remove(aside)
    else:
        os.replace(tmp, path)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
