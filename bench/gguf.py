"""HF → GGUF: ``to-gguf`` against llama.cpp's converter, ``cp`` and ``llama_model_quantize``.

    python -m bench gguf --llama-cpp /tmp/llama_cpp_python-0.3.36/vendor/llama.cpp [--runs 3]

The llama.cpp tree is the one vendored in the llama-cpp-python sdist
(``pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all:``, then unpack); its
``convert_hf_to_gguf.py`` runs with its own ``gguf-py``.

* F16 and Q8_0 from a synthetic bf16 HF directory of gemma-2-2b's shapes (5.2 GB):
  ``gemma2-convert to-gguf --no-verify`` vs ``convert_hf_to_gguf.py`` vs ``cp`` of the shards.
  The two GGUFs of each type are compared tensor by tensor afterwards.
* K-quants from a bf16 model of gemma-2-2b's widths and ``--k-layers`` layers: ``to-gguf`` from
  the HF directory vs ``llama_model_quantize`` from an F16 GGUF, with equal threads
  (``--threads``: our encoder threads / llama.cpp's ``nthread``).

Every case runs as a child process, interleaved with the others (cp, ours, llama.cpp, cp, …).
Wall time to exit and to a durable output (the harness fsyncs the output after exit; to-gguf
fsyncs before its rename, cp and the converter do not); peak RssAnon of the child. Results replace
the ``gguf`` section of docs/BENCHMARKS.md; the GB-sized files are deleted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.orig_to_hf import fsync_tree, machine, rss_anon

MARK = "gguf"
CONVERT = "from gemma2_convert.cli import main; main()"
QUANTIZE = """
import ctypes, sys, llama_cpp
from quant.gguf_types import file_type_id
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = file_type_id(sys.argv[3]); p.pure = sys.argv[4] == "pure"; p.nthread = int(sys.argv[5])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def make_source(out: Path, layers: int | None) -> int:
    """A bf16 HF directory of gemma-2-2b's shapes (``layers`` overrides the depth); returns its parameter count."""
    import torch

    from gemma2_convert.formats.hf import write_hf_dir
    from gemma2_convert.synthetic import random_tensors
    from gemma2_convert.tiny_tokenizer import make_tiny_spm
    from reference.config import Gemma2Config

    cfg = Gemma2Config.preset("2b")
    if layers is not None:
        cfg = cfg.replace(num_hidden_layers=layers, layer_types=())
    out.mkdir(parents=True)
    tok = make_tiny_spm(out.parent / f"{out.name}.tokenizer.model", 512)  # padded to 256000 entries
    items = list(random_tensors(cfg, 0, torch.bfloat16).items())
    write_hf_dir(out, cfg, items, tokenizer=tok)
    return sum(t.numel for _, t in items)


def measure(cmd: list[str], out: Path, env: dict | None = None) -> tuple[float, float, int]:
    """(seconds to exit, seconds to a durable output, peak RssAnon bytes) of one child process."""
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    if not out.suffix:
        out.mkdir()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while p.poll() is None:
        peak = max(peak, rss_anon(p.pid))
        time.sleep(0.01)
    exit_s = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.read().decode()[-2000:]}")
    fsync_tree(out)
    return exit_s, time.perf_counter() - t0, peak


def interleaved(cases: dict[str, tuple[list[str], Path, dict | None]], runs: int) -> dict[str, list[tuple]]:
    results: dict[str, list[tuple]] = {name: [] for name in cases}
    for i in range(runs):
        for name, (cmd, out, env) in cases.items():
            results[name].append(measure(cmd, out, env))
            e, d, p = results[name][-1]
            print(f"  run {i + 1} {name}: exit {e:.1f}s, durable {d:.1f}s, peak RssAnon {p / 1e9:.2f} GB", flush=True)
    return results


def compare_files(ours: Path, theirs: Path) -> str:
    """How many tensors of two GGUFs hold identical bytes."""
    from gemma2_convert.formats.gguf_reader import GGUFFile

    a, b = GGUFFile(ours), GGUFFile(theirs)
    same = [n for n in a.tensors if n in b.tensors and a.tensors[n].type_name == b.tensors[n].type_name
            and np.array_equal(a.raw(n), b.raw(n))]
    differ = sorted(set(a.tensors) - set(same))
    return f"{len(same)}/{len(a.tensors)} tensors byte-identical" + (f" (differ: {differ[:4]})" if differ else "")


def bench_convert(src: Path, work: Path, lc: Path | None, runs: int) -> tuple[dict, list[str]]:
    shards = sorted(str(p) for p in src.glob("*.safetensors"))
    lc_env = dict(os.environ, PYTHONPATH=str(lc / "gguf-py")) if lc else None
    cases: dict[str, tuple[list[str], Path, dict | None]] = {"cp": (["cp", *shards, str(work / "cp")], work / "cp", None)}
    for t in ("f16", "q8_0"):
        cases[f"to-gguf --type {t}"] = ([sys.executable, "-c", CONVERT, "to-gguf", str(src), str(work / f"ours-{t}.gguf"),
                                         "--type", t, "--no-verify", "--force"], work / f"ours-{t}.gguf", None)
        if lc is not None:
            cases[f"convert_hf_to_gguf.py --outtype {t}"] = (
                [sys.executable, str(lc / "convert_hf_to_gguf.py"), str(src), "--outtype", t,
                 "--outfile", str(work / f"llama-{t}.gguf")], work / f"llama-{t}.gguf", lc_env)
    results = interleaved(cases, runs)
    notes = [f"{t.upper()}: to-gguf vs convert_hf_to_gguf.py: {compare_files(work / f'ours-{t}.gguf', work / f'llama-{t}.gguf')}"
             for t in ("f16", "q8_0") if lc is not None]
    return results, notes


