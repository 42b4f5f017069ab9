"""What this tool reads and writes, straight from the registries: the ``formats`` command and the
README's tables (a test keeps the README equal to :func:`markdown`)."""

from __future__ import annotations

from gemma2_convert.formats import READERS, WRITERS
from gemma2_convert.formats.gguf.mix import type_help

Table = tuple[tuple[str, ...], list[tuple[str, ...]]]
"""(column names, rows)."""


def inputs() -> Table:
    """Every reader, in detection order."""
    return ("input", "what", "orig-to-*"), [(r.name, r.description, "yes" if r.original else "")
                                            for r in READERS.values()]


def outputs() -> Table:
    """Every writer (``convert --to``)."""
    return ("--to", "what", "output"), [(w.name, w.description, "directory" if w.directory else "file")
                                        for w in WRITERS.values()]


def gguf_types() -> Table:
    """Every GGUF ``--type``."""
    return ("--type", "what"), list(type_help().items())


def markdown() -> str:
    """The three tables as GitHub markdown."""
    parts = []
    for title, (cols, rows) in (("Inputs", inputs()), ("Outputs", outputs()), ("GGUF types", gguf_types())):
        lines = [f"**{title}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join((f"`{r[0]}`", *r[1:])) + " |" for r in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"
