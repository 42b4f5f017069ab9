"""``python -m bench NAME [options]``: run one benchmark; ``python -m bench`` lists them."""

from __future__ import annotations

import sys

from bench import gguf as gguf_bench
from bench import orig_to_hf

BENCHMARKS = {
    "orig-to-hf": orig_to_hf.main,
    "transformers-script": orig_to_hf.transformers_script_main,  # a baseline, run as a child process
    "gguf": gguf_bench.main,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        print("usage: python -m bench NAME [options]\n\nbenchmarks: " + ", ".join(BENCHMARKS))
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return BENCHMARKS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
