"""The int4 section of docs/QUANTIZATION.md: ours (autoround, --equalize, --bpw) against llama.cpp's best.

    python tools/int4_quality.py [--out docs/QUANTIZATION.md] [--llama-tools DIR]

On tests/fixtures/gemma2-tiny-trained, every GGUF run by llama.cpp and scored against llama.cpp on the F32 GGUF
over tests/fixtures/eval.txt (mean KL); both tools calibrate on tests/fixtures/calibration.txt (llama.cpp's
imatrix by ``llama-imatrix -c 256``, built by tools/build_llama_tools.sh). The compressed-tensors rows are
scored by the reference against the unquantized model. The section between ``<!-- int4 -->`` markers is
replaced (appended when missing); every row names the command that makes it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gemma2_convert.formats import open_checkpoint  # noqa: E402
from gemma2_convert.pipeline.gguf import to_gguf  # noqa: E402
from gemma2_convert.pipeline.llama_runner import llama_cpp_logits, llama_quantize  # noqa: E402
from gemma2_convert.pipeline.quality import eval_prompts  # noqa: E402
from gemma2_convert.pipeline.quantize import QuantizeOptions, quantize_checkpoint  # noqa: E402
from quant.metrics import kl_divergence  # noqa: E402
from gemma2_convert.pipeline.llama_runner import llama_tools_dir  # noqa: E402
from quant_quality import replace_section  # noqa: E402  (tools/, the script's own directory)

FIX = ROOT / "tests" / "fixtures"
MODEL, CAL, EVAL = FIX / "gemma2-tiny-trained", FIX / "calibration.txt", FIX / "eval.txt"
BEGIN, END = "<!-- int4 -->", "<!-- /int4 -->"
CMD = "gemma2-quantize tests/fixtures/gemma2-tiny-trained OUT --calibration tests/fixtures/calibration.txt"


def llama_rows(work: Path, f32: Path, tools: Path) -> list[tuple[str, str, Path]]:
    imatrix = work / "imatrix.gguf"
    subprocess.run([str(tools / "llama-imatrix"), "-m", str(f32), "-f", str(CAL), "-o", str(imatrix), "-c", "256",
                    "-t", "2"], check=True, capture_output=True)
    rows = []
    for ftype in ("Q4_0", "Q4_K_M"):
        out = work / f"llama-{ftype}.gguf"
        llama_quantize(f32, out, ftype)
        rows.append((f"llama.cpp {ftype}", f"llama-quantize F32.gguf OUT {ftype}", out))
    out = work / "llama-Q4_K_M-imatrix.gguf"
    subprocess.run([str(tools / "llama-quantize"), "--imatrix", str(imatrix), str(f32), str(out), "Q4_K_M", "2"],
                   check=True, capture_output=True)
    rows.append(("llama.cpp Q4_K_M + imatrix", "llama-imatrix -c 256, llama-quantize --imatrix … Q4_K_M", out))
    return rows


def ours(work: Path, label: str, flags: str, opts: QuantizeOptions) -> tuple[str, str, Path, float]:
    out = work / f"ours-{len(list(work.iterdir()))}{'.gguf' if opts.format == 'gguf' else ''}"
    t0 = time.perf_counter()
    quantize_checkpoint(MODEL, out, opts)
    return label, f"{CMD} {flags}", out, time.perf_counter() - t0


def gguf_table(work: Path, tools: Path, prompts: list[list[int]]) -> list[tuple]:
    f32 = work / "f32.gguf"
    to_gguf(MODEL, f32, type_name="f32", force=True)
    base = torch.cat(llama_cpp_logits(f32, prompts))
    files = [(*r, 0.0) for r in llama_rows(work, f32, tools)]
    q4km = next(p for label, _, p, _ in files if label == "llama.cpp Q4_K_M").stat().st_size
    g = dict(calibration=CAL, verify=False)
    q40 = "--format gguf --group-size 32 --embedding q6_k"
    files += [
        ours(work, "ours gptq (Q4_0 layout)", f"{q40} --method gptq", QuantizeOptions(
            4, 32, True, "gptq", "gguf", "q6_k", **g)),
        ours(work, "ours autoround + equalize (Q4_0 layout)", f"{q40} --method autoround --equalize",
             QuantizeOptions(4, 32, True, "autoround", "gguf", "q6_k", equalize=True, **g)),
        ours(work, "ours --target-size of Q4_K_M", f"--format gguf --target-size {q4km}", QuantizeOptions(
            4, 32, True, "mse", "gguf", target_size=q4km, **g)),
    ]
    rows = []
    for label, cmd, path, sec in files:
        kl = kl_divergence(base, torch.cat(llama_cpp_logits(path, prompts)))
        rows.append((label, cmd, path.stat().st_size, kl, sec))
        print(f"int4: {label}: KL {kl:.3e}", flush=True)
    return rows


def ct_table(work: Path) -> list[tuple]:
    rows = []
    for label, m, eq in (("gptq", "gptq", False), ("autoround + equalize", "autoround", True)):
        out = work / f"ct-{m}-{eq}"
        t0 = time.perf_counter()
        r = quantize_checkpoint(MODEL, out, QuantizeOptions(4, 128, True, m, "hf", calibration=CAL, eval_text=EVAL,
                                                            equalize=eq))
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        cmd = f"{CMD} --eval tests/fixtures/eval.txt --method {m}" + (" --equalize" if eq else "")
        rows.append((f"CT int4 g128 {label}", cmd, size, r.quality["mean_kl"], time.perf_counter() - t0))
        print(f"int4: CT {label}: KL {r.quality['mean_kl']:.3e}", flush=True)
    return rows


def render(gg: list[tuple], ct: list[tuple], tokens: int) -> str:
    ref = next(kl for label, _, _, kl, _ in gg if label == "llama.cpp Q4_K_M + imatrix")
    gptq_ct = next(kl for label, _, _, kl, _ in ct if label.endswith("gptq"))
    lines = [BEGIN, "## int4 beyond llama.cpp's best: autoround, --equalize, measured --bpw", "",
             f"Measured {time.strftime('%Y-%m-%d')} on a 2-vCPU AMD EPYC (shared), `python tools/int4_quality.py`. "
             f"GGUF rows: run by llama.cpp, mean KL against llama.cpp on the F32 GGUF over tests/fixtures/eval.txt "
             f"({tokens} tokens); both tools calibrate on tests/fixtures/calibration.txt. `ratio` = KL ÷ llama.cpp "
             "Q4_K_M + imatrix (goals: ≤ 0.7 at Q4_0's size, ≤ 0.6 at Q4_K_M's size).", "",
             "| file | bytes | mean KL | ratio | seconds | command |", "|---|---|---|---|---|---|"]
    lines += [f"| {label} | {size:,} | {kl:.3e} | {kl / ref:.2f} | {sec:.0f} | `{cmd}` |"
              for label, cmd, size, kl, sec in gg]
    lines += ["", "compressed-tensors int4 g128 (`--format hf`), scored by the reference; `ratio` = KL ÷ our gptq "
              "(goal ≤ 0.7):", "", "| output | bytes | mean KL | ratio | seconds | command |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {label} | {size:,} | {kl:.3e} | {kl / gptq_ct:.2f} | {sec:.0f} | `{cmd}` |"
              for label, cmd, size, kl, sec in ct]
    return "\n".join([*lines, "", END])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "QUANTIZATION.md")
    ap.add_argument("--llama-tools", type=Path, default=None)
    args = ap.parse_args(argv)
    src = open_checkpoint(MODEL)
    prompts = [p[0].tolist() for p in eval_prompts(src, EVAL.read_text(), 256, max_seqs=64)]
    with tempfile.TemporaryDirectory(prefix="int4-quality-") as tmp:
        work = Path(tmp)
        gg = gguf_table(work, args.llama_tools or llama_tools_dir(), prompts)
        ct = ct_table(work)
    section = render(gg, ct, sum(len(p) - 1 for p in prompts))
    args.out.write_text(replace_section(args.out.read_text(), section, BEGIN, END))
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
