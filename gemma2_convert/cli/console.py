"""Terminal output: rich tables, progress bars that stay quiet when not on a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)
from rich.table import Table

from gemma2_convert.core.units import human_bytes

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*(str(x) for x in r))
    return t


class ByteProgress:
    """Per-tensor progress in bytes; ``advance(name, nbytes)`` is the writers' ``on_tensor`` callback."""

    def __init__(self, progress: Progress | None, task: Any) -> None:
        self.progress, self.task = progress, task

    def advance(self, name: str, nbytes: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=nbytes, description=name[-48:])


@contextmanager
def byte_progress(total: int | None, label: str, quiet: bool = False) -> Iterator[ByteProgress]:
    """A bytes/s + ETA bar on stderr (``total`` None: size unknown); silent under ``quiet`` or when stderr
    is not a terminal."""
    if quiet or not sys.stderr.isatty():
        yield ByteProgress(None, None)
        return
    cols = (TextColumn(f"{label} [dim]{{task.description}}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*cols, console=err, transient=True) as p:
        yield ByteProgress(p, p.add_task("", total=total))


class VerifyProgress:
    """Verification's two phases on one display: tensors compared (bytes), then reference forward passes
    (decoder layers run). ``tensor`` and ``layer`` are :func:`gemma2_convert.pipeline.verify.verify`'s callbacks."""

    def __init__(self, progress: Progress | None, total_bytes: int, label: str = "comparing tensors") -> None:
        self.progress, self.total_bytes, self.label = progress, total_bytes, label
        self.bytes_task = self.layers_task = None
        self.done_bytes = 0

    def tensor(self, name: str, nbytes: int) -> None:
        if self.progress is None:
            return
        if self.bytes_task is None:
            self.bytes_task = self.progress.add_task(self.label, total=self.total_bytes, amount="")
        self.done_bytes += nbytes
        self.progress.update(self.bytes_task, advance=nbytes,
                             amount=f"{human_bytes(self.done_bytes)} / {human_bytes(self.total_bytes)}")

    def layer(self, done: int, total: int) -> None:
        if self.progress is None:
            return
        if self.layers_task is None:
            self.layers_task = self.progress.add_task("reference forward", total=total, amount="")
        self.progress.update(self.layers_task, completed=done, total=total, amount=f"{done}/{total} layers")


@contextmanager
def verify_progress(total_bytes: int, quiet: bool = False, label: str = "comparing tensors") -> Iterator[VerifyProgress]:
    """Bars for :class:`VerifyProgress` on stderr (``label`` names the per-tensor phase); silent under
    ``quiet`` or when stderr is not a terminal."""
    if quiet or not sys.stderr.isatty():
        yield VerifyProgress(None, total_bytes, label)
        return
    cols = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[amount]}"), TimeRemainingColumn())
    with Progress(*cols, console=err, transient=True) as p:
        yield VerifyProgress(p, total_bytes, label)


def spinner(label: str, quiet: bool = False) -> AbstractContextManager[Any]:
    """A spinner with ``label`` on stderr for work of unknown length; silent like ``byte_progress``."""
    return nullcontext() if quiet or not err.is_terminal else err.status(label)

