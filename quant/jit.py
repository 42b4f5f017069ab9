"""Compiled per-block kernels: numba when it is installed, else the torch implementations.

The GGUF block quantizers (``quant/gguf_legacy.py``, ``quant/gguf_kquants.py``) are written as
whole-tensor torch ops so that they read like the C they port; a per-block loop compiled by numba
(``quant/gguf_legacy_jit.py``, ``quant/gguf_kquants_jit.py``) does the same float32 arithmetic in the
same order, in one pass over the data, without the GIL. Both give the same bytes
(tests/test_gguf_*_jit.py, tests/test_gguf_codec_threads.py), so those kernels are purely a speed-up.
The ``mse`` method's search (``quant/methods/mse_jit.py``) sums in float64 where the torch version sums
in float32, so the two may pick different candidates among near-ties (never a worse one:
tests/test_mse_jit.py). Callers choose: ``compiled=False`` on ``quant.gguf_codec.quantize_tensor``, the
``mse`` method and ``quant.metrics.error_sums`` runs the torch code; ``compiled=True`` (the default) runs
the kernels where numba is installed (:func:`available`) and the torch code where it is not.

Kernels are compiled on first use and cached on disk (numba's ``cache=True``: ``__pycache__`` next to
the module, or numba's per-user cache directory when that is read-only). They run on one thread and
release the GIL; parallelism comes from the caller's threads (the GGUF writer's encoders).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def available() -> bool:
    """numba is installed, so the compiled kernels can run. Found without importing it (importing costs a
    third of a second, so only the kernel modules, themselves imported on first use, do)."""
    return importlib.util.find_spec("numba") is not None


def kernel(fn: F) -> F:
    """``numba.njit`` for a quantization kernel: cached, GIL released, C float semantics.

    ``error_model="numpy"``: a float division by zero gives inf/NaN as in C instead of raising. No
    ``fastmath``: LLVM then neither reassociates sums nor fuses multiply-adds, so float32 results
    equal the C reference compiled without ``-ffast-math``. Without numba ``fn`` is returned as is
    (plain Python, never called: callers check :func:`available` first).
    """
    if not available():  # pragma: no cover
        return fn
    import numba  # deferred: only the kernel modules, imported on first use, pay for numba

    return numba.njit(cache=True, nogil=True, error_model="numpy", boundscheck=False)(fn)


def default_threads() -> int:
    """CPUs this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` where that is missing)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def parallel_for(fn: Callable[[Any], None], items: Sequence[Any], threads: int, name: str = "kernel") -> None:
    """``fn(item)`` for every item, on up to ``threads`` worker threads (in the caller when one is
    enough). Meant for kernels that release the GIL and write disjoint parts of one output."""
    workers = min(len(items), max(1, threads))
    if workers <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        for done in pool.map(fn, items):
            del done
