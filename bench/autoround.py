"""Learned rounding's cost: ``gemma2-quantize --method autoround`` against gptq and llama-quantize + imatrix.

The model is a one-layer slice of the preset (``synth.layer_slice``: the real layer shapes, the embedding cut
to its share), so seconds per decoder layer are measured and the whole model's time is that × its layers (the
embedding is not learned). Every command: int4 g32 into GGUF (Q4_0 layout), ``--no-verify``, the same
calibration text (tests/fixtures/calibration.txt), ``--threads``-limited torch (``OMP_NUM_THREADS``).
llama.cpp: ``llama-imatrix`` then ``llama-quantize --imatrix … Q4_K_M`` on the slice's F32 GGUF (the binaries of
tools/build_llama_tools.sh; skipped without them).

The default setting (100 steps of 8 × 512 tokens) runs on the tiny preset only: a step at the 2B shapes is a
forward and a backward of the layer over 4096 tokens, ≈ 1.9 TFLOP, so ≈ 190 TFLOP a layer — hours a layer on
2 cores; the report says so instead of timing it.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench import harness, report, synth
from bench.harness import CONVERT, QUANTIZE, Case
from gemma2_convert.pipeline.autoround import FAST, AutoRoundSettings

MARK = "autoround"
CALIBRATION = harness.REPO / "tests" / "fixtures" / "calibration.txt"


def cases(src: Path, f32: Path, work: Path, threads: int, tools: Path, quick: bool,
          full_settings: bool = True) -> dict[str, Case]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    common = ["--format", "gguf", "--group-size", "32", "--calibration", str(CALIBRATION), "--no-verify", "--force",
              "--quiet", "--json"]
    methods = {"gptq": ["--method", "gptq"], f"autoround fast ({FAST.steps} steps)": ["--method", "autoround",
                                                                                       "--autoround-fast"]}
    if not quick and full_settings:
        methods[f"autoround default ({AutoRoundSettings().steps} steps)"] = ["--method", "autoround"]
        methods["autoround default + equalize"] = ["--method", "autoround", "--equalize"]
    out: dict[str, Case] = {}
    for k, (name, flags) in enumerate(methods.items()):
        path = work / f"ours-{k}.gguf"
        out[f"gemma2-quantize {name}"] = Case([*QUANTIZE, str(src), str(path), *common, *flags], path, env)
    if (tools / "llama-quantize").is_file() and (tools / "llama-imatrix").is_file():
        im, q = work / "imatrix.gguf", work / "llama-q4km.gguf"
        script = (f"{tools / 'llama-imatrix'} -m {f32} -f {CALIBRATION} -o {im} -c 256 -t {threads} >/dev/null 2>&1"
                  f" && {tools / 'llama-quantize'} --imatrix {im} {f32} {q} Q4_K_M {threads} >/dev/null 2>&1")
        out["llama-imatrix + llama-quantize Q4_K_M"] = Case(["bash", "-c", script], q)
    return out


def run(size: str, runs: int, work: Path, threads: int, machine: dict, quick: bool = False,
        tools: Path | None = None, log=harness.say) -> str:
    from gemma2_convert.pipeline.llama_runner import llama_tools_dir

    tools = tools or llama_tools_dir()
    full = synth.preset(size)
    cfg = synth.layer_slice(full)
    hf, f32 = work / "slice-bf16", work / "slice-f32.gguf"
    log(f"autoround: a one-layer {size} slice ({synth.n_params(cfg) / 1e6:.0f} M params) in {hf}")
    params = synth.write_hf_source(hf, cfg)
    harness.measure(Case([*CONVERT, "to-gguf", str(hf), str(f32), "--type", "f32", "--no-verify"]))
    cs = cases(hf, f32, work, threads, tools, quick, full_settings=size == "tiny")
    res = harness.interleaved(cs, runs, log)
    for c in cs.values():
        harness.remove(c.out)
    data = {"size": size, "runs": runs, "threads": threads, "machine": machine, "params": params,
            "layers": full.num_hidden_layers, "cases": {k: harness.summary(v) for k, v in res.items()}}
    return render(data)


def render(data: dict) -> str:
    n = data["layers"]
    rows = [[name, f"{s['exit_s']:.1f}", f"{s['exit_s'] * n / 60:.1f}", report.gb(s["peak_anon_gb"])]
            for name, s in data["cases"].items()]
    lines = [f"## Learned rounding: time of --method autoround against gptq ({data['size'].upper()} shapes)", "",
             report.run_line(f"python -m bench autoround --size {data['size']} --runs {data['runs']} --threads "
                             f"{data['threads']}", data["machine"]), "",
             f"One decoder layer of the {data['size'].upper()} shapes ({data['params'] / 1e6:.0f} M params with the "
             f"cut embedding), wall time of the command (start-up and calibration forward included); the whole "
             f"model ≈ that × {n} layers (an upper bound: start-up counted {n} times):", "",
             *report.table(["command", "one layer, s", f"× {n} layers, min", "peak RssAnon"], rows), "",
             f"Median of {data['runs']} interleaved runs."
             + ("" if data["size"] == "tiny" else f" The default setting ({AutoRoundSettings().steps} steps of "
                f"{AutoRoundSettings().batch} × {AutoRoundSettings().tokens} tokens) is not timed at this size: "
                "≈ 1.9 TFLOP a step at the 2B shapes, hours a layer on 2 cores.")]
    return report.section(MARK, lines, data)
