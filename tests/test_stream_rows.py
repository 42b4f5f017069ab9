"""Large dense tensors written by blocks of rows (``safetensors.tensor_parts``): a quantized 256k-row
embedding that has no exact MLX form (Q6_K) is written as float32 without being decoded whole — the same
bytes as the whole-tensor write, its weight check run block by block (``dense.checked_to``) with the
whole-tensor message."""

from __future__ import annotations

import pytest
import torch

import gemma2_convert.formats.safetensors as st
from gemma2_convert.core.errors import NonFiniteError
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats.dense import cast
from gemma2_convert.formats.hf import write_hf_dir
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.formats.synthetic import random_tensors
from gemma2_convert.formats.tokenizer.tiny import make_tiny_spm
from gemma2_convert.formats.weight_check import WeightCheck
from gemma2_convert.pipeline.convert import convert
from reference.config import Gemma2Config

# tests/test_transcode_kquants.py's shape: rows of 256 and 512 columns, every Q4_K_M matrix a K-quant
CFG = Gemma2Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
                   sliding_window=16, max_position_embeddings=256, torch_dtype="float32")


def by_rows_only(t: torch.Tensor, calls: list[tuple[int, int]]) -> LazyTensor:
    """``t`` as a lazy tensor that can only be read by rows (``load`` fails), recording each rows call."""
    def whole() -> torch.Tensor:
        raise AssertionError("the whole tensor was loaded")

    def rows(a: int, b: int) -> torch.Tensor:
        calls.append((a, b))
        return t[a:b].clone()

    return LazyTensor(tuple(t.shape), t.dtype, whole, rows=rows)


def streamed(monkeypatch, block_bytes: int) -> None:
    monkeypatch.setattr(st, "STREAM_BYTES", 0)
    monkeypatch.setattr(st, "ROW_BLOCK_BYTES", block_bytes)


def test_row_blocks_write_the_same_bytes_as_the_whole_tensor(tmp_path, monkeypatch):
    """Blocks of 3 rows over 100 (a short last block), between two whole tensors: the file is byte-equal to
    the one written from whole tensors, and the big tensor is never loaded whole."""
    g = torch.Generator().manual_seed(0)
    big, small = torch.randn(100, 37, generator=g), torch.randn(5, 7, generator=g).bfloat16()
    tail = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    whole = tmp_path / "whole.safetensors"
    st.write_safetensors(whole, [("a", LazyTensor.of(small)), ("big", LazyTensor.of(big)),
                                 ("z", LazyTensor.of(tail))], {"format": "pt"})
    streamed(monkeypatch, 3 * 37 * 4 + 5)
    calls: list[tuple[int, int]] = []
    done: list[tuple[str, int]] = []
    rows = tmp_path / "rows.safetensors"
    st.write_safetensors(rows, [("a", LazyTensor.of(small)), ("big", by_rows_only(big, calls)),
                                ("z", LazyTensor.of(tail))], {"format": "pt"},
                         on_tensor=lambda n, b: done.append((n, b)))
    assert rows.read_bytes() == whole.read_bytes()
    assert calls == [(a, min(a + 3, 100)) for a in range(0, 100, 3)]
    assert done == [("a", small.nbytes), ("big", big.nbytes), ("z", tail.nbytes)]  # progress once per tensor
    assert torch.equal(st.SafetensorsFile(rows).load("big"), big)


def test_a_wrong_block_from_rows_is_an_error(monkeypatch, tmp_path):
    streamed(monkeypatch, 64)
    bad = LazyTensor((4, 4), torch.float32, lambda: torch.zeros(4, 4),
                     rows=lambda a, b: torch.zeros(b - a, 3))
    wrong = r"rows 0:4 produced torch.float32\[4, 3\], promised torch.float32\[4, 4\]"
    with pytest.raises(AssertionError, match=wrong):
        st.write_safetensors(tmp_path / "x.safetensors", [("w", bad)])


def nan_at(rows: int, cols: int, where: list[tuple[int, int]]) -> torch.Tensor:
    t = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))
    for i, j in where:
        t[i, j] = float("nan")
    return t


