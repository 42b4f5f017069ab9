"""Forward pass: the reference model against transformers' eager ``Gemma2ForCausalLM``, tokens/s.

Same synthetic HF directory, same dtype, same random prompt; ``--runs`` child processes per (tool, dtype),
the two tools' children alternating so that both see the same load. Each child loads the model, warms up
(one prefill and two decode steps; the reference casts its weights on first use when the dtype differs from
the file's, and in bf16 packs them into oneDNN's layout, ``reference.packing``), then times ``REPS``
prefills of ``--prompt`` tokens and ``REPS`` decodes of ``--decode`` tokens, one token per forward with the
KV cache, greedy, and reports the median of each. Both compute logits for every position, as each library
does by default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench import harness, report, synth
from bench.harness import PYTHON, Case

MARK = "forward"
TOOLS = {"ref": "reference (reference.Gemma2ForCausalLM)", "hf": "transformers Gemma2ForCausalLM (eager)"}
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
REPS = 3  # timed prefills and decodes per child (their median): one was too noisy to rank the tools


def _load(tool: str, src: Path, dtype):
    if tool == "ref":
        from gemma2_convert.pipeline.load import from_pretrained
        from reference import Gemma2ForCausalLM

        return from_pretrained(src, Gemma2ForCausalLM, dtype=dtype, resident=True)
    import transformers

    return transformers.Gemma2ForCausalLM.from_pretrained(str(src), dtype=dtype, attn_implementation="eager").eval()


def _step(model, ids, cache):
    out = model(ids, past_key_values=cache, use_cache=True, return_dict=True)
    return out.logits[:, -1:].argmax(-1), out.past_key_values


def child_main(argv: list[str]) -> int:
    """Child: print JSON {load_s, prefill_tok_s, decode_tok_s} for one tool and dtype."""
    import torch

    ap = argparse.ArgumentParser(prog="python -m bench forward-child")
    ap.add_argument("tool", choices=sorted(TOOLS))
    ap.add_argument("src", type=Path)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)
    dtype = getattr(torch, DTYPES[a.dtype])
    t0 = time.perf_counter()
    model = _load(a.tool, a.src, dtype)
    load_s = time.perf_counter() - t0
    vocab = json.loads((a.src / "config.json").read_text())["vocab_size"]
    ids = torch.randint(3, vocab, (1, a.prompt), generator=torch.Generator().manual_seed(0))
    prefill, decode = [], []
    with torch.inference_mode():
        nxt, cache = _step(model, ids, None)  # warm-up
        for _ in range(2):
            nxt, cache = _step(model, nxt, cache)
        for _ in range(a.reps):
            t0 = time.perf_counter()
            nxt, cache = _step(model, ids, None)
            prefill.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(a.decode):
                nxt, cache = _step(model, nxt, cache)
            decode.append(time.perf_counter() - t0)
    print(json.dumps({"load_s": load_s, "prefill_tok_s": a.prompt / statistics.median(prefill),
                      "decode_tok_s": a.decode / statistics.median(decode), "threads": torch.get_num_threads()}))
    return 0


def fits(params: int, dtype: str) -> bool:
    """Whether one copy in ``dtype`` (transformers holds one; the reference one when casting) fits in half of RAM."""
    from gemma2_convert.core.memory import available_memory

    return params * (2 if dtype == "bf16" else 4) < 0.5 * available_memory()


def run(size: str, runs: int, shared: Path, machine: dict, quick: bool = False, log=harness.say) -> str:
    return render({**measure(size, runs, shared, quick, log), "machine": machine})


def measure(size: str, runs: int, shared: Path, quick: bool = False, log=harness.say) -> dict:
    """The reference and transformers eager, bf16 and fp32: prefill and decode tok/s of each (``render``'s data
    without the machine; bench verify includes the ratios in its section)."""
    prompt, decode = (8, 2) if quick else (16, 8)
    log(f"forward: a synthetic {size} HF directory in {shared}")
    src, params = synth.shared_hf_source(shared, size)
    results: dict[str, dict] = {}
    skipped = []
    for dt in list(DTYPES)[:1 if quick else 2]:
        if not fits(params, dt):
            skipped.append(dt)
            continue
        for tool, res in _alternating(src, dt, prompt, decode, runs).items():
            results[f"{tool}/{dt}"] = res
            log(f"  {TOOLS[tool]} {dt}: {res}")
    return {"size": size, "params": params, "runs": runs, "reps": REPS, "prompt": prompt, "decode": decode,
            "results": results, "skipped": skipped}


def _alternating(src: Path, dt: str, prompt: int, decode: int, runs: int) -> dict[str, dict]:
    """Each tool's medians over ``runs`` child processes of one repetition each, run in the order ref, hf, hf,
    ref, … so that a change in the machine's load falls on both alike; peak memory is the highest."""
    got: dict[str, list[dict]] = {tool: [] for tool in TOOLS}
    for r in range(runs):
        for tool in list(TOOLS)[::1 if r % 2 == 0 else -1]:
            s = harness.measure(Case([PYTHON, "-m", "bench", "forward-child", tool, str(src), "--dtype", dt,
                                      "--prompt", str(prompt), "--decode", str(decode), "--reps", str(REPS)]))
            got[tool].append({**s.json(), "peak_anon_gb": s.peak_anon / 1e9})
    return {tool: {**{k: statistics.median(x[k] for x in xs) for k in ("load_s", "prefill_tok_s", "decode_tok_s")},
                   "threads": xs[0]["threads"], "peak_anon_gb": max(x["peak_anon_gb"] for x in xs)}
            for tool, xs in got.items()}


def render(data: dict) -> str:
    r = data["results"]
    rows = []
    for key, v in r.items():
        tool, dt = key.split("/")
        hf = r.get(f"hf/{dt}")
        rows.append([TOOLS[tool], dt, f"{v['prefill_tok_s']:.1f}", f"{v['decode_tok_s']:.2f}",
                     report.ratio(v["prefill_tok_s"], hf["prefill_tok_s"]) if hf else "—",
                     report.ratio(v["decode_tok_s"], hf["decode_tok_s"]) if hf else "—",
                     f"{v['load_s']:.1f}", report.gb(v["peak_anon_gb"])])
    lines = [f"## Forward pass: synthetic {data['size'].upper()}-shaped model ({data['params'] / 1e9:.2f} B params)",
             "",
             report.run_line(f"python -m bench forward --size {data['size']} --runs {data['runs']}", data["machine"]),
             "", *report.table(["model", "dtype", "prefill tok/s", "decode tok/s", "prefill × transformers",
                                "decode × transformers", "load, s", "peak RssAnon"], rows), "",
             (f"Batch 1, a random prompt of {data['prompt']} tokens, {data['decode']} decoded tokens; median of "
              f"{data['runs']} processes per row, each the median of {data.get('reps', 1)} prefills and decodes "
              "after a warm-up, run alternately with the other tool's (ref, hf, hf, ref, …). fp32: both cast the "
              "bf16 weights once (the reference on first use, `resident=True`; transformers when loading). "
              "bf16: transformers runs on views of the mapped file; the reference packs its weights once into "
              "oneDNN's layout (`reference.packing`: a copy of the linear weights, bit-identical products), which "
              "is its peak RssAnon.")]
    if data["skipped"]:
        lines.append(f"Skipped (would not fit in half of the available memory): {', '.join(data['skipped'])}.")
    return report.section(MARK, lines, data)
