"""docs/BENCHMARKS.md: one marked section per benchmark, each carrying its numbers as a JSON comment.

A section is replaced in place when its benchmark runs again; the others stay, so ``python -m bench
scale`` (long) and ``python -m bench all`` (the rest) can be run separately. The chart and the targets
table are drawn from the JSON of every section in the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from bench.machine import one_line

HEADER = """# Benchmarks

Measured by `python -m bench` (see [bench/](../bench/)) on synthetic checkpoints of the published Gemma 2
shapes (random bf16 weights, real tensor names). Every number is for a child process: wall time to exit and to
a durable output (the harness fsyncs what the command wrote), and its peak anonymous memory (RssAnon sampled
every 10 ms; mmap'd file pages are reclaimable page cache and are not counted). Each table is one run of the
harness, anchors included, so its ratios compare tools under the same load. Regenerate with
`python -m bench all --size 2b --llama-cpp DIR` (16 minutes on a quiet 2-core machine) and
`python -m bench scale --sizes 2b,9b,27b` (42 minutes here with other work running; needs ~65 GB of free disk).

![time and peak memory per tool](benchmarks.png)
"""
ORDER = ("machine", "targets", "orig-to-hf", "keras", "gguf", "quant", "forward", "verify", "scale")
_DATA = re.compile(r"<!-- data (\{.*?\}) -->", re.S)


def table(head: list[str], rows: list[list[object]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def section(mark: str, lines: list[str], data: dict) -> str:
    blob = json.dumps(data, separators=(",", ":")).replace("--", "\\u002d\\u002d")  # no "--" inside a comment
    return "\n".join([f"<!-- bench:{mark} -->", *lines, f"<!-- data {blob} -->", f"<!-- /bench:{mark} -->"])


def run_line(command: str, machine: dict) -> str:
    return f"`{command}` — {one_line(machine)}."


def _sections(text: str) -> dict[str, str]:
    found = re.finditer(r"<!-- bench:([\w-]+) -->.*?<!-- /bench:\1 -->", text, re.S)
    return {m.group(1): m.group(0) for m in found}


def read_data(doc: Path) -> dict[str, dict]:
    """The JSON of every section of ``doc`` (those without data are skipped)."""
    if not doc.exists():
        return {}
    out = {}
    for mark, body in _sections(doc.read_text(encoding="utf-8")).items():
        m = _DATA.search(body)
        if m:
            out[mark] = json.loads(m.group(1))
    return out


def write_sections(doc: Path, new: dict[str, str]) -> None:
    """Replace (or add) the given sections of ``doc``, keep the others, write them in ``ORDER``."""
    old = _sections(doc.read_text(encoding="utf-8")) if doc.exists() else {}
    merged = {**old, **new}
    marks = [m for m in ORDER if m in merged] + sorted(set(merged) - set(ORDER))
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(HEADER + "\n" + "\n\n".join(merged[m] for m in marks) + "\n", encoding="utf-8")


def gb(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f} GB"


def ratio(x: float | None, y: float | None) -> str:
    return "—" if x is None or not y else f"{x / y:.2f}×"


CP_HEAD = ["method", "wall to exit, s", "wall to durable, s", "× cp (exit)", "× cp (durable)", "in-process, s",
           "peak RssAnon"]


def cp_table(res: dict, cases: dict, startup: str, cp: str = "cp") -> list[str]:
    """Table of child-process samples ``res`` (name → samples) against ``cp``: median (min–max) wall times,
    ratios, the in-process time from ``--json`` and peak RssAnon; the ``startup`` row has its wall time only."""
    from bench.harness import spread

    rows = []
    for name, ss in res.items():
        s = cases[name]
        if name == startup:
            rows.append([name, spread([x.exit_s for x in ss]), "", "", "", "", gb(s["peak_anon_gb"])])
            continue
        inner = spread([float(x.json()["seconds"]) for x in ss]) if s["inner_s"] is not None else "—"
        rows.append([name, spread([x.exit_s for x in ss]), spread([x.durable_s for x in ss]),
                     ratio(s["exit_s"], cases[cp]["exit_s"]), ratio(s["durable_s"], cases[cp]["durable_s"]),
                     inner, gb(s["peak_anon_gb"])])
    return table(CP_HEAD, rows)
