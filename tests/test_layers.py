"""The layer rule and the no-cycle rule of ARCHITECTURE.md, held over the import graph (grimp).

Layers, bottom to top: the ``gemma2_convert`` package ``__init__`` (only ``__version__``) < core
< reference | quant (siblings: neither imports the other) < formats < pipeline < cli
< ``gemma2_convert.__main__``. An import may only point to the same or a lower layer. Imports inside
functions count; ``if TYPE_CHECKING:`` imports do not. A cycle is a strongly connected component of more
than one module (a package ``__init__`` counts as a module).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gemma2_convert", "quant", "reference")

# (module-name prefix, layer name, rank); the longest matching prefix wins. Same rank = same layer, except the
# siblings below, which may not import each other.
LAYERS = (
    ("gemma2_convert", "init", 0),  # the package __init__ only (see _layer_of)
    ("gemma2_convert.core", "core", 1),
    ("reference", "reference", 2),
    ("quant", "quant", 2),
    ("gemma2_convert.formats", "formats", 3),
    ("gemma2_convert.pipeline", "pipeline", 4),
    ("gemma2_convert.cli", "cli", 5),
    ("gemma2_convert.__main__", "main", 6),
)
SIBLINGS = {frozenset({"reference", "quant"})}


@pytest.fixture(scope="module")
def graph():
    # cache_dir=None: no .grimp_cache written into the working tree.
    return grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True, cache_dir=None)


def _layer_of(module: str) -> tuple[str, int] | None:
    """The (name, rank) of a module's layer, or None when no prefix claims it."""
    if module == "gemma2_convert":
        return "init", 0
    best = None
    for prefix, name, rank in LAYERS:
        if prefix == "gemma2_convert":
            continue  # only the __init__ itself sits at the bottom; gemma2_convert.foo must find a real layer
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, name, rank)
    return None if best is None else (best[1], best[2])


def _edges(graph) -> list[tuple[str, str]]:
    """Every direct module → module import inside the three packages."""
    return sorted((imp, dst) for imp in graph.modules for dst in graph.find_modules_directly_imported_by(imp))


def _describe(graph, importer: str, imported: str, note: str = "") -> list[str]:
    """One line per import statement, by line number: 'importer → imported (line N: source)  note'."""
    details = graph.get_import_details(importer=importer, imported=imported)
    details = sorted(details, key=lambda d: d["line_number"])
    pair = f"{importer} → {imported}"
    lines = [f"{pair} (line {d['line_number']}: {d['line_contents'].strip()}){note}" for d in details]
    return lines or [f"{pair} (line ?){note}"]


def test_every_module_has_a_layer(graph):
    orphans = sorted(m for m in graph.modules if _layer_of(m) is None)
    if orphans:
        pytest.fail(
            f"{len(orphans)} module(s) belong to no layer of tests/test_layers.py LAYERS; move each under "
            "core/, formats/, pipeline/ or cli/ (or add its package to LAYERS):\n  " + "\n  ".join(orphans),
            pytrace=False,
        )


def test_imports_point_down(graph):
    bad: list[str] = []
    for importer, imported in _edges(graph):  # sorted by (importer, imported); each pair's lines by number
        src, dst = _layer_of(importer), _layer_of(imported)
        if src is None or dst is None:
            continue  # reported by test_every_module_has_a_layer
        if dst[1] > src[1]:
            bad += _describe(graph, importer, imported, f"  [{src[0]} may not import {dst[0]}: upward]")
        elif frozenset({src[0], dst[0]}) in SIBLINGS:
            bad += _describe(graph, importer, imported, f"  [{src[0]} and {dst[0]} are independent siblings]")
    if bad:
        head = f"{len(bad)} import(s) break the layer rule (ARCHITECTURE.md):\n  "
        pytest.fail(head + "\n  ".join(bad), pytrace=False)


def _strongly_connected(nodes: list[str], succ: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit); components in no particular order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(succ[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(succ[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                out.append(sorted(comp))
    return out


def test_strongly_connected_helper():
    succ = {"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": [], "e": ["e"]}
    comps = sorted(_strongly_connected(sorted(succ), succ))
    assert comps == [["a", "b", "c"], ["d"], ["e"]]


def test_no_import_cycles(graph):
    nodes = sorted(graph.modules)
    succ = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in nodes}
    cycles = sorted(c for c in _strongly_connected(nodes, succ) if len(c) > 1)
    report = []
    for comp in cycles:
        members = set(comp)
        report.append(f"cycle of {len(comp)} modules: {', '.join(comp)}")
        for importer in comp:
            for imported in succ[importer]:
                if imported in members:
                    report += ["    " + line for line in _describe(graph, importer, imported)]
    if cycles:
        head = f"{len(cycles)} import cycle(s); break each by moving the shared code down a layer:\n  "
        pytest.fail(head + "\n  ".join(report), pytrace=False)


_CORE_IMPORT = re.compile(r"^\s*(from\s+gemma2_convert\.core(\.\w+)*\s+import\b"
                          r"|import\s+gemma2_convert\.core\b)")


def test_reference_and_quant_see_only_core():
    """The acceptance check ``grep -rn gemma2_convert quant reference`` shows only imports of the core."""
    bad = []
    for pkg in ("quant", "reference"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if "gemma2_convert" in line and not _CORE_IMPORT.match(line):
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    if bad:
        pytest.fail(
            f"{len(bad)} line(s) in quant/ or reference/ name gemma2_convert outside an import of "
            "gemma2_convert.core (comments and docstrings too: the acceptance grep shows them); hand these "
            "modules what they need from the formats/pipeline side instead:\n  " + "\n  ".join(bad),
            pytrace=False,
        )
