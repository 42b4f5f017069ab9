"""Safe outputs: write into a temporary sibling, rename into place only when complete.

An interrupted or failed run leaves nothing at the output path; an existing output is replaced
only with ``force`` (and only after the new one is complete); the free space is checked before
anything is written; an output may not replace one of its own inputs.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from gemma2_convert.core.errors import (
    ConversionError,
    DiskSpaceError,
    OutputExistsError,
)
from gemma2_convert.core.units import human_bytes

NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
"""Write failures that mean "no room": disk full, file size limit, quota."""


def check_output(path: Path, force: bool, inputs: Sequence[str | Path] = ()) -> None:
    """Refuse an existing non-empty output unless ``force``, and any output that is, or contains, an input."""
    path = Path(path)
    target = path.resolve()
    for src in inputs:
        s = Path(src).resolve()
        if s == target or target in s.parents:
            raise ConversionError(f"the output would replace the input {src}; choose another output path", path)
    if not path.exists() or force:
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    raise OutputExistsError("already exists; pass --force to replace it (the old output is kept until the new "
                            "one is complete)", path)


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing ancestor)."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_free_space(path: Path, need: int) -> None:
    """DiskSpaceError, with the numbers, when ``path``'s filesystem lacks ``need`` bytes (plus 1 % and 1 MiB)."""
    free = free_bytes(Path(path).parent)
    want = need + need // 100 + (1 << 20)
    if free < want:
        raise DiskSpaceError(f"needs about {human_bytes(want)} for the output but only {human_bytes(free)} is free "
                             f"on its filesystem; free some space or write elsewhere", path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


class Interrupted(ConversionError):
    """SIGTERM / SIGINT during a write."""

    exit_code = 130


def _interrupt_handler(path: Path):  # type: ignore[no-untyped-def]
    def handler(signum: int, _frame: object) -> None:
        raise Interrupted(f"interrupted by signal {signal.Signals(signum).name}; the partial output was removed",
                          path)

    return handler


def _no_space(e: OSError, path: Path) -> DiskSpaceError:
    return DiskSpaceError(f"no space left while writing ({e.strerror or errno.errorcode.get(e.errno, e.errno)}: "
                          "disk full or file size limit); the partial output was removed", path)


@contextmanager
def atomic_output(path: str | Path, force: bool = False, directory: bool = False, *, need_bytes: int | None = None,
                  inputs: Sequence[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (a fresh directory if ``directory``); on success rename it to
    ``path``, on any exception or SIGINT/SIGTERM delete it and re-raise (a failed write for lack of space
    as a DiskSpaceError). ``need_bytes``: the estimated output size, checked against the free space
    first; ``inputs``: paths the output may not replace."""
    path = Path(path)
    check_output(path, force, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    if need_bytes is not None:
        check_free_space(path, need_bytes)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    _remove(tmp)
    if directory:
        tmp.mkdir()
    signals = (signal.SIGTERM, signal.SIGINT)
    old = {s: signal.getsignal(s) for s in signals}
    in_main = _in_main_thread()
    if in_main:
        handler = _interrupt_handler(path)
        for s in signals:
            signal.signal(s, handler)
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException as e:
        if in_main:  # a second signal must not interrupt the clean-up
            for s in signals:
                signal.signal(s, signal.SIG_IGN)
        _remove(tmp)
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            raise _no_space(e, path) from None
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
