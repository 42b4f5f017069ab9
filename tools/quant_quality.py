"""Measure quantization quality on the trained fixture and write docs/QUANTIZATION.md.

    python tools/quant_quality.py [--out docs/QUANTIZATION.md] [--only imatrix]

Every method × scheme × group size of ``gemma2-quantize`` on tests/fixtures/gemma2-tiny-trained, scored on
tests/fixtures/eval.txt: compressed-tensors outputs by the reference (fp32 compute, KL against the unquantized
model), GGUF outputs in llama.cpp (KL against llama.cpp on the F32 GGUF of the same model), next to llama.cpp's
own quantizer. bpw counts every byte of the output's weights over every parameter of the model. The imatrix
section compares, per GGUF type, no importance matrix, llama-imatrix's and ours (``gemma2-convert imatrix``) on the
same calibration text, each file written by ``to-gguf --imatrix``; ``--only imatrix`` recomputes that section
alone and replaces it in ``--out``.
"""

from __future__ import annotations

import argparse
import re
import platform
import subprocess
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
from gemma2_convert.pipeline.imatrix import make_imatrix  # noqa: E402
from gemma2_convert.pipeline.llama_runner import llama_cpp_logits, llama_quantize  # noqa: E402
from gemma2_convert.pipeline.quality import eval_prompts  # noqa: E402
from gemma2_convert.pipeline.quantize import QuantizeOptions, quantize_checkpoint  # noqa: E402
from quant.metrics import kl_divergence, perplexity, top1_agreement  # noqa: E402
from gemma2_convert.pipeline.llama_runner import llama_tools_dir  # noqa: E402

FIX = ROOT / "tests" / "fixtures"
MODEL, CAL, EVAL = FIX / "gemma2-tiny-trained", FIX / "calibration.txt", FIX / "eval.txt"
METHODS = ("rtn", "mse", "hqq", "gptq")
IMATRIX_TYPES = (("Q4_0 (pure)", "q4_0"), ("IQ4_NL (pure)", "iq4_nl"), ("IQ4_XS", "iq4_xs_mix"),
                 ("Q4_K_M", "q4_k_m"), ("Q3_K_M", "q3_k_m"), ("Q3_K_S", "q3_k_s"), ("Q2_K", "q2_k"))
"""(label, --type) of the imatrix table: llama-quantize's types (its mixes; pure: every matrix in that type)."""
IMATRIX_CHUNK = 256
"""Tokens per imatrix chunk, for both tools: the fixture's context length."""
IMATRIX_BEGIN, IMATRIX_END = "<!-- imatrix -->", "<!-- /imatrix -->"


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


def imatrix_rows(work: Path, n_params: int, prompts: list[list[int]], tools: Path) -> list[tuple]:
    """Per type: (label, bpw, then mean KL, top-1 and perplexity with no imatrix, llama-imatrix's and ours)."""
    f32 = work / "im-f32.gguf"
    to_gguf(MODEL, f32, type_name="f32", force=True)
    base = torch.cat(llama_cpp_logits(f32, prompts))
    targets = torch.cat([torch.tensor(p[1:]) for p in prompts])
    theirs, ours = work / "llama.imatrix.gguf", work / "ours.imatrix.gguf"
    t0 = time.perf_counter()
    subprocess.run([str(tools / "llama-imatrix"), "-m", str(f32), "-f", str(CAL), "-o", str(theirs), "-c",
                    str(IMATRIX_CHUNK), "-t", "2"], check=True, capture_output=True)
    t1 = time.perf_counter()
    make_imatrix(MODEL, CAL, ours, chunk_size=IMATRIX_CHUNK, force=True)
    print(f"imatrix: llama-imatrix {t1 - t0:.0f} s, ours {time.perf_counter() - t1:.0f} s", flush=True)
    rows = []
    for label, key in IMATRIX_TYPES:
        row: list = [label]
        for name, im in (("none", None), ("llama", theirs), ("ours", ours)):
            out = to_gguf(MODEL, work / f"im-{key}-{name}.gguf", type_name=key, imatrix=im, verify=False,
                          force=True).output
            logits = llama_cpp_logits(out, prompts)
            lg = torch.cat(logits)
            if name == "none":
                row.append(8 * out.stat().st_size / n_params)
            row += [kl_divergence(base, lg), top1_agreement(base, lg),
                    perplexity(torch.cat([x[:-1] for x in logits]), targets)]
        rows.append(tuple(row))
        print(f"imatrix: {label} done", flush=True)
    return rows


