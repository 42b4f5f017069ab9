"""Terminal output: rich consoles and tables, one-line warnings and errors, and the progress display
(:class:`RichProgress`), which stays quiet when not on a terminal."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

from rich import filesize
from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichDisplay
from rich.table import Table
from rich.text import Text

from gemma2_convert.core.progress import Progress

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*(str(x) for x in r))
    return t


def one_line(message: object) -> str:
    """``message`` with its whitespace runs (newlines included) folded into single spaces."""
    return " ".join(str(message).split())


def print_warning(message: object, console: Console = err) -> None:
    """``warning: message`` on one line (plain text, never markup)."""
    console.print(f"[yellow]warning:[/] {escape(one_line(message))}", soft_wrap=True, highlight=False)


def print_error(message: object, console: Console = err) -> None:
    """``error: message`` on one line (plain text, never markup)."""
    console.print(f"[bold red]error:[/] {escape(one_line(message))}", soft_wrap=True, highlight=False)


class PhaseColumn(ProgressColumn):
    """One column of a phase's row, after its label: ``bar`` (a spinner when the total is unknown),
    ``amount`` (bytes done / total, or a count of the phase's unit), ``speed`` (bytes/s) or ``eta``."""

    PARTS = ("bar", "amount", "speed", "eta")

    def __init__(self, part: str) -> None:
        super().__init__()
        assert part in self.PARTS, part
        self.part = part
        self.spinner, self.bar, self.eta = SpinnerColumn(), BarColumn(), TimeRemainingColumn()
        self.size, self.speed = DownloadColumn(), TransferSpeedColumn()

    def render(self, task: Task) -> RenderableType:
        known, unit = task.total is not None, task.fields.get("unit", "bytes")
        if self.part == "bar":
            return self.bar.render(task) if known else self.spinner.render(task)
        if self.part == "amount" and unit == "bytes":
            if known:
                return self.size.render(task)
            return Text(filesize.decimal(int(task.completed)) if task.completed else "", style="progress.download")
        if self.part == "amount":
            total = f"/{task.total:.0f}" if known else ""
            return Text(f"{task.completed:.0f}{total} {unit}", style="progress.download")
        if self.part == "speed":
            if task.speed is None:
                return Text("")
            return self.speed.render(task) if unit == "bytes" else Text(f"{task.speed:,.0f} {unit}/s",
                                                                        style="progress.data.speed")
        return self.eta.render(task) if known else Text("")


class RichProgress(Progress):
    """:class:`~gemma2_convert.core.progress.Progress` drawn on stderr with rich, one row per open phase
    (nested phases stack). Silent under ``quiet`` or when the console is not a terminal; warnings print
    either way, one line each. A context manager: the display stops also when the work raises."""

    def __init__(self, quiet: bool = False, console: Console = err) -> None:
        self.console = console
        self.display: RichDisplay | None = None
        if not quiet and console.is_terminal:
            columns = [PhaseColumn(part) for part in PhaseColumn.PARTS]
            self.display = RichDisplay(TextColumn("{task.description} [dim]{task.fields[item]}"), *columns,
                                       console=console, transient=True)
        self.tasks: list[TaskID] = []

    def begin(self, label: str, total: int | None = None, unit: str = "bytes") -> None:
        if self.display is None:
            return
        if not self.tasks:
            self.display.start()
        self.tasks.append(self.display.add_task(escape(label), total=total, unit=unit, item=""))

    def advance(self, amount: int = 1, item: str = "") -> None:
        if self.display is not None and self.tasks:
            fields = {"item": escape(item[-48:])} if item else {}
            self.display.update(self.tasks[-1], advance=amount, **fields)

    def update(self, done: int, total: int | None = None) -> None:
        if self.display is not None and self.tasks:
            self.display.update(self.tasks[-1], completed=done, **({} if total is None else {"total": total}))

    def end(self) -> None:
        if self.display is None or not self.tasks:
            return
        self.display.remove_task(self.tasks.pop())
        if not self.tasks:
            self.display.stop()

    def warn(self, message: str) -> None:
        print_warning(message, self.console)

    def close(self) -> None:
        """End every open phase and stop the display."""
        while self.tasks:
            self.end()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

