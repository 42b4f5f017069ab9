"""Where the time of a streaming conversion goes: the per-byte costs it has and ``cp`` has not.

``cp`` moves bytes inside the kernel (``copy_file_range``); a converter reads them through an mmap,
touches them in user space and writes them back. This child measures, on one thread, the rates of
what to-gguf and orig-to-hf do per byte — XXH3-128 (to-gguf records a fingerprint of the source), the
bf16→f16 cast, a user-space ``write`` into the page cache plus ``fsync`` — so the report can turn a
gap to ``cp`` into seconds.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

SIZE = 512 << 20  # bytes per measurement


def _rate(fn, nbytes: int, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def main(argv: list[str]) -> int:
    """Child: ``python -m bench profile-parts SCRATCH_DIR``; prints JSON of GB/s per operation."""
    import torch
    import xxhash

    torch.set_num_threads(1)
    x = torch.randn(SIZE // 2, dtype=torch.float32).to(torch.bfloat16)
    raw = memoryview(x.view(torch.uint8).numpy())
    out = torch.empty(SIZE // 2, dtype=torch.float16)
    path = Path(argv[0]) / "profile-write.bin"

    def write() -> None:
        with open(path, "wb") as f:
            for i in range(0, SIZE, 16 << 20):
                f.write(raw[i:i + (16 << 20)])
            f.flush()
            os.fsync(f.fileno())

    rates = {"xxh3_gb_s": _rate(lambda: xxhash.xxh3_128(raw).digest(), SIZE),
             "cast_bf16_f16_gb_s": _rate(lambda: out.copy_(x), SIZE),
             "write_fsync_gb_s": _rate(write, SIZE)}
    path.unlink(missing_ok=True)
    print(json.dumps(rates))
    return 0

