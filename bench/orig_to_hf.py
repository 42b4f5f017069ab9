"""orig-to-hf on a synthetic gemma_pytorch checkpoint of a published shape, against ``cp`` of the same
bytes and the transformers-script approach (``torch.load`` everything, build the state dict,
``save_pretrained``), all in the same run.

Every method runs as a child process; the parent samples the child's ``RssAnon`` from
``/proc/<pid>/status`` every 10 ms (anonymous memory only: mmap'd file pages are reclaimable page
cache). Wall time is taken twice: when the command exits, and when its output is durable (the harness
fsyncs every output file after exit; gemma2-convert fsyncs before renaming, cp and save_pretrained do not).
Runs are interleaved (cp, ours, transformers, cp, …); the table shows medians with min–max.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from reference.config import PRESETS, Gemma2Config

MARK = "orig-to-hf"


@dataclass
class Sample:
    exit_s: float
    durable_s: float
    peak_anon: int  # bytes
    inner_s: float | None = None  # the conversion's own time, without interpreter and torch start-up


def make_checkpoint(path: Path, cfg: Gemma2Config, dtype: torch.dtype = torch.bfloat16) -> int:
    """A gemma_pytorch model.ckpt of deterministic random weights (largest tensor first, to bound memory)."""
    from gemma2_convert.formats.gemma_pytorch import expand, fuse_qkv
    from gemma2_convert.synthetic import random_tensors
    from gemma2_convert.testing import freqs_cis

    rand = random_tensors(cfg, 0, dtype)
    sd = {}
    for _, name, targets in expand(cfg.num_hidden_layers):
        parts = [rand[t].load() for t in targets]
        sd[name] = fuse_qkv(*parts) if len(parts) == 3 else parts[0]
    sd["freqs_cis"] = freqs_cis(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state_dict": sd}, path)
    return path.stat().st_size


def transformers_script(ckpt: Path, out: Path, cfg: Gemma2Config) -> None:
    """The approach of transformers' convert_gemma2_weights_to_hf.py: whole model in RAM, then save.

    Kept in the source dtype (the script defaults to float32, which would double the bytes written)."""
    import transformers

    from gemma2_convert.formats.gemma_pytorch import split_qkv

    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["model_state_dict"]
    sd.pop("freqs_cis")
    state = {}
    for k, v in sd.items():
        if "qkv_proj" in k:
            for p, part in zip("qkv", split_qkv(v, cfg)):
                state[k.replace("qkv_proj", f"{p}_proj")] = part.clone()
        elif k == "embedder.weight":
            state["model.embed_tokens.weight"] = state["lm_head.weight"] = v
        else:
            state[k] = v
    del sd
    with torch.device("meta"):
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**cfg.to_hf_dict()))
    model.load_state_dict(state, assign=True, strict=False)
    model.save_pretrained(out)


def transformers_script_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench transformers-script")
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--config", type=Path, required=True)
    a = ap.parse_args(argv)
    transformers_script(a.ckpt, a.out, Gemma2Config.from_json_file(a.config))
    return 0


def rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def fsync_tree(path: Path) -> None:
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def measure(cmd: list[str], out: Path, log: Path) -> Sample:
    stdout = log.with_suffix(".out")
    with open(log, "w") as err, open(stdout, "w") as so:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=so, stderr=err)
        peak = 0
        while p.poll() is None:
            peak = max(peak, rss_anon(p.pid))
            time.sleep(0.01)
        exit_s = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {log.read_text()[-2000:]}")
    fsync_tree(out)
    durable_s = time.perf_counter() - t0
    try:  # gemma2-convert --json reports its own wall time
        inner = float(json.loads(stdout.read_text())["seconds"])
    except (ValueError, KeyError, TypeError):
        inner = None
    return Sample(exit_s, durable_s, peak, inner)


def commands(ckpt: Path, out: Path, cfg_json: Path, verify: bool) -> dict[str, tuple[list[str], Path]]:
    py = sys.executable
    ours = [py, "-m", "gemma2_convert.cli", "orig-to-hf", str(ckpt), str(out / "hf"), "--config", str(cfg_json),
            "--json"]
    cmds = {
        "cp": (["cp", str(ckpt), str(out / "model.ckpt")], out / "model.ckpt"),
        "gemma2-convert orig-to-hf --no-verify": (ours + ["--no-verify"], out / "hf"),
        "transformers script (load all, save_pretrained)": (
            [py, "-m", "bench", "transformers-script", str(ckpt), str(out / "hf"), "--config", str(cfg_json)],
            out / "hf"),
    }
    if verify:
        cmds["gemma2-convert orig-to-hf (--verify)"] = (ours, out / "hf")
    return cmds


def run(size: str, runs: int, work: Path, verify: bool) -> tuple[dict[str, list[Sample]], int]:
    cfg = PRESETS[size]
    ckpt = work / "src" / "model.ckpt"
    print(f"writing a synthetic {size} checkpoint to {ckpt} …", flush=True)
    nbytes = make_checkpoint(ckpt, cfg)
    cfg_json = work / "config.json"
    cfg_json.write_text(json.dumps(cfg.to_hf_dict()))
    results: dict[str, list[Sample]] = {}
    out = work / "out"
    for r in range(runs):
        for name, (cmd, target) in commands(ckpt, out, cfg_json, verify).items():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            s = measure(cmd, target, work / "stderr.log")
            results.setdefault(name, []).append(s)
            print(f"run {r + 1}/{runs} {name}: {s.exit_s:.1f}s exit, {s.durable_s:.1f}s durable, "
                  f"{s.peak_anon / 1e9:.2f} GB RssAnon", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    return results, nbytes


def _stat(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}–{max(xs):.1f})"


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    mem = next(int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal"))
    import transformers

    return (f"{cpu}, {os.cpu_count()} CPUs, {mem / 1e6:.0f} GB RAM, {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")


def report(size: str, results: dict[str, list[Sample]], nbytes: int, load: str = "") -> str:
    cp = statistics.median(s.durable_s for s in results["cp"])
    cp_exit = statistics.median(s.exit_s for s in results["cp"])
    rows = [f"| {name} | {_stat([s.exit_s for s in ss])} | {_stat([s.durable_s for s in ss])} | "
            f"{statistics.median(s.exit_s for s in ss) / cp_exit:.2f} | "
            f"{statistics.median(s.durable_s for s in ss) / cp:.2f} | "
            f"{_stat([s.inner_s for s in ss]) if ss[0].inner_s is not None else '—'} | "
            f"{statistics.median(s.peak_anon for s in ss) / 1e9:.2f} GB |" for name, ss in results.items()]
    runs = len(next(iter(results.values())))
    return "\n".join([
        f"<!-- bench:{MARK} -->",
        f"## orig-to-hf: synthetic {size.upper()}-shaped gemma_pytorch checkpoint (bf16, {nbytes / 1e9:.2f} GB)",
        "",
        f"`python -m bench orig-to-hf --size {size} --runs {runs}` on {time.strftime('%Y-%m-%d')}: {machine()}."
        + (f" Load average (1 min) {load}." if load else ""),
        "",
        "| method | wall to exit, s | wall to durable output, s | × cp (exit) | × cp (durable) | "
        "in-process, s | peak RssAnon |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Median of {runs} interleaved runs, (min–max). *Durable*: the harness fsyncs every output file after the "
        "command exits (gemma2-convert fsyncs each shard itself before the rename; cp and save_pretrained leave "
        "dirty pages). RssAnon is sampled every 10 ms from /proc/<pid>/status of the child: anonymous memory "
        "only, mmap'd file pages are reclaimable page cache. The source file is in the page cache for every run. "
        "*In-process*: the conversion's own wall time as reported by `--json` (from opening the checkpoint to the "
        "renamed output), i.e. without starting Python and importing torch. "
        "The transformers script row keeps bf16 (the script's default float32 would write twice the bytes).",
        f"<!-- /bench:{MARK} -->",
    ])


def write_report(text: str, doc: Path) -> None:
    old = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    start, end = f"<!-- bench:{MARK} -->", f"<!-- /bench:{MARK} -->"
    if start in old and end in old:
        new = old[: old.index(start)] + text + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(new, encoding="utf-8")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench orig-to-hf", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(PRESETS), default="2b", help="shape of the synthetic checkpoint")
    ap.add_argument("--runs", type=int, default=3, help="runs per method (median reported)")
    ap.add_argument("--verify", action="store_true", help="also time orig-to-hf with its default --verify")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a new one in /tmp)")
    ap.add_argument("--doc", type=Path, default=Path("docs/BENCHMARKS.md"), help="markdown file to update")
    a = ap.parse_args(argv)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-orig-to-hf-"))
    load0 = os.getloadavg()[0]
    try:
        results, nbytes = run(a.size, a.runs, work, a.verify)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(a.size, results, nbytes, f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    write_report(text, a.doc)
    print(text)
    return 0
