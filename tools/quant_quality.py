"""Measure quantization quality on the trained fixture and write docs/QUANTIZATION.md.

    python tools/quant_quality.py [--out docs/QUANTIZATION.md]

Every method × scheme × group size of ``gemma2-quantize`` on tests/fixtures/gemma2-tiny-trained, scored on
tests/fixtures/eval.txt: compressed-tensors outputs by the reference (fp32 compute, KL against the unquantized
model), GGUF outputs in llama.cpp (KL against llama.cpp on the F32 GGUF of the same model), next to llama.cpp's
own quantizer. bpw counts every byte of the output's weights over every parameter of the model.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gemma2_convert.formats import open_checkpoint  # noqa: E402
from gemma2_convert.pipeline.gguf import to_gguf  # noqa: E402
from gemma2_convert.pipeline.llama_runner import llama_cpp_logits, llama_quantize  # noqa: E402
from gemma2_convert.pipeline.quality import eval_prompts  # noqa: E402
from gemma2_convert.pipeline.quantize import QuantizeOptions, quantize_checkpoint  # noqa: E402
from quant.metrics import kl_divergence, perplexity, top1_agreement  # noqa: E402

FIX = ROOT / "tests" / "fixtures"
MODEL, CAL, EVAL = FIX / "gemma2-tiny-trained", FIX / "calibration.txt", FIX / "eval.txt"
METHODS = ("rtn", "mse", "hqq", "gptq")


def weight_bytes(path: Path) -> int:
    """Bytes of the weights: a file's size, or the safetensors files of a directory."""
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))


def hf_rows(work: Path, n_params: int) -> list[tuple]:
    rows = []
    specs = [(8, None, True), *[(4, g, s) for g in (32, 128) for s in (True, False)]]
    for bits, group, sym in specs:
        for m in METHODS:
            out = work / f"hf-{bits}-{group}-{sym}-{m}"
            t0 = time.perf_counter()
            r = quantize_checkpoint(MODEL, out, QuantizeOptions(bits, group, sym, m, "hf", calibration=CAL,
                                                                eval_text=EVAL, force=True))
            q = r.quality
            rows.append((f"int{bits}", "channel" if group is None else f"g{group}", "sym" if sym else "asym", m,
                         8 * weight_bytes(out) / n_params, q["mean_kl"], q["top1"], q["ppl_b"],
                         time.perf_counter() - t0))
    return rows


def gguf_rows(work: Path, n_params: int, prompts: list[list[int]]) -> tuple[list[tuple], float]:
    f32 = work / "f32.gguf"
    to_gguf(MODEL, f32, type_name="f32", force=True)
    base = torch.cat(llama_cpp_logits(f32, prompts))
    targets = torch.cat([torch.tensor(p[1:]) for p in prompts])
    files: list[tuple[str, str, Path]] = []
    for sym, emb in ((True, "keep"), (True, "q6_k"), (False, "keep")):
        for m in METHODS:
            out = work / f"ours-{sym}-{emb}-{m}.gguf"
            quantize_checkpoint(MODEL, out, QuantizeOptions(4, 32, sym, m, "gguf", emb, calibration=CAL,
                                                            verify=False, force=True))
            what = f"{m}, int4 g32 {'sym → Q4_0' if sym else 'asym → Q4_1'}"
            files.append(("gemma2-quantize", what + (", Q6_K embedding" if emb == "q6_k" else ""), out))
    for ftype, emb in (("Q4_0", None), ("Q4_0", "BF16"), ("Q4_1", "BF16"), ("Q4_K_M", None), ("Q8_0", None)):
        out = work / f"llama-{ftype}-{emb}.gguf"
        llama_quantize(f32, out, ftype, token_embedding_type=emb)
        files.append(("llama_model_quantize", ftype + (f", {emb.lower()} embedding" if emb else ""), out))
    rows = []
    for tool, what, path in files:
        logits = llama_cpp_logits(path, prompts)
        lg = torch.cat(logits)
        ppl = perplexity(torch.cat([x[:-1] for x in logits]), targets)
        rows.append((tool, what, 8 * path.stat().st_size / n_params, kl_divergence(base, lg),
                     top1_agreement(base, lg), ppl))
    return rows, perplexity(torch.cat([x[:-1] for x in llama_cpp_logits(f32, prompts)]), targets)


def render(hf: list[tuple], gg: list[tuple], ppl_f32: float, src_ppl: float, n_params: int, tokens: int) -> str:
    import llama_cpp
    import transformers

    lines = [
        "# Quantization quality", "",
        f"Measured {date.today()} on {platform.processor() or platform.machine()} "
        f"({torch.get_num_threads()} threads), torch {torch.__version__}, transformers {transformers.__version__}, "
        f"llama-cpp-python {llama_cpp.__version__}. Regenerate with `python tools/quant_quality.py`.", "",
        f"Model: tests/fixtures/gemma2-tiny-trained ({n_params / 1e6:.2f} M parameters, bf16, trained on Python's "
        f"standard library text; held-out perplexity {src_ppl:.2f}). Scored on tests/fixtures/eval.txt "
        f"({tokens} tokens in windows of 256); GPTQ and the importance weights of mse/hqq calibrate on "
        "tests/fixtures/calibration.txt. bpw = all weight bytes (incl. the bf16 embedding, which is also the "
        "output head, and norms) × 8 / parameters.", "",
        "## compressed-tensors (`--format hf`), scored by the reference", "",
        "| bits | group | scheme | method | bpw | mean KL | top-1 | perplexity | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {b} | {g} | {s} | {m} | {bpw:.2f} | {kl:.2e} | {t1:.2%} | {ppl:.3f} | {sec:.0f} |"
              for b, g, s, m, bpw, kl, t1, ppl, sec in hf]
    lines += ["", "## GGUF, scored in llama.cpp (against llama.cpp on the F32 GGUF, perplexity "
              f"{ppl_f32:.3f})", "",
              "| tool | what | bpw | mean KL | top-1 | perplexity |", "|---|---|---|---|---|---|"]
    lines += [f"| {tool} | {what} | {bpw:.2f} | {kl:.2e} | {t1:.2%} | {ppl:.3f} |" for tool, what, bpw, kl, t1, ppl in gg]
    lines += ["", "Notes: llama.cpp's own Q4_0 stores the tied embedding as Q6_K (its rule for an output head);"
              " ours keeps it in bf16 by default (`--embedding keep`), so the llama.cpp rows with a bf16 embedding"
              " are the same-layout comparison, and our rows with `--embedding q6_k` are the same layout and size"
              " as llama.cpp's default Q4_0. `rtn` into GGUF is llama.cpp's reference quantizer, byte for byte"
              " (tests/test_quantize_gguf.py).", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "QUANTIZATION.md")
    args = ap.parse_args(argv)
    src = open_checkpoint(MODEL)
    n_params = sum(t.numel for t in src.tensors.values())
    prompts = [p[0].tolist() for p in eval_prompts(src, EVAL.read_text(), 256, max_seqs=64)]
    with tempfile.TemporaryDirectory(prefix="quant-quality-") as tmp:
        work = Path(tmp)
        hf = hf_rows(work, n_params)
        gg, ppl_f32 = gguf_rows(work, n_params, prompts)
    from gemma2_convert.pipeline.quality import quality_report

    src_ppl = quality_report(src, src, EVAL.read_text())["ppl_a"]
    args.out.write_text(render(hf, gg, ppl_f32, src_ppl, n_params, sum(len(p) - 1 for p in prompts)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
