"""Split GGUF at scale: a 27B-shaped model written as BF16 with ``--split-max-size 20G``, verified against its
source and loaded by llama.cpp from its first part, each with its peak anonymous memory (goal: ≤ 2 GB).

The source is a bf16 gemma_pytorch ``model.ckpt`` whose decoder layers all view layer 0's bytes
(``synth.write_orig_ckpt(share_layers=True)``: every name and layer is there and read per layer, the file holds
one layer), so the disk holds the ~54 GB set and a few GB of source. Three commands, one run each:
``orig-to-gguf --type bf16 --split-max-size S`` (with its default verification: every tensor read back from the
parts and compared, reference logits of source and output), ``verify SRC FIRST_PART --tokens 16``, and llama.cpp
(llama-cpp-python) opening the set from its first part and evaluating a few tokens.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from bench import harness, report, synth
from bench.harness import CONVERT, PYTHON, Case

MARK = "split"
MARGIN = 4e9  # bytes of disk left free for everyone else
MEMORY_GOAL_GB = 2.0
TOKENS = [2, 3, 4, 5, 6, 7, 8, 9]


def llama_load_main(argv: list[str]) -> int:
    """Child: open the split set from its first part in llama.cpp, evaluate ``TOKENS``; print JSON."""
    import llama_cpp
    import numpy as np

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(argv[0], n_ctx=64, n_batch=len(TOKENS), logits_all=True, verbose=False)
    loaded = time.perf_counter() - t0
    llm.eval(TOKENS)
    scores = np.array(llm.scores[:len(TOKENS)], dtype=np.float32)
    print(json.dumps({"load_s": loaded, "seconds": time.perf_counter() - t0, "n_vocab": llm.n_vocab(),
                      "finite": bool(np.isfinite(scores).all()), "max_abs_logits": float(np.abs(scores).max())}))
    llm.close()
    return 0


def _source(size: str, work: Path, log) -> tuple[Path, Path, Path, int]:
    """The shared-layer source, its config.json and a small tokenizer; returns them and the source's bytes."""
    from gemma2_convert.formats.tokenizer.tiny import make_tiny_spm

    cfg = synth.preset(size)
    src = work / "model.ckpt"
    log(f"split {size}: writing the source (layers shared, {2 * synth.n_params(cfg) / 1e9:.1f} GB of weights in "
        f"the model) to {src}")
    nbytes = synth.write_orig_ckpt(src, cfg, share_layers=True)
    tok = make_tiny_spm(work / "tokenizer.model", min(512, cfg.vocab_size))
    return src, synth.write_config(work / "config.json", cfg), tok, nbytes


def cases(src: Path, cfg_json: Path, tok: Path, out: Path, max_size: str) -> dict[str, Case]:
    first = out.parent / f"{out.stem}-00001-of-{{count}}.gguf"  # the count is known after the write
    return {
        f"orig-to-gguf --type bf16 --split-max-size {max_size} (verify)": Case(
            [*CONVERT, "orig-to-gguf", str(src), str(out), "--config", str(cfg_json), "--tokenizer", str(tok),
             "--type", "bf16", "--split-max-size", max_size, "--json", "--force"]),
        "verify SRC FIRST_PART --tokens 16": Case(
            [*CONVERT, "verify", str(src), str(first), "--tokens", "16", "--json", "--config", str(cfg_json)]),
        "llama.cpp opens the set from its first part": Case([PYTHON, "-m", "bench", "split-llama-load", str(first)]),
    }


def run(size: str, max_size: str, work: Path, machine: dict, log=harness.say) -> str:
    cfg = synth.preset(size)
    need = 2 * synth.n_params(cfg)
    free = harness.free_disk(work)
    row: dict = {"size": size, "params": synth.n_params(cfg), "split_max_size": max_size}
    if free < need + MARGIN + 5e9:
        log(f"split {size}: skipped, {free / 1e9:.0f} GB of disk free, {(need + MARGIN + 5e9) / 1e9:.0f} GB needed")
        return render({**row, "skipped": f"{free / 1e9:.0f} GB of disk free", "machine": machine})
    src, cfg_json, tok, row["source_disk_bytes"] = _source(size, work, log)
    out = work / f"gemma-2-{size}-bf16.gguf"
    count = None
    for name, case in cases(src, cfg_json, tok, out, max_size).items():
        if count is not None:
            case.cmd = [c.replace("{count}", f"{count:05d}") for c in case.cmd]
        s = harness.measure(case)
        res = s.json()
        row[name] = {"exit_s": s.exit_s, "peak_anon_gb": s.peak_anon / 1e9, "result": _brief(res)}
        if count is None:
            count = len(res.get("files", []))
            parts = sorted(out.parent.glob(f"{out.stem}-*-of-*.gguf"))
            row["parts"] = [p.stat().st_size for p in parts]
        log(f"  {name}: {s.exit_s:.1f} s, peak RssAnon {s.peak_anon / 1e9:.2f} GB, {_brief(res)}")
    for p in out.parent.glob(f"{out.stem}-*-of-*.gguf"):
        harness.remove(p)
    return render({**row, "machine": machine})


def _brief(res: dict) -> dict:
    """The figures of a command's JSON report worth keeping (verification outcome, logits)."""
    v = res.get("verify", res)
    keys = ("passed", "tokens", "max_abs_logits", "tensors_equal", "tensors_total", "finite", "load_s", "n_vocab")
    return {k: v[k] for k in keys if k in v}


def render(data: dict) -> str:
    lines = [f"## Split GGUF: {data['size'].upper()}-shaped model, BF16, --split-max-size {data['split_max_size']}",
             "", report.run_line(f"python -m bench split --size {data['size']} --split-max-size "
                                 f"{data['split_max_size']}", data["machine"]), ""]
    if "skipped" in data:
        return report.section(MARK, lines + [f"Skipped: {data['skipped']}."], data)
    rows = []
    for name, v in data.items():
        if isinstance(v, dict) and "exit_s" in v:
            ok = "pass" if v["result"].get("passed", v["result"].get("finite")) else "FAIL"
            rows.append([name, f"{v['exit_s']:.0f}", report.gb(v["peak_anon_gb"]),
                         "yes" if v["peak_anon_gb"] <= MEMORY_GOAL_GB else "**no**", ok])
    sizes = ", ".join(f"{b / 1e9:.2f}" for b in data.get("parts", []))
    lines += [f"{data['params'] / 1e9:.2f} B params; source {data['source_disk_bytes'] / 1e9:.1f} GB on disk "
              f"(layers shared); {len(data.get('parts', []))} parts of {sizes} GB "
              f"({math.fsum(data.get('parts', [])) / 1e9:.1f} GB).", "",
              *report.table(["command", "wall, s", "peak RssAnon", f"≤ {MEMORY_GOAL_GB:g} GB", "result"], rows), "",
              "One run each. *pass*: every tensor equal and the reference logits within the tolerance (the "
              "converter's verification and `verify`); for llama.cpp, finite logits after loading every part."]
    return report.section(MARK, lines, data)
