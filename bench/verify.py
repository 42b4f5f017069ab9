"""Verify against its floor: read both checkpoints once + both models' forward FLOPs at the measured matmul rate.

For each size: a bf16 gemma_pytorch ``model.ckpt`` → ``orig-to-hf --no-verify`` and ``orig-to-hf`` (its default
verification), then on the pair: the read rate (a child reads every byte of both checkpoints once, 16 MiB at a
time, in the page-cache state ``verify`` meets), the matmul rate (a child times ``torch.nn.functional.linear``
on the model's own weight shapes, in the compute dtype, with as many rows as a prompt has tokens) and
``verify SRC OUT --tokens N`` in each compute mode. floor = read time + FLOPs / matmul rate, where FLOPs are
those of both models' linear layers and head for every compared position (attention's own products, a few
percent at these lengths, are left out, so the floor is a little low).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from bench import forward, harness, report, synth
from bench.harness import CONVERT, PYTHON, Case

MARK = "verify"
MODES = {"exact": "float32", "fast": "bfloat16"}
CHUNK = 16 << 20


def linear_shapes(size: str) -> list[tuple[int, int, int]]:
    """(out, in, count) of every matmul weight of the preset: decoder projections, then the head by chunks."""
    c = synth.preset(size)
    H, I, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    rows = 32768  # reference.model.HEAD_CHUNK_ROWS
    return [(c.q_dim, H, L), (c.kv_dim, H, 2 * L), (H, c.q_dim, L), (I, H, 2 * L), (H, I, L),
            (rows, H, c.vocab_size // rows), (c.vocab_size % rows, H, 1)]


def forward_flops(size: str, positions: int) -> int:
    """Multiply-adds ×2 of one model's linear layers and head over ``positions`` tokens."""
    return 2 * positions * sum(o * i * n for o, i, n in linear_shapes(size))


