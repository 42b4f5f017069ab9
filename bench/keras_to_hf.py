"""Keras→HF: ``gemma2-convert orig-to-hf`` on a KerasHub preset against ``cp`` of its ``model.weights.h5``.

The source is a synthetic bf16 preset of the published shape (``synth.write_keras_source``: the layout
KerasHub's ``save_to_preset`` writes, one HDF5 file). No Keras anchor: KerasHub exports no HF directory of
Gemma 2, and loading the preset in Keras needs the model in memory. A third case only starts Python and
imports the CLI, so the report can say how much of the gap to ``cp`` is start-up.
"""

from __future__ import annotations

from pathlib import Path

from bench import harness, report, synth
from bench.harness import CONVERT, Case

MARK = "keras"
CP, OURS, STARTUP = "cp", "gemma2-convert orig-to-hf --no-verify (KerasHub preset)", \
    "start-up only (gemma2-convert --version)"


def cases(preset: Path, out: Path) -> dict[str, Case]:
    return {
        CP: Case(["cp", str(preset / "model.weights.h5"), str(out / "model.weights.h5")], out / "model.weights.h5"),
        OURS: Case([*CONVERT, "orig-to-hf", str(preset), str(out / "hf"), "--json", "--no-verify"], out / "hf"),
        STARTUP: Case([*CONVERT, "--version"]),
    }


def run(size: str, runs: int, work: Path, machine: dict, log=harness.say) -> str:
    cfg = synth.preset(size)
    if size == "tiny":  # its query scale (24) has no KerasHub form: head_dim or hidden/heads; the bytes are the same
        cfg = cfg.replace(query_pre_attn_scalar=cfg.head_dim)
    preset = work / "src" / "preset"
    log(f"keras: writing a synthetic {size} KerasHub preset to {preset}")
    nbytes = synth.write_keras_source(preset, cfg)
    (work / "out").mkdir()
    res = harness.interleaved(cases(preset, work / "out"), runs, log)
    harness.remove(work / "src")
    data = {"size": size, "bytes": nbytes, "runs": runs, "machine": machine,
            "cases": {k: harness.summary(v) for k, v in res.items()}}
    return render(data, res)


def render(data: dict, res: dict[str, list[harness.Sample]]) -> str:
    title = (f"## Keras→HF: synthetic {data['size'].upper()}-shaped KerasHub preset "
             f"(bf16 model.weights.h5, {data['bytes'] / 1e9:.2f} GB)")
    note = (f"Median of {data['runs']} interleaved runs (min–max). *In-process*: the conversion's own time as "
            "reported by `--json` (opening the preset to the renamed output), without starting Python. The "
            "source file is in the page cache for every run.")
    command = f"python -m bench keras --size {data['size']} --runs {data['runs']}"
    lines = [title, "", report.run_line(command, data["machine"]), "",
             *report.cp_table(res, data["cases"], STARTUP, CP), "", note]
    return report.section(MARK, lines, data)
