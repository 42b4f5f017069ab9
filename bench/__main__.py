"""``python -m bench all --size 2b [--llama-cpp DIR]``, or one benchmark: ``orig-to-hf``, ``keras``, ``gguf``,
``quant``, ``forward``, ``imatrix``, ``lowbit``, ``split``, ``scale``, ``transcode``, ``adapter``, ``verify``; ``chart``
redraws the PNG from the markdown.
``python -m bench NAME --help``.

Synthetic checkpoints go to a scratch directory (``--workdir``, default the system temp dir) that is
removed at the end, also on Ctrl-C. Each benchmark replaces its own section of ``--doc`` as soon as it
finishes; the targets table and the chart are redrawn from all sections.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

from bench import (
    adapter,
    autoround,
    chart,
    forward,
    gguf,
    harness,
    imatrix,
    keras_to_hf,
    lowbit,
    machine,
    orig_to_hf,
    profile,
    quant,
    report,
    scale,
    split,
    synth,
    targets,
    transcode,
    verify,
)

SUITE = ("orig-to-hf", "keras", "gguf", "quant", "forward")


def _options(ap: argparse.ArgumentParser, *, size: bool = True) -> None:
    if size:
        ap.add_argument("--size", choices=synth.SIZES, default="2b", help="shape of the synthetic models")
    ap.add_argument("--runs", type=int, default=3, help="runs per case (the median is reported)")
    ap.add_argument("--llama-cpp", type=Path, default=None,
                    help="llama.cpp source tree with convert_hf_to_gguf.py (e.g. the llama-cpp-python sdist's "
                         "vendor/llama.cpp); without it that anchor is skipped")
    ap.add_argument("--threads", type=int, default=2, help="threads for quantization, ours and llama.cpp's")
    ap.add_argument("--workdir", type=Path, default=None, help="parent of the scratch directory")
    ap.add_argument("--doc", type=Path, default=Path("docs/BENCHMARKS.md"), help="markdown report to update")
    ap.add_argument("--png", type=Path, default=None, help="chart (default: benchmarks.png next to --doc)")
    ap.add_argument("--quick", action="store_true", help="a few cases of each kind (the harness's smoke test)")


def machine_section(m: dict) -> str:
    v = m["versions"]
    lines = ["## Machine", "", f"Last `python -m bench` run: {m['date']}.", "",
             *report.table(["", ""], [["CPU", f"{m['cpu']}, {m['cores']} cores"],
                                      ["RAM", f"{m['ram_gb']:.1f} GB, swap {m['swap_gb']:.1f} GB"],
                                      ["disk (scratch)", m["disk"]], ["OS", m["os"]],
                                      ["load average at the start", m["load"]],
                                      ["packages", ", ".join(f"{k} {x}" for k, x in v.items())]])]
    return report.section("machine", lines, {})


def run_benchmark(name: str, a: argparse.Namespace, work: Path, m: dict) -> str:
    if name == "orig-to-hf":
        return orig_to_hf.run(a.size, a.runs, work, m)
    if name == "keras":
        return keras_to_hf.run(a.size, a.runs, work, m)
    if name == "gguf":
        return gguf.run(a.size, a.runs, work, work.parent, a.llama_cpp, m, a.quick)
    if name == "quant":
        return quant.run(a.size, a.runs, work, a.threads, m, a.quick, shared=work.parent)
    if name == "forward":
        return forward.run(a.size, a.runs, work.parent, m, a.quick)
    if name == "imatrix":
        return imatrix.run(a.size, a.runs, work, a.threads, m, a.quick, shared=work.parent)
    if name == "lowbit":
        return lowbit.run(a.size, a.runs, work, a.threads, m, a.quick)
    if name == "autoround":
        return autoround.run(a.size, a.runs, work, a.threads, m, a.quick)
    if name == "transcode":
        return transcode.run(a.size, a.runs, work, a.threads, m, a.quick, shared=work.parent)
    if name == "adapter":
        return adapter.run(a.size, a.runs, work, m, a.quick, shared=work.parent)
    if name == "split":
        return split.run(a.size, a.split_max_size, work, m)
    if name == "verify":
        return verify.run(a.sizes.split(","), a.tokens, work, m, a.runs, a.quick)
    return scale.run(a.sizes.split(","), work, m)


def suite(names: tuple[str, ...], a: argparse.Namespace) -> int:
    if getattr(a, "llama_cpp", None) is not None and not (a.llama_cpp / "convert_hf_to_gguf.py").is_file():
        print(f"--llama-cpp {a.llama_cpp}: no convert_hf_to_gguf.py there", file=sys.stderr)
        return 2
    if "keras" in names and importlib.util.find_spec("h5py") is None:
        print("the keras benchmark needs h5py: pip install -e '.[keras]'", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    with harness.scratch("bench-", a.workdir) as work:
        m = machine.describe(work)
        for name in names:
            sub = work / name
            sub.mkdir()
            harness.say(f"== {name}")
            text = run_benchmark(name, a, sub, m)
            harness.remove(sub)
            report.write_sections(a.doc, {name: text, "machine": machine_section(m)})
            report.write_sections(a.doc, {"targets": targets.render(report.read_data(a.doc))})
    print(chart.draw(a.doc, a.png or a.doc.with_name("benchmarks.png")), flush=True)
    print(f"done in {time.perf_counter() - t0:.0f} s; report: {a.doc}", flush=True)
    return 0


CHILDREN = {
    "transformers-script": orig_to_hf.transformers_script_main,
    "quant-kernels": quant.kernels_main,
    "llama-quantize": quant.llama_quantize_main,
    "forward-child": forward.child_main,
    "profile-parts": profile.main,
    "lowbit-kernels": lowbit.kernels_main,
    "split-llama-load": split.llama_load_main,
    "adapter-peft": adapter.peft_main,
    "verify-read": verify.read_main,
    "verify-matmul": verify.matmul_main,
}


def main(argv: list[str]) -> int:
    if argv and argv[0] in CHILDREN:
        return CHILDREN[argv[0]](argv[1:])
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    _options(sub.add_parser("all", help="orig-to-hf, keras, gguf, quant and forward, then the targets and the chart"))
    for name, mod in (("orig-to-hf", orig_to_hf), ("keras", keras_to_hf), ("gguf", gguf), ("quant", quant),
                      ("forward", forward), ("imatrix", imatrix), ("transcode", transcode), ("adapter", adapter),
                      ("autoround", autoround)):
        _options(sub.add_parser(name, help=mod.__doc__.split("\n")[0]))
    _options(sub.add_parser("lowbit", help=lowbit.__doc__.split("\n")[0]))
    sp = sub.add_parser("split", help=split.__doc__.split("\n")[0])
    _options(sp)
    sp.set_defaults(size="27b")
    sp.add_argument("--split-max-size", default="20G", help="the parts' size limit (to-gguf's option)")
    sc = sub.add_parser("scale", help=scale.__doc__.split("\n")[0])
    _options(sc, size=False)
    sc.add_argument("--sizes", default="2b,9b,27b", help="comma-separated sizes, smallest first")
    vf = sub.add_parser("verify", help=verify.__doc__.split("\n")[0])
    _options(vf, size=False)
    vf.add_argument("--sizes", default="2b,9b", help="comma-separated sizes, smallest first")
    vf.add_argument("--tokens", type=int, default=16, help="tokens per prompt of each verify")
    ch = sub.add_parser("chart", help="redraw the chart from the markdown report")
    ch.add_argument("--doc", type=Path, default=Path("docs/BENCHMARKS.md"))
    ch.add_argument("--png", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.command in ("scale", "verify") and not set(a.sizes.split(",")) <= set(synth.SIZES):
        ap.error(f"--sizes {a.sizes}: choose from {', '.join(synth.SIZES)}")
    try:
        if a.command == "chart":
            print(chart.draw(a.doc, a.png or a.doc.with_name("benchmarks.png")))
            return 0
        return suite(SUITE if a.command == "all" else (a.command,), a)
    except (KeyboardInterrupt, harness.Interrupted):
        print("interrupted; scratch files removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