def bench_kquants(src: Path, work: Path, threads: int, runs: int) -> dict:
    f16 = work / "k-f16.gguf"
    subprocess.run([sys.executable, "-c", CONVERT, "to-gguf", str(src), str(f16), "--type", "f16", "--no-verify"],
                   check=True, stdout=subprocess.DEVNULL)
    cases: dict[str, tuple[list[str], Path, dict | None]] = {}
    for t, ftype, pure in (("q4_k", "Q4_K_S", "pure"), ("q4_k_m", "Q4_K_M", "mix"), ("q8_0", "Q8_0", "pure")):
        out = work / f"k-{t}.gguf"
        cases[f"to-gguf --type {t} (from the bf16 HF directory)"] = (
            [sys.executable, "-c", CONVERT, "to-gguf", str(src), str(out), "--type", t, "--no-verify", "--force",
             "--threads", str(threads)], out, None)
        cases[f"llama_model_quantize {ftype}{' pure' if pure == 'pure' else ''} (from the F16 GGUF)"] = (
            [sys.executable, "-c", QUANTIZE, str(f16), str(out), ftype, pure, str(threads)], out, None)
    return interleaved(cases, runs)


def _stat(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}–{max(xs):.1f})"


def report(res: dict, notes: list[str], kres: dict, meta: dict) -> str:
    cp_exit = statistics.median(s[0] for s in res["cp"])
    cp_durable = statistics.median(s[1] for s in res["cp"])
    rows = [f"| {name} | {_stat([s[0] for s in ss])} | {_stat([s[1] for s in ss])} | "
            f"{statistics.median(s[0] for s in ss) / cp_exit:.2f} | {statistics.median(s[1] for s in ss) / cp_durable:.2f}"
            f" | {statistics.median(s[2] for s in ss) / 1e9:.2f} GB |" for name, ss in res.items()]
    lines = [f"<!-- bench:{MARK} -->", f"## HF → GGUF: synthetic 2B-shaped HF directory (bf16, {meta['src_gb']:.2f} GB)",
             "", f"`python -m bench gguf --runs {meta['runs']}` on {meta['date']}: {meta['machine']}; "
             f"llama-cpp-python {meta['llama_cpp']} (its sdist's convert_hf_to_gguf.py and gguf-py). "
             f"Load average (1 min) {meta['load']}.", "",
             "| method | wall to exit, s | wall to durable output, s | × cp (exit) | × cp (durable) | peak RssAnon |",
             "|---|---|---|---|---|---|", *rows, ""]
    lines += [f"- {n}" for n in notes]
    if kres:
        lines += ["", f"K-quants, {meta['threads']} threads each, on a bf16 model of gemma-2-2b's widths with "
                  f"{meta['k_layers']} layers ({meta['k_params'] / 1e9:.2f} B parameters, the 256000-row embedding "
                  "included):", "", "| method | wall to exit, s | M params/s | peak RssAnon |", "|---|---|---|---|"]
        lines += [f"| {name} | {_stat([s[0] for s in ss])} | "
                  f"{meta['k_params'] / statistics.median(s[0] for s in ss) / 1e6:.1f} | "
                  f"{statistics.median(s[2] for s in ss) / 1e9:.2f} GB |" for name, ss in kres.items()]
    lines += ["", f"Median of {meta['runs']} interleaved runs (min–max). Wall times include starting Python and "
              "importing torch. *Durable*: the harness fsyncs the output after the command exits. RssAnon is "
              "sampled every 10 ms from /proc/<pid>/status of the child: anonymous memory only (the mmap'd "
              "source is page cache). to-gguf also hashes every source tensor (sha256, recorded in the file) "
              "and fsyncs before its rename; its block-type chunks are encoded by `--threads` workers running "
              "`quant.gguf_codec`.", f"<!-- /bench:{MARK} -->"]
    return "\n".join(lines)


def write_report(text: str, doc: Path) -> None:
    old = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    start, end = f"<!-- bench:{MARK} -->", f"<!-- /bench:{MARK} -->"
    if start in old and end in old:
        new = old[: old.index(start)] + text + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    doc.write_text(new, encoding="utf-8")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench gguf", description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", type=Path, default=None, help="llama.cpp source tree with convert_hf_to_gguf.py")
    ap.add_argument("--runs", type=int, default=3, help="runs per method (median reported)")
    ap.add_argument("--threads", type=int, default=2, help="threads for quantization, ours and llama.cpp's")
    ap.add_argument("--k-layers", type=int, default=2, help="depth of the K-quant model (0: skip K-quants)")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a new one in /tmp)")
    ap.add_argument("--doc", type=Path, default=Path("docs/BENCHMARKS.md"), help="markdown file to update")
    a = ap.parse_args(argv)
    try:
        import llama_cpp

        version = llama_cpp.__version__
    except ImportError:
        version = "not installed"
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    load0 = os.getloadavg()[0]
    meta = {"machine": machine(), "llama_cpp": version, "runs": a.runs, "threads": a.threads,
            "k_layers": a.k_layers, "date": time.strftime("%Y-%m-%d")}
    try:
        src = work / "gemma-2-2b-shaped-bf16"
        make_source(src, None)
        meta["src_gb"] = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 1e9
        res, notes = bench_convert(src, work, a.llama_cpp, a.runs)
        shutil.rmtree(work)
        work.mkdir()
        kres = {}
        if a.k_layers:
            ksrc = work / "gemma-2-2b-width-bf16"
            meta["k_params"] = make_source(ksrc, a.k_layers)
            kres = bench_kquants(ksrc, work, a.threads, a.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta["load"] = f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    text = report(res, notes, kres, meta)
    write_report(text, a.doc)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
