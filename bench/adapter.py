"""Adapter merge: a rank-64 LoRA on every linear merged into a synthetic bf16 base by ``convert --adapter``,
against the plain conversion of the same base and against peft's ``merge_and_unload`` + ``save_pretrained``
(goal: ≤ 1.3× the plain conversion, ≤ 2 GB peak anonymous memory).

The base is the shared bf16 HF directory of the preset (``synth.shared_hf_source``); the adapter is written in
PEFT's layout by ``formats.adapter.write_random_adapter`` (float32 A and B, alpha = 2r). Cases run
interleaved: ``convert --to hf`` without verification (the anchor), the same with ``--adapter``, the same with
verification (merged output against the merged source), and peft in a child (transformers loads the base in
bf16, PeftModel applies the adapter, merge_and_unload, save_pretrained)."""

from __future__ import annotations

import sys
from pathlib import Path

from bench import harness, report, synth
from bench.harness import CONVERT, PYTHON, Case

MARK = "adapter"
RANK = 64
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TIME_GOAL, MEMORY_GOAL_GB = 1.3, 2.0


def peft_main(argv: list[str]) -> int:
    """Child: peft's merge of the adapter ``argv[1]`` into the base ``argv[0]``, saved to ``argv[2]``."""
    import peft
    import torch
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(argv[0], dtype=torch.bfloat16)
    merged = peft.PeftModel.from_pretrained(base, argv[1]).merge_and_unload()
    merged.save_pretrained(argv[2])
    return 0


def cases(src: Path, lora: Path, work: Path) -> dict[str, Case]:
    out = work / "out"
    return {
        "convert --to hf --no-verify (plain, anchor)": Case(
            [*CONVERT, "convert", str(src), str(out), "--to", "hf", "--no-verify", "--force", "--quiet"],
            out),
        "convert --to hf --adapter --no-verify": Case(
            [*CONVERT, "convert", str(src), str(out), "--to", "hf", "--adapter", str(lora), "--no-verify",
             "--force", "--quiet"], out),
        "convert --to hf --adapter (verify)": Case(
            [*CONVERT, "convert", str(src), str(out), "--to", "hf", "--adapter", str(lora), "--force",
             "--quiet"], out),
        "peft merge_and_unload + save_pretrained": Case(
            [PYTHON, "-m", "bench", "adapter-peft", str(src), str(lora), str(out)], out),
    }


def run(size: str, runs: int, work: Path, machine: dict, quick: bool = False, shared: Path | None = None,
        log=harness.say) -> str:
    from gemma2_convert.formats.adapter import write_random_adapter

    cfg = synth.preset("tiny" if quick else size)
    src, params = synth.shared_hf_source(shared or work, "tiny" if quick else size)
    lora = write_random_adapter(work / "lora", cfg, rank=min(RANK, cfg.hidden_size), targets=LINEARS)
    all_cases = cases(src, lora, work)
    if quick:
        all_cases.pop("peft merge_and_unload + save_pretrained")
    res = harness.interleaved(all_cases, 1 if quick else runs, log)
    data = {"size": "tiny" if quick else size, "params": params, "rank": min(RANK, cfg.hidden_size),
            "adapter_bytes": harness.tree_bytes(lora), "machine": machine,
            "cases": {name: harness.summary(samples) for name, samples in res.items()}}
    return render(data)


def render(data: dict) -> str:
    cases = data["cases"]
    anchor = cases["convert --to hf --no-verify (plain, anchor)"]["exit_s"]
    rows = [[name, f"{c['exit_s']:.1f}", report.ratio(c["exit_s"], anchor), report.gb(c["peak_anon_gb"]),
             "yes" if c["peak_anon_gb"] <= MEMORY_GOAL_GB else "**no**"] for name, c in cases.items()]
    title = (f"## Adapter merge: {data['size'].upper()}-shaped bf16 base, rank-{data['rank']} LoRA on every "
             "linear")
    lines = [title,
             "", report.run_line(f"python -m bench adapter --size {data['size']}", data["machine"]), "",
             (f"{data['params'] / 1e9:.2f} B params; adapter {data['adapter_bytes'] / 1e6:.0f} MB (float32). "
              f"Goal: the merge ≤ {TIME_GOAL:g}× the plain conversion, ≤ {MEMORY_GOAL_GB:g} GB."), "",
             *report.table(["command", "wall, s", "× plain", "peak RssAnon", f"≤ {MEMORY_GOAL_GB:g} GB"],
                           rows)]
    return report.section(MARK, lines, data)


if __name__ == "__main__":
    sys.exit(peft_main(sys.argv[1:]))