def test_block_checks_report_as_the_whole_tensor_check_does(tmp_path, monkeypatch):
    """A NaN in the 7th block fails the write with the whole tensor's count and index (what ``load`` says)."""
    t = nan_at(40, 8, [(20, 3), (33, 1)])
    expected = r"tensor 'w': 2 NaN and 0 ±Inf value\(s\), the first at index \[20, 3\]"
    with pytest.raises(NonFiniteError, match=expected):
        cast({"w": LazyTensor.of(t)}, torch.bfloat16)[0][1].load()
    streamed(monkeypatch, 3 * 8 * 4)
    lt = LazyTensor(tuple(t.shape), t.dtype, lambda: t, rows=lambda a, b: t[a:b])
    (_, out), = cast({"w": lt}, torch.bfloat16)
    assert out.rows is not None and out.dtype == torch.bfloat16
    assert torch.equal(out.rows(0, 18), t[:18].bfloat16())  # blocks before the NaN pass
    with pytest.raises(NonFiniteError, match=expected):
        st.write_safetensors(tmp_path / "x.safetensors", [("w", out)])


def test_allowed_nonfinite_blocks_warn_once_and_write_as_the_whole_tensor(tmp_path, monkeypatch):
    t = nan_at(40, 8, [(2, 0), (20, 3), (33, 1)])
    lt = LazyTensor(tuple(t.shape), t.dtype, lambda: t, rows=lambda a, b: t[a:b])
    warnings: list[str] = []
    check = WeightCheck(allow_nonfinite=True, warn=warnings.append)
    st.write_safetensors(tmp_path / "whole.safetensors", cast({"w": LazyTensor.of(t)}, None, check))
    streamed(monkeypatch, 3 * 8 * 4)
    st.write_safetensors(tmp_path / "rows.safetensors", cast({"w": lt}, None, check))
    assert len(warnings) == 2 and warnings[0] == warnings[1] and "3 NaN" in warnings[0], warnings
    assert (tmp_path / "rows.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


def test_float16_overflow_in_one_block_is_caught(tmp_path, monkeypatch):
    t = torch.randn(30, 8, generator=torch.Generator().manual_seed(2))
    t[25, 4] = 70000.0
    lt = LazyTensor(tuple(t.shape), t.dtype, lambda: t, rows=lambda a, b: t[a:b])
    streamed(monkeypatch, 4 * 8 * 4)
    overflow = r"tensor 'w': values beyond the float16 range \(max \|w\| 7e\+04"
    with pytest.raises(NonFiniteError, match=overflow):
        st.write_safetensors(tmp_path / "x.safetensors", cast({"w": lt}, torch.float16))


def test_q4_k_m_to_mlx_streams_the_q6_k_embedding_into_the_same_file(tmp_path, monkeypatch):
    """``convert X.gguf --to mlx`` of a Q4_K_M (Q6_K embedding, no MLX form: written as float32) with blocks
    of 7 rows: model.safetensors is byte-equal to the whole-tensor write (which
    tests/test_transcode_kquants.py verifies against the GGUF, tensor by tensor and by logits), the embedding
    read by rows."""
    src, q4km = tmp_path / "src", tmp_path / "q4_k_m.gguf"
    src.mkdir()
    write_hf_dir(src, CFG, list(random_tensors(CFG, 11, torch.float32).items()),
                 tokenizer=make_tiny_spm(tmp_path / "tokenizer.model", CFG.vocab_size))
    convert(src, q4km, ConvertOptions(to="gguf", gguf_type="q4_k_m", verify=False))
    convert(q4km, tmp_path / "whole", ConvertOptions(to="mlx", verify=False))
    streamed(monkeypatch, 7 * CFG.hidden_size * 4)
    blocks: dict[int, list[int]] = {}
    real = LazyTensor.row_blocks

    def spy(self: LazyTensor, block_bytes: int):
        for t in real(self, block_bytes):
            blocks.setdefault(id(self), []).append(t.shape[0])
            yield t

    monkeypatch.setattr(LazyTensor, "row_blocks", spy)
    convert(q4km, tmp_path / "rows", ConvertOptions(to="mlx", verify=False))
    a, b = (tmp_path / d / "model.safetensors" for d in ("whole", "rows"))
    assert b.read_bytes() == a.read_bytes()
    emb = st.SafetensorsFile(b).header["model.embed_tokens.weight"]
    assert emb["dtype"] == "F32" and [7] * 73 + [1] in blocks.values()  # the embedding's 512 rows: 73 × 7 + 1
