"""The GGUF writer's pipeline (prefetch, hash backlog, write queue, write-behind): its knobs change
the speed, never the bytes or the source hash; a worker's error reaches the caller."""

from __future__ import annotations

import ctypes
import errno
import hashlib

import pytest
import torch

from gemma2_convert.formats import write_behind
import gemma2_convert.formats.gguf.writer as gguf_writer
from gemma2_convert.formats.gguf.values import string
from gemma2_convert.formats.gguf.writer import TensorPlan, write_gguf
from gemma2_convert.formats.safetensors import SafetensorsFile, write_safetensors
from gemma2_convert.core.lazy import LazyTensor

META = [("general.architecture", string("gemma2"))]


@pytest.fixture
def plans(tmp_path) -> list[TensorPlan]:
    """Mapped safetensors sources (so prefetch runs) of each float dtype, stored as plain and block types."""
    g = torch.Generator().manual_seed(0)
    src = {"bf16": torch.randn(96, 64, generator=g).bfloat16(), "f32": torch.randn(40, 256, generator=g),
           "f16": torch.randn(64, 96, generator=g).half(), "norm": torch.randn(64, generator=g).bfloat16()}
    path = tmp_path / "src.safetensors"
    write_safetensors(path, [(k, LazyTensor.of(v)) for k, v in src.items()])
    lazy = SafetensorsFile(path).tensors()
    types = [("bf16", "F16"), ("bf16", "BF16"), ("bf16", "Q8_0"), ("f32", "F32"), ("f32", "BF16"),
             ("f32", "Q4_K"), ("f16", "F16"), ("f16", "F32"), ("norm", "F32")]
    return [TensorPlan(f"{k}.{q}", lazy[k], q, (lambda w: w + 1) if k == "norm" else None) for k, q in types]


def _write(path, plans) -> str:
    h = hashlib.sha256()
    write_gguf(path, META, plans, source_hash=h, threads=2)
    return h.hexdigest()


def test_pipeline_knobs_change_neither_bytes_nor_hash(plans, tmp_path, monkeypatch):
    want = _write(tmp_path / "default.gguf", plans)
    expected = hashlib.sha256()
    for p in plans:
        t = p.source.load()
        expected.update(f"{p.name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}\n".encode())
        expected.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    assert want == expected.hexdigest()
    for name, value in (("CHUNK_ELEMENTS", 1000), ("WRITE_DEPTH", 1), ("HASH_BACKLOG", 1), ("PREFETCH_AHEAD", 1)):
        monkeypatch.setattr(gguf_writer, name, value)
    monkeypatch.setattr(write_behind, "WINDOW", 4096)
    assert _write(tmp_path / "small.gguf", plans) == want
    assert (tmp_path / "small.gguf").read_bytes() == (tmp_path / "default.gguf").read_bytes()


def test_a_hashing_error_reaches_the_caller(plans, tmp_path, monkeypatch):
    real = gguf_writer._hash_tensor

    def failing(h, name, t):
        if name == "f32.F32":
            raise MemoryError("hash worker failed")
        real(h, name, t)

    monkeypatch.setattr(gguf_writer, "_hash_tensor", failing)
    with pytest.raises(MemoryError, match="hash worker failed"):
        _write(tmp_path / "x.gguf", plans)


def _failing_sync_file_range(monkeypatch, err: int) -> None:
    """``sync_file_range`` that fails with ``err``, on 4 KB windows."""

    def fail(fd, offset, nbytes, flags):
        ctypes.set_errno(err)
        return -1

    monkeypatch.setattr(write_behind, "_SYNC_FILE_RANGE", fail)
    monkeypatch.setattr(write_behind, "WINDOW", 4096)


def test_write_behind_raises_what_the_kernel_reports(tmp_path, monkeypatch):
    _failing_sync_file_range(monkeypatch, errno.EIO)
    with open(tmp_path / "f", "wb") as f:
        wb = write_behind.WriteBehind(f.fileno())
        wb.advance(100)  # less than a window: nothing asked yet
        with pytest.raises(OSError) as e:
            wb.advance(5000)
    assert e.value.errno == errno.EIO


def test_write_behind_gives_up_quietly_where_unsupported(tmp_path, monkeypatch):
    _failing_sync_file_range(monkeypatch, errno.ESPIPE)
    with open(tmp_path / "f", "wb") as f:
        wb = write_behind.WriteBehind(f.fileno())
        wb.advance(10_000)
        assert not wb.enabled


@pytest.mark.parametrize("qtype", ["F16", "BF16", "F32", "Q8_0", "Q4_K"])
@pytest.mark.parametrize("path", ["copy", "encode"])
def test_weight_check_runs_on_every_chunk(tmp_path, monkeypatch, qtype, path):
    """The weight check scans chunk by chunk, whatever path a tensor takes (bytes as they are, a cast on
    the calling thread, block encoding on the workers): a NaN in the last chunk is still the check's
    error naming the tensor and counting all its NaNs; allowed, it is one warning per tensor however many
    chunks hold a NaN."""
    from gemma2_convert.core.errors import NonFiniteError
    from gemma2_convert.formats.weight_check import WeightCheck

    monkeypatch.setattr(gguf_writer, "CHUNK_ELEMENTS", 256 * 4)  # 4 rows a chunk: 16 chunks
    dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}.get(qtype, torch.bfloat16)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    w[63, 255] = float("nan")
    w[10, 3] = float("nan")
    transform = (lambda x: x * 2) if path == "encode" else None
    plan = TensorPlan("blk.0.attn_q.weight", LazyTensor.of(w), qtype, transform)
    with pytest.raises(NonFiniteError, match=r"tensor 'blk\.0\.attn_q\.weight': 2 NaN and 0 ±Inf value\(s\), "
                                             r"the first at index \[10, 3\]"):
        write_gguf(tmp_path / "x.gguf", META, [plan], threads=2)
    warnings: list[str] = []
    check = WeightCheck(allow_nonfinite=True, warn=warnings.append)
    if qtype in ("Q8_0", "Q4_K"):  # quantizing a NaN stays an error after the warning
        with pytest.raises(Exception, match="non-finite"):
            write_gguf(tmp_path / "y.gguf", META, [plan], threads=2, check=check)
    else:
        write_gguf(tmp_path / "y.gguf", META, [plan], threads=2, check=check)
    assert len(warnings) == 1 and "2 NaN" in warnings[0], warnings
