"""quantize_tensor: the compiled kernels (quant/jit.py) and the torch ports give the same bytes, on any
number of worker threads and chunk boundaries; ``compiled=False`` selects the torch ports."""

from __future__ import annotations

import pytest
import torch

from gemma2_convert.core.errors import ConversionError
from quant import gguf_types
from quant.gguf_codec import quantize_tensor
from quant.gguf_types import GGML_TYPES

BLOCK_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


def _matrix(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[::7] *= 40  # rows of another magnitude
    w[3, :64] = 0  # all-zero blocks
    return w.to(torch.bfloat16)  # the writer's usual source dtype; quantize_tensor casts per chunk


def test_compiled_false_selects_the_torch_port():
    codec = GGML_TYPES["Q4_K"].codec
    assert codec.kernel(compiled=False)[0] is codec.quantize
    assert codec.kernel(compiled=True)[0] is not codec.quantize
    f16 = GGML_TYPES["F16"].codec
    assert f16.kernel(compiled=True)[0] is f16.quantize  # float casts have no compiled kernel


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_compiled_equals_torch_on_any_thread_count(qtype, monkeypatch):
    w = _matrix(96, 2048, seed=len(qtype))
    qw = torch.rand(2048) * 10 if GGML_TYPES[qtype].codec.imatrix == "used" else None
    monkeypatch.setattr(gguf_types, "JIT_CHUNK_ELEMENTS", 5 * 2048)  # many chunks, a short last one
    ref = quantize_tensor(w, qtype, compiled=False)
    ref_w = quantize_tensor(w, qtype, quant_weights=qw, compiled=False) if qw is not None else None
    for threads in (1, 3):
        assert torch.equal(quantize_tensor(w, qtype, threads=threads, compiled=True), ref), (qtype, threads)
        if qw is not None:
            got = quantize_tensor(w, qtype, quant_weights=qw, threads=threads, compiled=True)
            assert torch.equal(got, ref_w), (qtype, threads)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_compiled_kernels_report_bad_input_like_the_torch_ports(qtype):
    w = torch.randn(8, 256)
    w[5, 17] = float("nan")
    for compiled in (False, True):
        with pytest.raises(ConversionError, match="non-finite"):
            quantize_tensor(w, qtype, threads=2, compiled=compiled)
    big = torch.randn(8, 256)
    big[2, 3] = 1e9  # its block's fp16 scale overflows
    for compiled in (False, True):
        with pytest.raises(ConversionError, match="overflow fp16"):
            quantize_tensor(big, qtype, threads=2, compiled=compiled)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q4_K", "Q6_K"])
def test_quantize_tensor_writes_into_out(qtype):
    """``out=``: the bytes land in the caller's buffer (written there by the kernels that can, copied
    otherwise), for bfloat16 and float32 input; a buffer of the wrong size is refused."""
    w = torch.randn(40, 512, generator=torch.Generator().manual_seed(5))
    for src in (w, w.to(torch.bfloat16)):
        want = quantize_tensor(src, qtype)
        buf = torch.zeros(want.numel(), dtype=torch.uint8)
        got = quantize_tensor(src, qtype, threads=2, out=buf)
        assert got.data_ptr() == buf.data_ptr() and torch.equal(got, want) and torch.equal(buf.view_as(want), want)
    with pytest.raises(ValueError, match="out must be"):
        quantize_tensor(w, qtype, out=torch.zeros(3, dtype=torch.uint8))