def render_imatrix(rows: list[tuple], tokens: int) -> str:
    lines = [IMATRIX_BEGIN, "## GGUF with an importance matrix: ours against llama-imatrix's, scored in llama.cpp",
             "",
             "Both importance matrices over tests/fixtures/calibration.txt in chunks of "
             f"{IMATRIX_CHUNK} tokens: `llama-imatrix -c {IMATRIX_CHUNK}` on the F32 GGUF, and `gemma2-convert "
             f"imatrix --chunk-size {IMATRIX_CHUNK}` on the model. Every file is `to-gguf --type T --imatrix FILE` "
             "(the same bytes as `llama-quantize --imatrix FILE`, tests/test_gguf_imatrix_use.py), so the only "
             f"difference within a row is the imatrix. Mean KL and top-1 against llama.cpp on the F32 GGUF over "
             f"tests/fixtures/eval.txt ({tokens} tokens); perplexity of the same windows.", "",
             "| type | bpw | KL, no imatrix | KL, llama-imatrix | KL, ours | ours ÷ llama-imatrix | top-1 (none / "
             "llama / ours) | perplexity (none / llama / ours) |", "|---|---|---|---|---|---|---|---|"]
    for label, bpw, kn, tn, pn, kl, tl, pl, ko, to, po in rows:
        lines.append(f"| {label} | {bpw:.2f} | {kn:.2e} | {kl:.2e} | {ko:.2e} | {ko / kl:.3f} | "
                     f"{tn:.1%} / {tl:.1%} / {to:.1%} | {pn:.3f} / {pl:.3f} / {po:.3f} |")
    return "\n".join([*lines, "", IMATRIX_END])


def replace_section(doc: str, section: str, begin: str = IMATRIX_BEGIN, end: str = IMATRIX_END) -> str:
    """``doc`` with its ``begin``…``end`` section replaced by ``section`` (appended when it has none)."""
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        return head + section + rest.split(end, 1)[1]
    return doc.rstrip("\n") + "\n\n" + section + "\n"


def kept_sections(doc: str) -> list[str]:
    """The marked sections of ``doc`` other tools write (``<!-- name -->`` … ``<!-- /name -->``), e.g.
    tools/int4_quality.py's: a full run keeps them."""
    found = re.findall(r"(<!-- ([a-z0-9]+) -->.*?<!-- /\2 -->)", doc, flags=re.S)
    return [text for text, name in found if f"<!-- {name} -->" != IMATRIX_BEGIN]


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
    ap.add_argument("--only", choices=["all", "imatrix"], default="all",
                    help="imatrix: recompute the imatrix section alone and replace it in --out")
    ap.add_argument("--llama-tools", type=Path, default=None,
                    help="directory of llama-imatrix (default: where tools/build_llama_tools.sh puts it)")
    args = ap.parse_args(argv)
    src = open_checkpoint(MODEL)
    n_params = sum(t.numel for t in src.tensors.values())
    prompts = [p[0].tolist() for p in eval_prompts(src, EVAL.read_text(), 256, max_seqs=64)]
    tokens = sum(len(p) - 1 for p in prompts)
    with tempfile.TemporaryDirectory(prefix="quant-quality-") as tmp:
        work = Path(tmp)
        rows = imatrix_rows(work, n_params, prompts, args.llama_tools or llama_tools_dir())
        section = render_imatrix(rows, tokens)
        if args.only == "imatrix":
            args.out.write_text(replace_section(args.out.read_text(), section))
            print(f"wrote the imatrix section of {args.out}")
            return 0
        hf = hf_rows(work, n_params)
        gg, ppl_f32 = gguf_rows(work, n_params, prompts)
    from gemma2_convert.pipeline.quality import quality_report

    src_ppl = quality_report(src, src, EVAL.read_text())["ppl_a"]
    doc = render(hf, gg, ppl_f32, src_ppl, n_params, tokens)
    old = args.out.read_text() if args.out.exists() else ""
    doc = replace_section(doc, section)
    for kept in kept_sections(old):
        doc = doc.rstrip("\n") + "\n\n" + kept + "\n"
    args.out.write_text(doc)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
