"""Read-ahead for lazy tensors whose ``load`` is work, not only I/O (a reader's transposes).

A writer loads a tensor, then writes it; with a plain lazy tensor the two alternate on one thread. Here,
when tensor i is loaded, one background thread starts loading the next ``depth`` tensors in the expected
order, so a transpose (torch releases the GIL) runs while the writer's ``write`` calls (which release it
too) copy the tensor before it. A load out of the expected order drops the guesses and is served directly:
the bytes are the same either way, only the overlap is lost. At most ``depth`` loaded tensors wait.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from gemma2_convert.core.lazy import LazyTensor


class ReadAhead:
    """Lazy tensors, in the order they are expected to be loaded, each ``load`` starting the next ones."""

    def __init__(self, items: list[tuple[str, LazyTensor]], depth: int = 2) -> None:
        self.order = [name for name, _ in items]
        self.sources = dict(items)
        self.index = {name: i for i, name in enumerate(self.order)}
        self.depth = depth
        self.pending: dict[str, Future[torch.Tensor]] = {}
        self.lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None

    def tensors(self) -> dict[str, LazyTensor]:
        """The tensors, each loading through the read-ahead (same shape, dtype and prefetch hint)."""
        return {n: LazyTensor(t.shape, t.dtype, lambda n=n: self.load(n), t.stored_nbytes, t.prefetch)
                for n, t in self.sources.items()}

    def load(self, name: str) -> torch.Tensor:
        i = self.index[name]
        window = self.order[i + 1:i + 1 + self.depth]
        with self.lock:
            found = self.pending.pop(name, None)
            for n in [n for n in self.pending if n not in window]:  # another order: drop those guesses
                self.pending.pop(n).cancel()
            if self.pool is None:
                self.pool = ThreadPoolExecutor(1, thread_name_prefix="readahead")
            for n in window:
                if n not in self.pending:
                    self.pending[n] = self.pool.submit(self.sources[n].load)
        return found.result() if found is not None else self.sources[name].load()
