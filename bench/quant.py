"""Quantization throughput: our GGUF codecs and ``gemma2-quantize`` against gguf-py and llama.cpp.

Two views, both in M params/s:

* **Quantizer** (in one process, one thread each, the same float32 matrices — the ``gate_proj`` and
  ``down_proj`` of one layer of the preset): gguf-py's numpy ``gguf.quants.quantize``, llama.cpp's C
  ``ggml_quantize_chunk`` (from llama-cpp-python's ``libggml-base``) and our ``quant.gguf_codec``; the
  bytes of each are compared with llama.cpp's.
* **Whole file** (child processes, ``--threads`` each): ``to-gguf --type T`` from a bf16 HF directory vs
  ``llama_model_quantize`` from an F16 GGUF of the same weights, and ``gemma2-quantize`` int4 g32 rtn/mse
  to GGUF and to compressed-tensors. The model is one layer of the preset with the embedding cut to keep
  its share of the parameters (``synth.layer_slice``), so the per-tensor mix of Q4_K_M is the real one.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import time
from pathlib import Path

from bench import harness, report, synth
from bench.harness import CONVERT, PYTHON, QUANTIZE, Case

MARK = "quant"
KERNEL_TYPES = ("Q8_0", "Q4_0", "Q4_K", "Q6_K")
FILE_TYPES = (("q8_0", "Q8_0", True), ("q4_0", "Q4_0", True), ("q4_k", "Q4_K_S", True), ("q4_k_m", "Q4_K_M", False))
CALIBRATION = harness.REPO / "tests" / "fixtures" / "calibration.txt"
METHODS = (("rtn", "gguf", False), ("mse", "gguf", False), ("mse", "gguf", True), ("rtn", "hf", False),
           ("mse", "hf", True))
"""(method, --format, with --calibration): ``mse`` alone is what llama.cpp's Q4_K_M does without an
imatrix (a weighted scale search); with calibration text it first runs the reference forward pass."""


def ggml_quantize_chunk():
    """llama.cpp's ``ggml_quantize_chunk`` through ctypes, or None without llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        return None
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_void_p]
    return f


def kernels_main(argv: list[str]) -> int:
    """Child: time each quantizer on the same matrices, print JSON {type: {tool: M params/s}, …}."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, quants

    from gemma2_convert.formats.synthetic import random_tensors
    from quant.gguf_codec import quantize_tensor

    ap = argparse.ArgumentParser(prog="python -m bench quant-kernels")
    ap.add_argument("--size", default="2b")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rand = random_tensors(synth.preset(a.size), 0, torch.float32)
    mats = [rand[f"model.layers.0.mlp.{p}_proj.weight"].load() for p in ("gate", "down")]
    params = sum(m.numel() for m in mats)
    ggml = ggml_quantize_chunk()

    def tools(qtype: str) -> dict:
        gt = GGMLQuantizationType[qtype]
        out = {"ours": lambda m: quantize_tensor(m, qtype, threads=1).numpy()}
        if qtype in ("Q8_0", "Q4_0"):
            out["gguf-py"] = lambda m: quants.quantize(m.numpy(), gt)
        if ggml is not None:
            def c(m):
                dst = np.empty(quants.quant_shape_to_byte_shape(tuple(m.shape), gt), np.uint8)
                ggml(int(gt), m.numpy().ctypes.data, dst.ctypes.data, 0, m.shape[0], m.shape[1], None)
                return dst
            out["llama.cpp C"] = c
        return out

    buf = [torch.empty_like(m) for m in mats]

    def one_pass() -> float:  # the rate of a single elementwise pass (read + write float32), for comparison
        t0 = time.perf_counter()
        for m, b in zip(mats, buf):
            torch.mul(m, 2.0, out=b)
        return params / (time.perf_counter() - t0) / 1e6

    result = {"params": params, "shapes": [list(m.shape) for m in mats],
              "one_pass_mparams_s": max(one_pass() for _ in range(a.reps))}
    for qtype in KERNEL_TYPES:
        if any(m.shape[1] % (256 if qtype.endswith("_K") else 32) for m in mats):
            continue
        ts: dict[str, list[float]] = {}
        outs: dict[str, list] = {}
        for fn in tools(qtype).values():  # warm-up: our kernels compile (or load from their cache) on first use
            fn(mats[0][:64])
        for _ in range(a.reps):
            for name, fn in tools(qtype).items():
                t0 = time.perf_counter()
                outs[name] = [fn(m) for m in mats]
                ts.setdefault(name, []).append(time.perf_counter() - t0)
        ref = outs.get("llama.cpp C")
        result[qtype] = {name: {"mparams_s": params / harness.median(t) / 1e6,
                                "same_bytes": None if ref is None else all(np.array_equal(x, y) for x, y in
                                                                           zip(outs[name], ref))}
                         for name, t in ts.items()}
    print(json.dumps(result))
    return 0


def llama_quantize_main(argv: list[str]) -> int:
    """Child: ``llama_model_quantize SRC OUT FTYPE pure|mix THREADS``; prints its own time as JSON."""
    import llama_cpp

    from quant.gguf_types import file_type_id

    src, out, ftype, pure, threads = argv
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.pure, p.nthread = file_type_id(ftype), pure == "pure", int(threads)
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(p))
    print(json.dumps({"seconds": time.perf_counter() - t0}))
    return rc


def file_cases(src: Path, f16: Path, work: Path, threads: int, has_llama: bool, quick: bool) -> dict[str, Case]:
    cli = list(CONVERT)
    cases: dict[str, Case] = {}
    for t, ftype, pure in FILE_TYPES[2:3] if quick else FILE_TYPES:
        out = work / f"ours-{t}.gguf"
        cases[f"to-gguf --type {t}"] = Case(cli + ["to-gguf", str(src), str(out), "--type", t, "--no-verify",
                                                   "--force", "--json", "--threads", str(threads)], out)
        if has_llama:
            out = work / f"llama-{t}.gguf"
            cases[f"llama_model_quantize {ftype}{' pure' if pure else ''}"] = Case(
                [PYTHON, "-m", "bench", "llama-quantize", str(f16), str(out), ftype, "pure" if pure else "mix",
                 str(threads)], out)
    calibration = work / "calibration.txt"  # one 2048-token sequence: the least mse takes for the real shapes
    calibration.write_text(CALIBRATION.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    for method, fmt, calibrated in METHODS[:2] if quick else METHODS:
        out = work / (f"q-{method}.gguf" if fmt == "gguf" else f"q-{method}-hf")
        cal = ["--calibration", str(calibration)] if calibrated else []
        cases[quantize_case(method, fmt, calibrated)] = Case(
            [*QUANTIZE, str(src), str(out), "--bits", "4", "--group-size", "32", "--method", method,
             "--format", fmt, "--no-verify", "--force", "--json", "--quiet", *cal], out)
    return cases


def quantize_case(method: str, fmt: str, calibrated: bool) -> str:
    """The name of a gemma2-quantize row of the whole-file table."""
    target = "GGUF" if fmt == "gguf" else "compressed-tensors"
    return f"gemma2-quantize int4 g32 {method}{' + calibration' if calibrated else ''} → {target}"


def linear_params(cfg, params: int) -> int:
    """Parameters of the decoder's linear weights (what gemma2-quantize quantizes by default)."""
    return params - cfg.vocab_size * cfg.hidden_size - cfg.hidden_size * (1 + 4 * cfg.num_hidden_layers)


