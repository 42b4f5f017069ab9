"""HF→GGUF: ``gemma2-convert to-gguf`` against llama.cpp's ``convert_hf_to_gguf.py`` and ``cp``.

llama.cpp's converter comes from a source tree given with ``--llama-cpp DIR`` (the one vendored in the
llama-cpp-python sdist: ``pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all:``, unpack,
``vendor/llama.cpp``) and runs with that tree's ``gguf-py``. Without it that anchor is skipped and the
report says so. The two GGUFs of each type are compared tensor by tensor afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bench import harness, report, synth
from bench.harness import CONVERT, PYTHON, Case
from bench.orig_to_hf import STARTUP

MARK = "gguf"
TYPES = ("f16", "bf16", "q8_0")


def ours(t: str) -> str:
    return f"to-gguf --type {t}"


def theirs(t: str) -> str:
    return f"convert_hf_to_gguf.py --outtype {t}"


def cases(src: Path, work: Path, lc: Path | None, types: tuple[str, ...] = TYPES) -> dict[str, Case]:
    shards = sorted(str(p) for p in src.glob("*.safetensors"))
    out: dict[str, Case] = {"cp": Case(["cp", *shards, str(work / "cp")], work / "cp", mkdir=True),
                            STARTUP: Case([*CONVERT, "--version"])}
    lc_env = dict(os.environ, PYTHONPATH=str(lc / "gguf-py")) if lc else None
    for t in types:
        out[ours(t)] = Case([*CONVERT, "to-gguf", str(src), str(work / f"ours-{t}.gguf"),
                             "--type", t, "--no-verify", "--force", "--json"], work / f"ours-{t}.gguf")
        if lc is not None:
            out[theirs(t)] = Case([PYTHON, str(lc / "convert_hf_to_gguf.py"), str(src), "--outtype", t,
                                   "--outfile", str(work / f"llama-{t}.gguf")], work / f"llama-{t}.gguf", lc_env)
    return out


def compare_files(a_path: Path, b_path: Path) -> str:
    """How many tensors of two GGUFs hold identical bytes."""
    from gemma2_convert.formats.gguf.file import GGUFFile

    a, b = GGUFFile(a_path), GGUFFile(b_path)
    same = [n for n in a.tensors if n in b.tensors and a.tensors[n].type_name == b.tensors[n].type_name
            and np.array_equal(a.raw(n), b.raw(n))]
    differ = sorted(set(a.tensors) - set(same))
    return f"{len(same)}/{len(a.tensors)} tensors byte-identical" + (f" (differ: {differ[:4]})" if differ else "")


def run(size: str, runs: int, work: Path, shared: Path, lc: Path | None, machine: dict, quick: bool = False,
        log=harness.say) -> str:
    log(f"gguf: a synthetic {size} HF directory in {shared}")
    src, params = synth.shared_hf_source(shared, size)
    nbytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    types = TYPES[:1] if quick else TYPES
    cs = cases(src, work, lc, types)
    res = harness.interleaved(cs, runs, log, keep_last=True)
    parts = harness.measure(Case([PYTHON, "-m", "bench", "profile-parts", str(work)])).json()
    notes = []
    if lc is not None:
        notes = [f"{t.upper()}: to-gguf vs convert_hf_to_gguf.py: "
                 f"{compare_files(work / f'ours-{t}.gguf', work / f'llama-{t}.gguf')}" for t in types]
    else:
        notes = ["llama.cpp's convert_hf_to_gguf.py: **skipped** (no `--llama-cpp DIR` given)."]
    for c in cs.values():
        harness.remove(c.out)
    data = {"size": size, "bytes": nbytes, "params": params, "runs": runs, "machine": machine, "parts": parts,
            "llama_cpp": str(lc) if lc else None, "cases": {k: harness.summary(v) for k, v in res.items()}}
    return render(data, res, notes)


def render(data: dict, res: dict[str, list[harness.Sample]], notes: list[str]) -> str:
    cmd = f"python -m bench gguf --size {data['size']} --runs {data['runs']}" + \
        (" --llama-cpp DIR" if data["llama_cpp"] else "")
    lines = [f"## HF→GGUF: synthetic {data['size'].upper()}-shaped HF directory (bf16, {data['bytes'] / 1e9:.2f} GB)",
             "", report.run_line(cmd, data["machine"]), "",
             *report.cp_table(res, data["cases"], STARTUP), "", *[f"- {n}" for n in notes], "",
             f"Median of {data['runs']} interleaved runs (min–max); `cp` copies the same safetensors shards. "
             "to-gguf also fingerprints every source tensor (XXH3-128, recorded in the file) and fsyncs before its rename."]
    return report.section(MARK, lines, data)
