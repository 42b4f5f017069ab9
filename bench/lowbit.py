"""IQ4_XS and Q3_K quantization speed: ours against llama.cpp at equal threads, without and with an imatrix.

Two views, both in M params/s:

* **Quantizer** (one process, one thread each, the float32 ``gate_proj`` and ``down_proj`` of one layer of the
  preset): llama.cpp's C ``ggml_quantize_chunk`` (llama-cpp-python's ``libggml-base``) against our
  ``quant.gguf_codec``, for IQ4_XS, IQ4_NL, Q3_K and Q2_K, without and with the same per-column importance; the
  bytes are compared.
* **Whole file** (child processes, ``--threads`` each): ``llama-quantize`` (the binary tools/build_llama_tools.sh
  builds) against ``to-gguf``, both reading the same BF16 GGUF of a one-layer slice of the preset
  (``synth.layer_slice``), for the IQ4_XS, Q3_K_S and Q3_K_M mixes, without and with the same imatrix (random,
  written by ``write_imatrix``); the tensors of the two files are compared byte for byte.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench import harness, report, synth
from bench.gguf import compare_files
from bench.harness import CONVERT, PYTHON, Case
from bench.quant import ggml_quantize_chunk
from gemma2_convert.pipeline.llama_runner import llama_tools_dir

MARK = "lowbit"
KERNEL_TYPES = ("IQ4_XS", "IQ4_NL", "Q3_K", "Q2_K")
FILE_TYPES = (("iq4_xs_mix", "IQ4_XS"), ("q3_k_s", "Q3_K_S"), ("q3_k_m", "Q3_K_M"))
"""(our --type, llama-quantize's type)."""


def kernels_main(argv: list[str]) -> int:
    """Child: time each quantizer on the same matrices, print JSON {"TYPE[+imatrix]": {tool: {...}}, …}."""
    import numpy as np
    import torch

    from gemma2_convert.formats.synthetic import random_tensors
    from quant.gguf_codec import quantize_tensor
    from quant.gguf_types import ggml_type

    ap = argparse.ArgumentParser(prog="python -m bench lowbit-kernels")
    ap.add_argument("--size", default="2b")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="the first 512 rows of gate_proj, IQ4_XS and Q3_K only")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rand = random_tensors(synth.preset(a.size), 0, torch.float32)
    mats = [rand[f"model.layers.0.mlp.{p}_proj.weight"].load() for p in ("gate", "down")]
    mats = [mats[0][:512].contiguous()] if a.quick else mats
    g = torch.Generator().manual_seed(0)
    qws = [torch.exp(torch.randn(m.shape[1], generator=g) * 2) for m in mats]  # importance over decades
    params, ggml = sum(m.numel() for m in mats), ggml_quantize_chunk()
    result: dict = {"params": params, "shapes": [list(m.shape) for m in mats]}
    for qtype in KERNEL_TYPES[::2] if a.quick else KERNEL_TYPES:
        t = ggml_type(qtype)
        for weighted in (False, True):
            def ours(m, qw):
                return quantize_tensor(m, qtype, qw if weighted else None, threads=1).numpy()

            def c(m, qw):
                dst = np.empty((m.shape[0], m.shape[1] // t.block_size * t.type_size), np.uint8)
                ggml(t.ggml_id, m.numpy().ctypes.data, dst.ctypes.data, 0, m.shape[0], m.shape[1],
                     qw.numpy().ctypes.data if weighted else None)
                return dst

            tools = {"ours": ours, "llama.cpp C": c}
            for fn in tools.values():  # warm-up: our kernels compile (or load from their cache) on first use
                fn(mats[0][:64], qws[0])
            ts: dict[str, list[float]] = {}
            outs: dict[str, list] = {}
            for _ in range(a.reps):
                for name, fn in tools.items():
                    t0 = time.perf_counter()
                    outs[name] = [fn(m, qw) for m, qw in zip(mats, qws)]
                    ts.setdefault(name, []).append(time.perf_counter() - t0)
            same = all(np.array_equal(x, y) for x, y in zip(outs["ours"], outs["llama.cpp C"]))
            result[qtype + ("+imatrix" if weighted else "")] = {
                name: {"mparams_s": params / harness.median(v) / 1e6, "same_bytes": same} for name, v in ts.items()}
    print(json.dumps(result))
    return 0


def write_random_imatrix(gguf: Path, out: Path) -> Path:
    """A random imatrix with an entry for every decoder matrix of ``gguf`` (what llama-imatrix collects)."""
    import torch

    from gemma2_convert.formats.gguf.file import GGUFFile
    from gemma2_convert.formats.gguf.imatrix import Imatrix, ImatrixEntry, write_imatrix

    g = torch.Generator().manual_seed(0)
    entries = {name: ImatrixEntry(torch.exp(torch.randn(t.dims[0], generator=g) * 2) * 512, torch.tensor([512.0]))
               for name, t in GGUFFile(gguf).tensors.items() if name.startswith("blk.") and len(t.dims) == 2}
    write_imatrix(out, Imatrix(entries, ["random"], 1, 512), force=True)
    return out


def file_cases(src: Path, imatrix: Path, work: Path, tools: Path, threads: int, quick: bool) -> dict[str, Case]:
    cases: dict[str, Case] = {}
    for ours_type, ftype in FILE_TYPES[:1] if quick else FILE_TYPES:
        for im in (None, imatrix):
            tag = f"{ftype}{' + imatrix' if im else ''}"
            flag = ["--imatrix", str(im)] if im else []
            out = work / f"llama-{ours_type}{'-im' if im else ''}.gguf"
            cases[f"llama-quantize {tag}"] = Case([str(tools / "llama-quantize"), *flag, str(src), str(out), ftype,
                                                   str(threads)], out)
            out = work / f"ours-{ours_type}{'-im' if im else ''}.gguf"
            cases[f"to-gguf {tag}"] = Case([*CONVERT, "to-gguf", str(src), str(out), "--type", ours_type, *flag,
                                            "--no-verify", "--force", "--json", "--threads", str(threads)], out)
    return cases


def run(size: str, runs: int, work: Path, threads: int, machine: dict, quick: bool = False,
        tools: Path | None = None, log=harness.say) -> str:
    tools = tools or llama_tools_dir()
    if not (tools / "llama-quantize").is_file():
        raise RuntimeError(f"{tools / 'llama-quantize'} is missing: run `bash tools/build_llama_tools.sh` first")
    log("lowbit: quantizer kernels, one thread each")
    kern = harness.measure(Case([PYTHON, "-m", "bench", "lowbit-kernels", "--size", size, "--reps", str(runs),
                                 *(["--quick"] if quick else [])])).json()
    cfg = synth.layer_slice(synth.preset(size))
    hf, src = work / "slice-bf16", work / "slice-bf16.gguf"
    log(f"lowbit: a one-layer {size} slice ({synth.n_params(cfg) / 1e6:.0f} M params) as BF16 GGUF in {src}")
    params = synth.write_hf_source(hf, cfg)
    harness.measure(Case([*CONVERT, "to-gguf", str(hf), str(src), "--type", "bf16", "--no-verify"]))
    harness.remove(hf)
    cs = file_cases(src, write_random_imatrix(src, work / "imatrix.gguf"), work, tools, threads, quick)
    res = harness.interleaved(cs, runs, log, keep_last=True)
    same = {name.removeprefix("to-gguf "): compare_files(c.out, cs[name.replace("to-gguf", "llama-quantize")].out)
            for name, c in cs.items() if name.startswith("to-gguf")}
    for c in cs.values():
        harness.remove(c.out)
    data = {"size": size, "runs": runs, "threads": threads, "machine": machine, "kernels": kern, "params": params,
            "cases": {k: harness.summary(v) for k, v in res.items()}, "same": same}
    return render(data)


def render(data: dict) -> str:
    k = data["kernels"]
    krows = []
    for key, v in k.items():
        if isinstance(v, dict) and "ours" in v:
            ours, lc = v["ours"]["mparams_s"], v["llama.cpp C"]["mparams_s"]
            krows.append([key, f"{lc:.1f}", f"{ours:.1f}", report.ratio(ours, lc),
                          "yes" if v["ours"]["same_bytes"] else "**no**"])
    frows = []
    for tag, same in data["same"].items():
        lq, ours = data["cases"][f"llama-quantize {tag}"], data["cases"][f"to-gguf {tag}"]
        frows.append([tag, f"{lq['exit_s']:.1f}", f"{ours['exit_s']:.1f}",
                      f"{data['params'] / ours['exit_s'] / 1e6:.1f}", report.ratio(lq["exit_s"], ours["exit_s"]),
                      report.gb(ours["peak_anon_gb"]), same])
    shapes = " and ".join("×".join(map(str, s)) for s in k.get("shapes", []))
    lines = [f"## Low-bit quantization speed: IQ4_XS and Q3_K against llama.cpp ({data['size'].upper()} shapes)", "",
             report.run_line(f"python -m bench lowbit --size {data['size']} --runs {data['runs']} --threads "
                             f"{data['threads']}", data["machine"]), "",
             f"Quantizer, one thread each, float32 {shapes} ({k.get('params', 0) / 1e6:.1f} M params), M params/s, "
             f"median of {data['runs']} after a warm-up call; +imatrix: the same random per-column importance:", "",
             *report.table(["type", "llama.cpp C", "ours", "ours ÷ llama.cpp", "same bytes"], krows), "",
             f"Whole file, {data['threads']} threads each, both from the same BF16 GGUF of a one-layer slice "
             f"({data['params'] / 1e6:.0f} M params), wall time of the command (start-up included):", "",
             *report.table(["type", "llama-quantize, s", "to-gguf, s", "to-gguf M params/s", "ours faster by",
                            "to-gguf peak RssAnon", "tensors"], frows), "",
             f"Median of {data['runs']} interleaved runs."]
    return report.section(MARK, lines, data)