def read_main(argv: list[str]) -> int:
    """Child: ``python -m bench verify-read PATH...``; prints JSON {bytes, seconds} of reading every file once."""
    files = [f for p in map(Path, argv) for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    buf, total = bytearray(CHUNK), 0
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    print(json.dumps({"bytes": total, "seconds": time.perf_counter() - t0}))
    return 0


def matmul_main(argv: list[str]) -> int:
    """Child: ``python -m bench verify-matmul SIZE DTYPE TOKENS``; prints JSON {flops, seconds, gflop_s}."""
    import torch

    size, dtype, tokens = argv[0], getattr(torch, argv[1]), int(argv[2])
    flops = seconds = 0.0
    for out, inn, count in linear_shapes(size):
        if out == 0:
            continue
        w, x = torch.randn(out, inn).to(dtype), torch.randn(1, tokens, inn).to(dtype)
        torch.nn.functional.linear(x, w)  # warm-up
        reps = 3
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.nn.functional.linear(x, w)
        seconds += (time.perf_counter() - t0) / reps * count
        flops += 2.0 * tokens * out * inn * count
        del w, x
    print(json.dumps({"flops": flops, "seconds": seconds, "gflop_s": flops / seconds / 1e9}))
    return 0


def _child(args: list[str]) -> dict:
    return harness.measure(Case([PYTHON, "-m", "bench", *args])).json()


def run_size(size: str, tokens: int, work: Path, log=harness.say) -> dict:
    cfg = synth.preset(size)
    src, out = work / size / "model.ckpt", work / size / "hf"
    log(f"verify {size}: writing the source to {src}")
    synth.write_orig_ckpt(src, cfg)
    cfg_json = synth.write_config(work / size / "config.json", cfg)
    convert = list(CONVERT) + ["orig-to-hf", str(src), str(out), "--config", str(cfg_json), "--json", "--force"]
    row: dict = {"size": size, "params": synth.n_params(cfg), "tokens": tokens}
    for name, case in {"orig-to-hf --no-verify": Case(convert + ["--no-verify"], out),
                       "orig-to-hf": Case(convert, out)}.items():
        s = harness.measure(case)
        row[name] = {"durable_s": s.durable_s, "peak_anon_gb": s.peak_anon / 1e9}
        log(f"  {name}: {s.durable_s:.1f} s, peak RssAnon {s.peak_anon / 1e9:.2f} GB")
    for mode, dtype in MODES.items():
        rd = _child(["verify-read", str(src), str(out)])
        cmd = list(CONVERT) + ["verify", str(src), str(out), "--tokens", str(tokens), "--json", "--config",
                               str(cfg_json), "--compute", mode]
        s = harness.measure(Case(cmd))
        rep = s.json()
        positions = int(rep.get("tokens", tokens - 1)) + 1  # one prompt (no tokenizer beside model.ckpt)
        mm = _child(["verify-matmul", size, dtype, str(positions)])
        flops = 2 * forward_flops(size, positions)
        floor = rd["seconds"] + flops / (mm["gflop_s"] * 1e9)
        row[mode] = {"wall_s": s.exit_s, "peak_anon_gb": s.peak_anon / 1e9, "read_s": rd["seconds"],
                     "read_gb_s": rd["bytes"] / rd["seconds"] / 1e9, "gflop": flops / 1e9,
                     "gflop_s": mm["gflop_s"], "floor_s": floor, "ratio": s.exit_s / floor,
                     "passed": rep.get("passed"), "max_abs_logits": rep.get("max_abs_logits")}
        log(f"  verify --compute {mode}: {row[mode]}")
    harness.remove(work / size)
    return row


def run(sizes: list[str], tokens: int, work: Path, machine: dict, runs: int = 3, quick: bool = False,
        log=harness.say) -> str:
    """The whole section from one run: verify and orig-to-hf ± verification at each size, then the forward
    pass against transformers eager (``bench.forward``) at the smallest size."""
    load = os.getloadavg()[0]
    rows = [run_size(s, tokens, work, log) for s in sizes]
    fwd = forward.measure(sizes[0], 1 if quick else runs, work, quick, log)
    harness.remove(work / f"gemma-2-{sizes[0]}-shaped-bf16")
    return render({"sizes": sizes, "tokens": tokens, "machine": machine, "rows": rows, "load": load,
                   "forward": fwd})


def render(data: dict) -> str:
    rows = []
    for r in data["rows"]:
        for mode in MODES:
            v = r[mode]
            rows.append([r["size"].upper(), mode, f"{v['read_s']:.1f} ({v['read_gb_s']:.1f} GB/s)",
                         f"{v['gflop']:.0f} at {v['gflop_s']:.0f} GFLOP/s", f"{v['floor_s']:.1f}",
                         f"{v['wall_s']:.1f}", f"{v['ratio']:.2f}×", report.gb(v["peak_anon_gb"]),
                         "pass" if v["passed"] else "FAIL"])
    conv = []
    for r in data["rows"]:
        without, with_ = r["orig-to-hf --no-verify"], r["orig-to-hf"]
        conv.append([r["size"].upper(), f"{without['durable_s']:.0f}", f"{with_['durable_s']:.0f}",
                     f"{with_['durable_s'] / without['durable_s']:.2f}×", report.gb(with_["peak_anon_gb"])])
    command = f"python -m bench verify --sizes {','.join(data['sizes'])} --tokens {data['tokens']}"
    fwd = forward_lines(data["forward"]) if "forward" in data else []
    lines = ["## Verify against its floor", "",
             report.run_line(command, data["machine"]), "",
             *report.table(["size", "compute", "read both once, s", "forward FLOPs (both models)", "floor, s",
                            "verify, s", "× floor", "peak RssAnon", "verdict"], rows), "",
             *report.table(["size", "orig-to-hf --no-verify, s", "orig-to-hf + verify, s", "× without",
                            "RssAnon with verify"], conv), "",
             (f"`verify SRC OUT --tokens {data['tokens']}` on a gemma_pytorch source and its orig-to-hf output. "
              "The floor is what any verification must spend: reading both checkpoints once (measured here, same "
              "page-cache state) plus both models' linear-layer FLOPs at the rate `torch.nn.functional.linear` "
              "reaches on the same shapes and dtype. One run per cell, wall time to exit."), *fwd]
    return report.section(MARK, lines, data)


def forward_lines(f: dict) -> list[str]:
    """The forward pass against transformers eager (goal ≥ 1.0× in all four cells), from ``bench.forward``."""
    r, rows = f["results"], []
    for dt in ("bf16", "fp32"):
        ref, hf = r.get(f"ref/{dt}"), r.get(f"hf/{dt}")
        if ref and hf:
            rows.append([dt, f"{ref['prefill_tok_s']:.1f} / {hf['prefill_tok_s']:.1f}",
                         report.ratio(ref["prefill_tok_s"], hf["prefill_tok_s"]),
                         f"{ref['decode_tok_s']:.2f} / {hf['decode_tok_s']:.2f}",
                         report.ratio(ref["decode_tok_s"], hf["decode_tok_s"])])
    return ["", *report.table(["dtype", "prefill tok/s, reference / transformers", "prefill ×",
                               "decode tok/s, reference / transformers", "decode ×"], rows), "",
            f"The reference forward against transformers eager at the {f['size'].upper()} shape, batch 1, "
            f"a {f['prompt']}-token prompt and {f['decode']} decoded tokens, median of {f['runs']} (as `python -m "
            "bench forward`, whose own section has load times and memory)."
            + (f" Skipped (does not fit half of RAM): {', '.join(f['skipped'])}." if f["skipped"] else "")]
