"""The one way library code reports long work and warnings; the command line draws it, the library never.

Work comes in phases: ``begin(label, total, unit)``, then ``advance(amount, item)`` (or ``update(done,
total)``), then ``end()``. ``total=None`` is work of unknown length (a spinner). ``warn(message)`` is a
warning for the user, one line. The base class does nothing, so ``Progress()`` is the silent default;
the CLI's rich renderer and tests' recorders subclass it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class Progress:
    """Progress and warnings of a long operation; every method is a no-op here."""

    def begin(self, label: str, total: int | None = None, unit: str = "bytes") -> None:
        """A new phase of ``total`` ``unit`` (bytes, layers, tensors; None: length unknown)."""

    def advance(self, amount: int = 1, item: str = "") -> None:
        """``amount`` more units of the current phase are done; ``item`` names what (e.g. a tensor)."""

    def update(self, done: int, total: int | None = None) -> None:
        """``done`` units of the current phase are done (``total`` may change as it becomes known)."""

    def end(self) -> None:
        """The current phase is over."""

    def warn(self, message: str) -> None:
        """A warning for the user (one line; the library keeps its own copy where results list them)."""

    @contextmanager
    def phase(self, label: str, total: int | None = None, unit: str = "bytes") -> Iterator[Progress]:
        """``begin`` … ``end`` around a block, also when it raises."""
        self.begin(label, total, unit)
        try:
            yield self
        finally:
            self.end()

    def on_tensor(self, name: str, nbytes: int) -> None:
        """``advance(nbytes, name)``: the per-tensor callback writers and comparisons take."""
        self.advance(nbytes, name)


SILENT = Progress()
"""Reports nothing."""


class Warnings(Progress):
    """Forwards to ``inner`` and keeps every warning, for results that list them (``--json``)."""

    def __init__(self, inner: Progress = SILENT) -> None:
        self.inner = inner
        self.messages: list[str] = []

    def begin(self, label: str, total: int | None = None, unit: str = "bytes") -> None:
        self.inner.begin(label, total, unit)

    def advance(self, amount: int = 1, item: str = "") -> None:
        self.inner.advance(amount, item)

    def update(self, done: int, total: int | None = None) -> None:
        self.inner.update(done, total)

    def end(self) -> None:
        self.inner.end()

    def warn(self, message: str) -> None:
        self.messages.append(message)
        self.inner.warn(message)
