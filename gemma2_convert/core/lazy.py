"""Lazy tensors: shape and dtype known up front, bytes read only when ``load()`` is called.

A leaf module (torch only). Readers yield ``(name, LazyTensor)``; transforms compose with
``map``; writers call ``load()`` one tensor at a time, so nothing holds the whole model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

Shape = tuple[int, ...]


def dtype_nbytes(dtype: torch.dtype) -> int:
    """Bytes per element of a torch dtype."""
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class LazyTensor:
    """A tensor that is not read yet.

    ``thunk()`` must return a tensor of exactly ``shape`` and ``dtype``; ``load`` checks it.
    For quantized data ``dtype`` is the storage dtype of the returned object.
    """

    shape: Shape
    dtype: torch.dtype
    thunk: Callable[[], torch.Tensor]
    stored_nbytes: int | None = None
    """Bytes the data really occupies when it is packed (quantized) and ``load`` decodes it; else None."""
    prefetch: Callable[[], None] | None = None
    """Asks the OS to start reading the bytes ``load`` will need, without waiting (a hint; None when
    the reader has nothing to ask). Writers call it ahead of ``load`` so reading a source that is not
    in the page cache overlaps with the work on the tensors before it."""
    rows: Callable[[int, int], torch.Tensor] | None = None
    """``rows(start, stop)``: rows ``start:stop`` of what ``load`` returns, reading and decoding only those (None:
    slice ``load()``). Packed readers give it so a 256k-row embedding is looked up and streamed, never decoded
    whole."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded tensor."""
        return self.numel * dtype_nbytes(self.dtype)

    @property
    def packed(self) -> bool:
        return self.stored_nbytes is not None

    def load(self) -> torch.Tensor:
        t = self.thunk()
        if tuple(t.shape) != self.shape or t.dtype != self.dtype:
            raise AssertionError(
                f"lazy tensor produced {t.dtype}{list(t.shape)}, promised {self.dtype}{list(self.shape)}"
            )
        return t

    def row_blocks(self, block_bytes: int) -> Iterator[torch.Tensor]:
        """The tensor as consecutive blocks of rows, each at most ``block_bytes`` (at least one row), read
        with ``rows``: concatenated they are ``load()``. Needs ``rows``; each block's shape and dtype are
        checked."""
        if self.rows is None:
            raise AssertionError("row_blocks needs a lazy tensor with rows")
        n = self.shape[0] if self.shape else 0
        step = max(1, block_bytes // max(1, self.nbytes // max(1, n)))
        for a in range(0, n, step):
            t = self.rows(a, min(a + step, n))
            want = (min(a + step, n) - a, *self.shape[1:])
            if tuple(t.shape) != want or t.dtype != self.dtype:
                raise AssertionError(f"lazy tensor rows {a}:{a + want[0]} produced {t.dtype}{list(t.shape)}, "
                                     f"promised {self.dtype}{list(want)}")
            yield t

    def map(
        self, fn: Callable[[torch.Tensor], torch.Tensor], shape: Shape | None = None,
        dtype: torch.dtype | None = None,
    ) -> LazyTensor:
        """A new lazy tensor ``fn(self.load())`` with the given (default: unchanged) shape/dtype."""
        return LazyTensor(
            self.shape if shape is None else tuple(shape),
            self.dtype if dtype is None else dtype,
            lambda: fn(self.load()),
            self.stored_nbytes,
            self.prefetch,
        )

    def to(self, dtype: torch.dtype) -> LazyTensor:
        """Cast lazily; a no-op when the dtype already matches."""
        if dtype == self.dtype:
            return self
        return self.map(lambda t: t.to(dtype), dtype=dtype)

    @staticmethod
    def of(t: torch.Tensor) -> LazyTensor:
        """Wrap an in-memory tensor."""
        return LazyTensor(tuple(t.shape), t.dtype, lambda: t)
