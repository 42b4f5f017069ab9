"""SequentialWriter: the same bytes through O_DIRECT (staged, padded, truncated) as through the page cache."""

from __future__ import annotations

import errno
import os

import pytest

from gemma2_convert.formats import direct_write
from gemma2_convert.formats.direct_write import SequentialWriter

PIECES = [b"GGUF", os.urandom(4091), b"", os.urandom(9000), os.urandom(1), bytes(12_000), os.urandom(8192)]


def _write(path, pieces, direct: bool = True) -> SequentialWriter:
    with open(path, "wb") as f:
        w = SequentialWriter(f, direct)
        for p in pieces:
            w.write(p)
        assert w.finish() == sum(len(p) for p in pieces)
    return w


@pytest.mark.parametrize("n", [0, 1, 3, len(PIECES)])
def test_direct_and_buffered_give_the_same_bytes(tmp_path, monkeypatch, n):
    monkeypatch.setattr(direct_write, "STAGING", 8192)  # many full flushes and a padded tail
    plain = _write(tmp_path / "plain", PIECES[:n], direct=False)
    assert not plain.direct
    _write(tmp_path / "direct", PIECES[:n], direct=True)  # direct where this filesystem takes O_DIRECT, else plain again
    want = b"".join(PIECES[:n])
    assert (tmp_path / "plain").read_bytes() == want
    assert (tmp_path / "direct").read_bytes() == want


def test_a_refused_first_direct_write_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_write, "STAGING", 8192)
    real = os.write
    calls = []

    def refuse_first(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data)

    with open(tmp_path / "f", "wb") as f:
        w = SequentialWriter(f)
        if not w.direct:
            pytest.skip("this filesystem refuses O_DIRECT already at fcntl: the fallback is the plain path")
        monkeypatch.setattr(direct_write.os, "write", refuse_first)
        for p in PIECES:
            w.write(p)
        w.finish()
    assert not w.direct
    assert (tmp_path / "f").read_bytes() == b"".join(PIECES)


def test_other_write_errors_are_raised(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_write, "STAGING", 8192)

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    with open(tmp_path / "f", "wb") as f:
        w = SequentialWriter(f)
        monkeypatch.setattr(direct_write.os, "write", full)
        if w.direct:
            with pytest.raises(OSError) as e:
                w.write(bytes(20_000))
            assert e.value.errno == errno.ENOSPC
