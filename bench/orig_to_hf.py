"""orig→HF: ``gemma2-convert orig-to-hf`` against ``cp`` of the same bytes and the transformers-script approach.

The anchor is what transformers' ``convert_gemma2_weights_to_hf.py`` does: ``torch.load`` the whole
checkpoint, build the HF state dict, ``save_pretrained`` (kept in bf16 here; the script's default
float32 would write twice the bytes). A fourth case only starts Python and imports the CLI, so the
report can say how much of the gap to ``cp`` is start-up.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench import harness, report, synth
from bench.harness import CONVERT, PYTHON, Case
from reference.config import Gemma2Config

MARK = "orig-to-hf"
CP, OURS, ANCHOR, STARTUP = "cp", "gemma2-convert orig-to-hf --no-verify", \
    "transformers script (load all, save_pretrained)", "start-up only (gemma2-convert --version)"


def transformers_script(ckpt: Path, out: Path, cfg: Gemma2Config) -> None:
    """Whole model in RAM, then ``save_pretrained`` (the approach of convert_gemma2_weights_to_hf.py)."""
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


def cases(ckpt: Path, cfg_json: Path, out: Path) -> dict[str, Case]:
    ours = [*CONVERT, "orig-to-hf", str(ckpt), str(out / "hf"), "--config", str(cfg_json),
            "--json", "--no-verify"]
    return {
        CP: Case(["cp", str(ckpt), str(out / "model.ckpt")], out / "model.ckpt"),
        OURS: Case(ours, out / "hf"),
        ANCHOR: Case([PYTHON, "-m", "bench", "transformers-script", str(ckpt), str(out / "hf"), "--config",
                      str(cfg_json)], out / "hf"),
        STARTUP: Case([*CONVERT, "--version"]),
    }


def run(size: str, runs: int, work: Path, machine: dict, log=harness.say) -> str:
    cfg = synth.preset(size)
    ckpt = work / "src" / "model.ckpt"
    log(f"orig-to-hf: writing a synthetic {size} gemma_pytorch checkpoint to {ckpt}")
    nbytes = synth.write_orig_ckpt(ckpt, cfg)
    cfg_json = synth.write_config(work / "config.json", cfg)
    (work / "out").mkdir()
    res = harness.interleaved(cases(ckpt, cfg_json, work / "out"), runs, log)
    parts = harness.measure(Case([PYTHON, "-m", "bench", "profile-parts", str(work)])).json()
    harness.remove(work / "src")
    data = {"size": size, "bytes": nbytes, "runs": runs, "machine": machine, "parts": parts,
            "cases": {k: harness.summary(v) for k, v in res.items()}}
    return render(data, res)


def render(data: dict, res: dict[str, list[harness.Sample]]) -> str:
    lines = [f"## orig→HF: synthetic {data['size'].upper()}-shaped gemma_pytorch checkpoint "
             f"(bf16, {data['bytes'] / 1e9:.2f} GB)", "",
             report.run_line(f"python -m bench orig-to-hf --size {data['size']} --runs {data['runs']}",
                             data["machine"]),
             "", *report.cp_table(res, data["cases"], STARTUP, CP), "",
             f"Median of {data['runs']} interleaved runs (min–max). *In-process*: the conversion's own time as "
             "reported by `--json` (opening the checkpoint to the renamed output), without starting Python. "
             "The source file is in the page cache for every run."]
    return report.section(MARK, lines, data)