def whole_model(size: str, work: Path, shared: Path, threads: int, log) -> dict:
    """The default ``gemma2-quantize`` (mse, int4 g32 → GGUF) and llama.cpp's Q4_K_M on the whole model, one
    run each: at this size the fixed costs (start-up, imports, the importance pass) weigh what they will."""
    src, params = synth.shared_hf_source(shared, size)
    f16 = work / "model-f16.gguf"
    log(f"quant: whole {size} model, F16 GGUF for llama_model_quantize")
    harness.measure(Case([*CONVERT, "to-gguf", str(src), str(f16), "--type", "f16", "--no-verify"]))
    cases = {"llama_model_quantize Q4_K_M": Case([PYTHON, "-m", "bench", "llama-quantize", str(f16),
                                                  str(work / "model-q4_k_m.gguf"), "Q4_K_M", "mix", str(threads)],
                                                 work / "model-q4_k_m.gguf"),
             quantize_case("mse", "gguf", False): Case(
                 [*QUANTIZE, str(src), str(work / "model-mse.gguf"), "--bits", "4", "--group-size", "32",
                  "--method", "mse", "--format", "gguf", "--no-verify", "--force", "--json", "--quiet"],
                 work / "model-mse.gguf")}
    res = harness.interleaved(cases, 1, log)
    harness.remove(f16)
    cfg = synth.preset(size)
    return {"params": params, "linear_params": linear_params(cfg, params),
            "cases": {k: harness.summary(v) for k, v in res.items()}}


def run(size: str, runs: int, work: Path, threads: int, machine: dict, quick: bool = False,
        log=harness.say, shared: Path | None = None) -> str:
    import importlib.util

    has_llama = importlib.util.find_spec("llama_cpp") is not None
    log("quant: quantizer kernels, one thread each")
    kern = harness.measure(Case([PYTHON, "-m", "bench", "quant-kernels", "--size", size, "--reps", str(runs)])).json()
    cfg = synth.layer_slice(synth.preset(size))
    src = work / "slice-bf16"
    log(f"quant: writing a one-layer {size} slice ({synth.n_params(cfg) / 1e6:.0f} M params) to {src}")
    params = synth.write_hf_source(src, cfg)
    f16 = work / "slice-f16.gguf"
    harness.measure(Case([*CONVERT, "to-gguf", str(src), str(f16), "--type", "f16",
                          "--no-verify"]))
    res = harness.interleaved(file_cases(src, f16, work, threads, has_llama, quick), runs, log)
    data = {"size": size, "runs": runs, "threads": threads, "machine": machine, "kernels": kern, "params": params,
            "linear_params": linear_params(cfg, params), "vocab": cfg.vocab_size,
            "cases": {k: harness.summary(v) for k, v in res.items()}}
    if shared is not None and has_llama and not quick:
        data["whole"] = whole_model(size, work, shared, threads, log)
    return render(data)


