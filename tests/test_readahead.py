"""formats.readahead: loads in the expected order are served by the background thread, any other order
gives the same tensors with at most ``depth`` guesses waiting, and errors reach the caller."""

from __future__ import annotations

import threading

import pytest
import torch

from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats.readahead import ReadAhead


def sources(n: int, calls: list[tuple[str, str]], fail: str | None = None) -> list[tuple[str, LazyTensor]]:
    """``n`` lazy tensors whose loads record (name, thread name) in ``calls``."""
    def make(name: str, i: int) -> LazyTensor:
        def load() -> torch.Tensor:
            calls.append((name, threading.current_thread().name))
            if name == fail:
                raise ValueError(f"{name} is damaged")
            return torch.full((3,), float(i))
        return LazyTensor((3,), torch.float32, load)
    return [(f"t{i}", make(f"t{i}", i)) for i in range(n)]


def test_expected_order_is_loaded_ahead_once_each():
    calls: list[tuple[str, str]] = []
    ra = ReadAhead(sources(6, calls), depth=2)
    tensors = ra.tensors()
    for i, (name, t) in enumerate(tensors.items()):
        assert torch.equal(t.load(), torch.full((3,), float(i))), name
    assert sorted(n for n, _ in calls) == [f"t{i}" for i in range(6)]  # each loaded once
    assert all(thread.startswith("readahead") for n, thread in calls if n != "t0")  # all but the first, ahead
    assert not ra.pending


def test_another_order_gives_the_same_tensors_and_drops_guesses():
    calls: list[tuple[str, str]] = []
    ra = ReadAhead(sources(8, calls), depth=2)
    tensors = ra.tensors()
    for name in ["t5", "t0", "t7", "t2", "t2", "t6", "t1", "t3", "t4"]:
        assert torch.equal(tensors[name].load(), torch.full((3,), float(name[1:]))), name
        assert len(ra.pending) <= 2 and set(ra.pending) <= set(ra.order[ra.index[name] + 1:ra.index[name] + 3])


def test_an_error_reaches_the_caller_whoever_loaded():
    calls: list[tuple[str, str]] = []
    tensors = ReadAhead(sources(3, calls, fail="t1"), depth=2).tensors()
    tensors["t0"].load()  # t1 fails on the background thread
    with pytest.raises(ValueError, match="t1 is damaged"):
        tensors["t1"].load()
    with pytest.raises(ValueError, match="t1 is damaged"):  # and again, loaded directly
        tensors["t1"].load()
    assert torch.equal(tensors["t2"].load(), torch.full((3,), 2.0))
