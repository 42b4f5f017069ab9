"""Scale: orig→HF and verification of 2B/9B/27B-shaped checkpoints, peak anonymous memory against model size.

For each size: a bf16 gemma_pytorch ``model.ckpt`` → ``cp`` of it, ``orig-to-hf --no-verify``, ``orig-to-hf``
with its default verification (every tensor compared, reference logits of source and output on a
64-token prompt) and ``verify SRC OUT --tokens 16``, one run each. The reference streams every layer
from the mapped files (the model is far above the in-RAM threshold), so memory should not grow with size.

Disk: a size whose source and output do not both fit on the scratch disk gets a source whose decoder
layers all view layer 0's bytes (``synth.write_orig_ckpt(share_layers=True)``): every name, shape and
layer is still there and read per layer, but the file holds one layer; the HF output is written in full.
``cp`` and ``--no-verify`` (whose point is the ratio to cp) are skipped then.
"""

from __future__ import annotations

from pathlib import Path

from bench import harness, report, synth
from bench.harness import CONVERT, Case

MARK = "scale"
MARGIN = 4e9  # bytes of disk left free for everyone else


def full_bytes(size: str) -> int:
    return 2 * synth.n_params(synth.preset(size))


def shared_bytes(size: str) -> int:
    """Bytes of a source whose layers share one layer's records: the embedding, one layer, the final norm."""
    cfg = synth.preset(size)
    one = cfg.replace(num_hidden_layers=1, layer_types=())
    return 2 * synth.n_params(one)


def run_size(size: str, work: Path, log=harness.say) -> dict:
    cfg = synth.preset(size)
    need, free = full_bytes(size), harness.free_disk(work)
    share = free < 2 * need + MARGIN
    if share and free < need + shared_bytes(size) + MARGIN:
        log(f"scale {size}: skipped, {free / 1e9:.0f} GB of disk free, "
            f"{(need + shared_bytes(size) + MARGIN) / 1e9:.0f} GB needed")
        return {"size": size, "params": synth.n_params(cfg), "skipped": f"{free / 1e9:.0f} GB of disk free"}
    src, out = work / size / "model.ckpt", work / size / "hf"
    log(f"scale {size}: writing the source ({'one shared layer' if share else 'full'}, {need / 1e9:.1f} GB of "
        f"weights) to {src}")
    disk_bytes = synth.write_orig_ckpt(src, cfg, share_layers=share)
    cfg_json = synth.write_config(work / size / "config.json", cfg)
    cli = list(CONVERT)
    convert = cli + ["orig-to-hf", str(src), str(out), "--config", str(cfg_json), "--json", "--force"]
    cases = {
        "cp": Case(["cp", str(src), str(work / size / "copy.ckpt")], work / size / "copy.ckpt"),
        "orig-to-hf --no-verify": Case(convert + ["--no-verify"], out),
        "orig-to-hf (verify, 64 tokens)": Case(convert, out),
        "verify --tokens 16": Case(cli + ["verify", str(src), str(out), "--tokens", "16", "--json", "--config",
                                          str(cfg_json)]),
    }
    if share:
        del cases["cp"], cases["orig-to-hf --no-verify"]
    row: dict = {"size": size, "params": synth.n_params(cfg), "source_disk_bytes": disk_bytes, "shared": share}
    for name, case in cases.items():
        s = harness.measure(case)
        row[name] = {"exit_s": s.exit_s, "durable_s": s.durable_s, "peak_anon_gb": s.peak_anon / 1e9,
                     "inner_s": s.json().get("seconds")}
        if name == "verify --tokens 16":
            row["verify"] = {k: s.json().get(k) for k in ("passed", "tokens", "max_abs_logits", "tensors_equal",
                                                          "tensors_total")}
        log(f"  {name}: {s.exit_s:.1f} s, peak RssAnon {s.peak_anon / 1e9:.2f} GB")
        if name in ("cp", "orig-to-hf --no-verify"):
            harness.remove(case.out)
    row["output_bytes"] = harness.tree_bytes(out)
    harness.remove(work / size)
    return row


def run(sizes: list[str], work: Path, machine: dict, log=harness.say) -> str:
    rows = [run_size(s, work, log) for s in sizes]
    return render({"sizes": sizes, "machine": machine, "rows": rows})


def _cell(row: dict, name: str, cp: dict | None = None) -> list[str]:
    s = row.get(name)
    if s is None:
        return ["—", "—"]
    t = f"{s['durable_s']:.0f}" + (f" ({s['durable_s'] / cp['durable_s']:.2f}× cp)" if cp else "")
    return [t, report.gb(s["peak_anon_gb"])]


def render(data: dict) -> str:
    rows = []
    for r in data["rows"]:
        if "skipped" in r:
            rows.append([r["size"].upper(), f"{r['params'] / 1e9:.2f}", f"skipped: {r['skipped']}"] + [""] * 10)
            continue
        src = f"{r['source_disk_bytes'] / 1e9:.1f}" + (" (layers shared)" if r["shared"] else "")
        v = r.get("verify", {})
        rows.append([r["size"].upper(), f"{r['params'] / 1e9:.2f}", src, f"{r['output_bytes'] / 1e9:.1f}",
                     *_cell(r, "cp")[:1], *_cell(r, "orig-to-hf --no-verify", r.get("cp")),
                     *_cell(r, "orig-to-hf (verify, 64 tokens)"), *_cell(r, "verify --tokens 16"),
                     "pass" if v.get("passed") else "FAIL", f"{v.get('max_abs_logits', float('nan')):.3g}"])
    lines = ["## Scale: orig→HF and verify at 2B / 9B / 27B shapes, peak memory against model size", "",
             report.run_line(f"python -m bench scale --sizes {','.join(data['sizes'])}", data["machine"]), "",
             *report.table(["size", "params, B", "source on disk, GB", "HF output, GB", "cp, s",
                            "orig-to-hf --no-verify, s", "RssAnon", "orig-to-hf + verify, s", "RssAnon",
                            "verify --tokens 16, s", "RssAnon", "verify", "max |Δ logits|"], rows), "",
             "One run per cell, wall time to a durable output. Verification runs source and output in lockstep: "
             "each layer is read once from the mapped files, its tensors compared, and the reference forward "
             "pass (float32) of both run on it. *Layers shared*: the source's decoder layers all view "
             "layer 0's bytes, so source and full output fit on the disk together; the model still has every "
             "layer and is read layer by layer."]
    return report.section(MARK, lines, data)