def rate(params: int, s: dict) -> tuple[float, float | None]:
    """M params/s over the wall time and over the in-process time (when the command reports it)."""
    return params / s["exit_s"] / 1e6, (params / s["inner_s"] / 1e6 if s["inner_s"] else None)


def render(data: dict) -> str:
    k = data["kernels"]
    krows = []
    for qtype in KERNEL_TYPES:
        if qtype not in k:
            continue
        cell = {t: f"{v['mparams_s']:.0f}" + ("" if v["same_bytes"] in (None, True) else " (bytes differ)")
                for t, v in k[qtype].items()}
        ours, gp = k[qtype]["ours"]["mparams_s"], k[qtype].get("gguf-py", {}).get("mparams_s")
        lc = k[qtype].get("llama.cpp C", {}).get("mparams_s")
        krows.append([qtype, cell.get("gguf-py", "—"), cell.get("llama.cpp C", "—"), cell["ours"],
                      report.ratio(ours, gp), report.ratio(ours, lc)])
    frows = []
    for name, s in data["cases"].items():
        n = data["linear_params"] if name.startswith("gemma2-quantize") else data["params"]
        wall, inner = rate(n, s)
        frows.append([name, f"{s['exit_s']:.1f}", f"{wall:.1f}", "—" if inner is None else f"{inner:.1f}",
                      report.gb(s["peak_anon_gb"])])
    shapes = " and ".join("×".join(map(str, s)) for s in k.get("shapes", []))
    lines = [f"## Quantization throughput ({data['size'].upper()} shapes)", "",
             report.run_line(f"python -m bench quant --size {data['size']} --runs {data['runs']} --threads "
                             f"{data['threads']}", data["machine"]), "",
             f"Quantizer, one thread each, on float32 matrices {shapes} ({k.get('params', 0) / 1e6:.1f} M params), "
             f"M params/s, median of {data['runs']} after a warm-up call (ours: numba kernels, compiled once per "
             "machine):", "",
             *report.table(["type", "gguf-py (numpy)", "llama.cpp C (ggml_quantize_chunk)", "ours (quant.gguf_codec)",
                            "ours ÷ gguf-py", "ours ÷ llama.cpp"], krows), "",
             "Every cell of ours holds the same bytes as llama.cpp's (marked otherwise). gguf-py has no K-quant "
             "quantizer.", "",
             f"Whole file, {data['threads']} threads each, a one-layer slice of the preset with a "
             f"{data['vocab']}-row embedding ({data['params'] / 1e6:.0f} M params; the embedding keeps its share of "
             "the real model). to-gguf reads the bf16 HF directory; llama_model_quantize reads an F16 GGUF of the "
             "same weights; gemma2-quantize keeps the embedding in bf16, so its rate counts the "
             f"{data['linear_params'] / 1e6:.0f} M linear parameters; `+ calibration` weighs the error by "
             "activations from a reference forward pass over one 2048-token calibration sequence (4000 characters "
             "of tests/fixtures/calibration.txt), which is included in its time:", "",
             *report.table(["method", "wall, s", "M params/s (wall)", "M params/s (in-process)", "peak RssAnon"],
                           frows),
             "", f"Median of {data['runs']} interleaved runs. *In-process* excludes starting Python and importing "
             "torch (to-gguf's `--json` time; llama_model_quantize timed around the call). `gemma2-quantize … mse` "
             "without `--calibration` weighs the error by activations on the built-in text through the model's "
             "tokenizer (a short reference forward pass, in its time)."]
    if "whole" in data:
        w = data["whole"]
        wrows = []
        for name, s in w["cases"].items():
            n = w["linear_params"] if name.startswith("gemma2-quantize") else w["params"]
            wrows.append([name, f"{s['exit_s']:.1f}", f"{n / s['exit_s'] / 1e6:.1f}", report.gb(s["peak_anon_gb"])])
        lines += ["", f"Whole {data['size'].upper()}-shaped model ({w['params'] / 1e9:.2f} B params, "
                  f"{w['linear_params'] / 1e9:.2f} B of them linear), {data['threads']} threads each, one run: the "
                  "default `gemma2-quantize` against llama.cpp's Q4_K_M from an F16 GGUF of the same weights:", "",
                  *report.table(["method", "wall, s", "M params/s (wall)", "peak RssAnon"], wrows)]
    return report.section(MARK, lines, data)

