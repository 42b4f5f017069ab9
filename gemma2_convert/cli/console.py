"""Terminal output: rich consoles and tables, one-line warnings and errors, and the progress display
(:class:`RichProgress`), which stays quiet when not on a terminal."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import (BarColumn, DownloadColumn, ProgressColumn, SpinnerColumn, Task, TaskID, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)
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
    """What a phase's row shows after its label: a bar, size, speed and ETA for unit "bytes"; a bar, a count
    and ETA for other units; a spinner and the amount so far when the total is unknown."""

    def __init__(self) -> None:
        super().__init__()
        self.spinner, self.bar, self.eta = SpinnerColumn(), BarColumn(), TimeRemainingColumn()
        self.size, self.speed = DownloadColumn(), TransferSpeedColumn()

    def render(self, task: Task) -> RenderableType:
        unit = task.fields.get("unit", "bytes")
        cells: list[RenderableType] = [self.spinner.render(task) if task.total is None else self.bar.render(task)]
        if unit == "bytes":
            cells += [self.size.render(task), self.speed.render(task)]
        else:
            total = "" if task.total is None else f"/{task.total:.0f}"
            cells.append(Text(f"{task.completed:.0f}{total} {unit}", style="progress.download"))
        if task.total is not None:
            cells.append(self.eta.render(task))
        grid = Table.grid(padding=(0, 1))
        grid.add_row(*cells)
        return grid


class RichProgress(Progress):
    """:class:`~gemma2_convert.core.progress.Progress` drawn on stderr with rich, one row per open phase
    (nested phases stack). Silent under ``quiet`` or when the console is not a terminal; warnings print
    either way, one line each. A context manager: the display stops also when the work raises."""

    def __init__(self, quiet: bool = False, console: Console = err) -> None:
        self.console = console
        self.display: RichDisplay | None = None
        if not quiet and console.is_terminal:
            self.display = RichDisplay(TextColumn("{task.description} [dim]{task.fields[item]}"), PhaseColumn(),
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

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

