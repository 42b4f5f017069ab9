"""Safe outputs: write into a temporary sibling, rename into place only when complete.

An interrupted or failed run leaves nothing at the output path; an existing output is replaced
only with ``force`` (and only after the new one is complete); the free space is checked before
anything is written; an output may not replace one of its own inputs. An output of several files side
by side (a split GGUF) is written into a temporary directory and its files moved into place together.
"""

from __future__ import annotations

import errno
import os
import re
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


def sibling_outputs(path: Path, siblings: re.Pattern[str]) -> list[Path]:
    """The files beside ``path`` whose names match ``siblings``: an earlier output of several files there."""
    parent = Path(path).parent
    return sorted(p for p in parent.iterdir() if siblings.fullmatch(p.name)) if parent.is_dir() else []


def check_output(path: Path, force: bool, inputs: Sequence[str | Path] = (),
                 siblings: re.Pattern[str] | None = None) -> None:
    """Refuse an existing non-empty output unless ``force``, and any output that is, or contains, an input.
    ``siblings``: the output is the files beside ``path`` whose names match it (a split GGUF)."""
    path = Path(path)
    targets = [path] if siblings is None else sibling_outputs(path, siblings)
    for src in inputs:
        s = Path(src).resolve()
        for target in (t.resolve() for t in targets):
            if s == target or target in s.parents:
                raise ConversionError(f"the output would replace the input {src}; choose another output path", path)
    if siblings is not None:
        if targets and not force:
            raise OutputExistsError(f"{len(targets)} file(s) of an earlier output are there ({targets[0].name}"
                                    f"{', …' if len(targets) > 1 else ''}); pass --force to replace them (they are "
                                    "kept until the new ones are complete)", path)
        return
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
                  inputs: Sequence[str | Path] = (), siblings: re.Pattern[str] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (a fresh directory if ``directory``); on success rename it to
    ``path``, on any exception or SIGINT/SIGTERM delete it and re-raise (a failed write for lack of space
    as a DiskSpaceError). ``need_bytes``: the estimated output size, checked against the free space
    first; ``inputs``: paths the output may not replace.

    ``siblings``: the output is several files side by side (a split GGUF), each named to match the pattern.
    The yielded temporary directory receives them; on success they are moved beside ``path`` together
    (``_place_siblings``), replacing the files of an earlier output there (with ``force``)."""
    path = Path(path)
    check_output(path, force, inputs, siblings)
    path.parent.mkdir(parents=True, exist_ok=True)
    if need_bytes is not None:
        check_free_space(path, need_bytes)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    _remove(tmp)
    if directory or siblings is not None:
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
        if siblings is None:
            _replace(tmp, path)
        else:
            with _signals_ignored(in_main):
                _place_siblings(tmp, path, siblings)
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


@contextmanager
def _signals_ignored(in_main: bool) -> Iterator[None]:
    """SIGINT/SIGTERM ignored for a few renames, so a set is placed, or rolled back, whole."""
    signals = (signal.SIGTERM, signal.SIGINT)
    old = {s: signal.getsignal(s) for s in signals} if in_main else {}
    for s in old:
        signal.signal(s, signal.SIG_IGN)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _place_siblings(tmp: Path, path: Path, siblings: re.Pattern[str]) -> None:
    """Move the files written in ``tmp`` beside ``path``. An earlier output there (its files matching
    ``siblings``) is moved aside first and deleted after; the new files go in last to first, so the first
    one (the file a loader opens) appears only when the others are in place. On a failure, whatever was
    moved is moved back."""
    names = sorted(p.name for p in tmp.iterdir())
    stray = [n for n in names if not siblings.fullmatch(n)]
    if stray or not names:
        raise ValueError(f"{tmp}: the files written must match {siblings.pattern}: {stray or 'none written'}")
    aside: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for old in sibling_outputs(path, siblings):
            aside.append((old.with_name(f".{old.name}.old-{os.getpid()}"), old))
            os.replace(old, aside[-1][0])
        for name in reversed(names):
            os.replace(tmp / name, path.parent / name)
            placed.append(path.parent / name)
    except BaseException:
        for p in placed:
            _remove(p)
        for moved, old in aside:
            os.replace(moved, old)
        raise
    for moved, _ in aside:
        _remove(moved)
    tmp.rmdir()


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
