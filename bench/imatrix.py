"""Importance matrix: ``gemma2-convert imatrix`` against ``llama-imatrix`` at equal threads, tokens/s.

Same synthetic model (bf16 HF directory for ours; its F32 GGUF, written by our to-gguf, for llama-imatrix),
same text, same chunks (``-c``/``--chunk-size``, ``--chunks``). llama-imatrix runs with ``--no-ppl`` and
``-t THREADS``; ours with ``OMP_NUM_THREADS=THREADS`` (torch's intra-op threads). Tokens/s = chunks × chunk
size / wall time to exit (model loading included), and over ours' in-process time. The two results are
compared per tensor (the worst cosine similarity), so the table also shows that both computed the same thing.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from bench import harness, report, synth
from bench.harness import CONVERT, Case
from gemma2_convert.pipeline.llama_runner import llama_tools_dir

MARK = "imatrix"
WORDS = ("the", "model", "reads", "a", "long", "text", "about", "rivers", "and", "stone", "bridges", "that",
         "cross", "them", "in", "old", "towns", "where", "people", "walk", "slowly", "at", "night")


def write_text(path: Path, words: int) -> Path:
    """Deterministic prose-like text of ``words`` words (lines of 12)."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "."
             for _ in range(words // 12 + 1)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def cases(src: Path, f32: Path, text: Path, work: Path, chunk: int, chunks: int, threads: int,
          llama: Path | None) -> dict[str, Case]:
    ours = Case([*CONVERT, "imatrix", str(src), "--calibration", str(text), "-o", str(work / "ours.gguf"),
                 "--chunk-size", str(chunk), "--chunks", str(chunks), "--json", "--quiet", "--force"],
                out=work / "ours.gguf", env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    out = {"gemma2-convert imatrix (reference model, bf16 source)": ours}
    if llama is not None:
        out["llama-imatrix (F32 GGUF, --no-ppl)"] = Case(
            [str(llama), "-m", str(f32), "-f", str(text), "-c", str(chunk), "--chunks", str(chunks), "-t",
             str(threads), "--no-ppl", "-o", str(work / "llama.gguf")], out=work / "llama.gguf")
    return out


def worst_cosine(a: Path, b: Path) -> tuple[float, str] | None:
    import torch

    from gemma2_convert.formats.gguf.imatrix import read_imatrix

    x, y = read_imatrix(a), read_imatrix(b)
    if sorted(x.entries) != sorted(y.entries):
        return None
    return min((float(torch.nn.functional.cosine_similarity(e.in_sum2.double(), y.entries[n].in_sum2.double(),
                                                             dim=0)), n) for n, e in x.entries.items())


def run(size: str, runs: int, work: Path, threads: int, machine: dict, quick: bool = False,
        shared: Path | None = None, log=harness.say) -> str:
    chunk, chunks = (64, 2) if quick else (512, 4)
    src, params = synth.shared_hf_source(shared or work, size)
    log(f"imatrix: {size} model, {chunks} chunks of {chunk} tokens, {threads} threads")
    f32 = work / "f32.gguf"
    harness.measure(Case([*CONVERT, "to-gguf", str(src), str(f32), "--type", "f32", "--no-verify",
                          "--quiet"]))
    text = write_text(work / "calibration.txt", 4 * chunk * (chunks + 2))
    llama = llama_tools_dir() / "llama-imatrix"
    have = llama if os.access(llama, os.X_OK) else None
    if have is None:
        log(f"  {llama} is missing (bash tools/build_llama_tools.sh builds it): llama-imatrix skipped")
    todo = cases(src, f32, text, work, chunk, chunks, threads, have)
    res = harness.interleaved(todo, runs, log, keep_last=True)
    cos = worst_cosine(work / "ours.gguf", work / "llama.gguf") if have is not None else None
    harness.remove(f32)
    data = {"size": size, "params": params, "runs": runs, "threads": threads, "chunk": chunk,
            "chunks": chunks, "machine": machine, "cases": {k: harness.summary(v) for k, v in res.items()},
            "tokens_per_s_inner": [s.json().get("tokens_per_s") for s in next(iter(res.values()))],
            "worst_cosine": cos, "llama_missing": have is None}
    return render(data)


def render(data: dict) -> str:
    tokens = data["chunk"] * data["chunks"]
    anchor = next((s for k, s in data["cases"].items() if k.startswith("llama")), None)
    rows = []
    for name, s in data["cases"].items():
        inner = f"{tokens / s['inner_s']:.1f}" if s.get("inner_s") else "—"
        rows.append([name, f"{s['exit_s']:.1f}", f"{tokens / s['exit_s']:.1f}", inner,
                     report.ratio(anchor["exit_s"], s["exit_s"]) if anchor else "—",
                     report.gb(s["peak_anon_gb"])])
    cos = data["worst_cosine"]
    lines = [f"## Importance matrix: synthetic {data['size'].upper()}-shaped model "
             f"({data['params'] / 1e9:.2f} B params)", "",
             report.run_line(f"python -m bench imatrix --size {data['size']} --runs {data['runs']} --threads "
                             f"{data['threads']}", data["machine"]), "",
             *report.table(["tool", "wall, s", "tokens/s (wall)", "tokens/s (in-process)",
                            "speed × llama-imatrix", "peak RssAnon"], rows), "",
             f"{data['chunks']} chunks of {data['chunk']} tokens, {data['threads']} threads each; median of "
             f"{data['runs']} runs, interleaved. Ours streams one decoder layer's weights at a time from the "
             "bf16 files (float32 compute); llama-imatrix maps the whole F32 GGUF."]
    if cos is not None:
        lines.append(f"Same tensors in both files; worst per-tensor cosine similarity of the statistics: "
                     f"{cos[0]:.8f} ({cos[1]}).")
    if data["llama_missing"]:
        lines.append("llama-imatrix was not built (`bash tools/build_llama_tools.sh`): no anchor.")
    return report.section(MARK, lines, data)
