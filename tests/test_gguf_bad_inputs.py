"""Broken or foreign GGUF files: one clear error each (by message), and a one-line CLI error, no traceback."""

from __future__ import annotations

import struct

import pytest
from click.testing import CliRunner

from gemma2_convert.cli import cli
from gemma2_convert.errors import ConfigError, FormatError, TensorMismatchError, UnsupportedError
from gemma2_convert.formats import open_checkpoint
from gemma2_convert.formats.gguf_reader import GGUFFile
from gemma2_convert.formats.gguf_values import string
from gemma2_convert.formats.gguf_writer import TensorPlan, write_gguf
from gemma2_convert.gguf_convert import to_gguf
from gemma2_convert.lazy import LazyTensor
from reference.config import Gemma2Config
from tests.gguf_helpers import CONFIGS, write_model

SMALL = Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                     sliding_window=8, max_position_embeddings=64, torch_dtype="float32")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    out = root / "good.gguf"
    to_gguf(write_model(root / "hf", SMALL), out, type_name="f32", verify_output=False, quiet=True)
    return out


def _variant(good, tmp_path, edit) -> str:
    """A copy of ``good`` with its bytes changed by ``edit(bytearray)``."""
    data = bytearray(good.read_bytes())
    edit(data)
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(data))
    return str(path)


def _rewrite(good, tmp_path, change_meta=None, drop_tensor=None) -> str:
    """``good`` rewritten with edited metadata (a dict key → Value or None to delete) or a tensor left out."""
    f = GGUFFile(good)
    from gemma2_convert.gguf_convert import _copy_value

    meta = [(k, _copy_value(f, k)) for k in f.kv]
    for key, value in (change_meta or {}).items():
        meta = [(k, v) for k, v in meta if k != key] + ([(key, value)] if value is not None else [])
    plans = []
    for name, info in f.tensors.items():
        if name != drop_tensor:
            raw = f.raw(name)
            plans.append(TensorPlan(name, LazyTensor.of(_as_f32(raw, info.shape)), "F32"))
    path = tmp_path / "rewritten.gguf"
    write_gguf(path, meta, plans)
    return str(path)


def _as_f32(raw, shape):
    import torch

    return torch.from_numpy(raw.copy()).view(torch.float32).reshape(shape)


def _offset_field(data: bytes, name: str) -> int:
    """Byte position of tensor ``name``'s u64 data offset in the header."""
    key = struct.pack("<Q", len(name)) + name.encode()
    pos = data.index(key) + len(key)
    n_dims = struct.unpack_from("<I", data, pos)[0]
    return pos + 4 + 8 * n_dims + 4


def test_truncated_file(good, tmp_path):
    size = good.stat().st_size
    for cut in (size - 100, size // 2, 2000, 20):  # in the data, the tensor infos, the metadata, the header
        path = _variant(good, tmp_path, lambda d, c=cut: d.__delitem__(slice(c, None)))
        with pytest.raises(FormatError, match="truncated|runs past the end|too short"):
            open_checkpoint(path)


def test_another_architecture(good, tmp_path):
    path = _rewrite(good, tmp_path, {"general.architecture": string("llama")})
    with pytest.raises(UnsupportedError, match="architecture is 'llama'; only 'gemma2'"):
        open_checkpoint(path)


def test_data_offset_past_the_end(good, tmp_path):
    def edit(d):
        struct.pack_into("<Q", d, _offset_field(bytes(d), "blk.1.ffn_down.weight"), 1 << 40)

    with pytest.raises(FormatError, match="'blk.1.ffn_down.weight': data .* runs past the end of the"):
        open_checkpoint(_variant(good, tmp_path, edit))


def test_vocabulary_shorter_than_the_embedding(good, tmp_path):
    from gemma2_convert.formats.gguf_values import ValueType, array

    f = GGUFFile(good)
    short = {k: array(ValueType(f.kv_types[k][1]), f.kv[k][:500])
             for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")}
    with pytest.raises(FormatError, match="vocabulary has 500 tokens but token_embd.weight has 512 rows"):
        open_checkpoint(_rewrite(good, tmp_path, short))


def test_other_header_lies(good, tmp_path):
    cases = [
        (lambda d: d.__setitem__(slice(0, 4), b"GGUX"), "not a GGUF file"),
        (lambda d: struct.pack_into("<I", d, 4, 9), "GGUF version 9 is not supported"),
        (lambda d: struct.pack_into("<Q", d, 16, 1 << 50), "more than a"),
        (lambda d: struct.pack_into("<Q", d, 24, 1 << 40), "implausible|truncated"),  # first key's length
        (lambda d: struct.pack_into("<Q", d, _offset_field(bytes(d), "blk.0.attn_q.weight"), 8), "not aligned"),
        (lambda d: struct.pack_into("<Q", d, _offset_field(bytes(d), "blk.0.attn_q.weight"), 0), "overlap"),
    ]
    for edit, message in cases:
        with pytest.raises(FormatError, match=message):
            GGUFFile(_variant(good, tmp_path, edit))


def test_missing_tensor_and_metadata(good, tmp_path):
    with pytest.raises(TensorMismatchError, match="missing 1 tensors: model.layers.1.mlp.up_proj.weight"):
        from reference import Gemma2ForCausalLM

        Gemma2ForCausalLM.from_pretrained(_rewrite(good, tmp_path, drop_tensor="blk.1.ffn_up.weight"))
    with pytest.raises(ConfigError, match="lacks 'gemma2.block_count'"):
        open_checkpoint(_rewrite(good, tmp_path, {"gemma2.block_count": None}))


def test_writer_refuses_a_foreign_tokenizer(tmp_path):
    """A tokenizer with more pieces than the embedding has rows is not this model's."""
    cfg = CONFIGS["mha"]
    src = write_model(tmp_path / "hf", cfg)
    from gemma2_convert.tiny_tokenizer import make_tiny_spm

    big = make_tiny_spm(tmp_path / "big.model", 600)
    with pytest.raises(ConfigError, match="600 pieces but the model's vocab_size is 512"):
        to_gguf(src, tmp_path / "x.gguf", type_name="f32", tokenizer=big, quiet=True)
    assert not (tmp_path / "x.gguf").exists()
    (src / "tokenizer.model").unlink()
    with pytest.raises(ConfigError, match="no tokenizer.model found"):
        to_gguf(src, tmp_path / "x.gguf", type_name="f32", quiet=True)


def test_float16_overflow_is_refused(tmp_path):
    import torch

    from gemma2_convert.errors import ConversionError

    w = torch.randn(4, 64)
    w[1, 3] = 1e6
    with pytest.raises(ConversionError, match="'blk.0.attn_q.weight': values beyond the float16 range .* use --type bf16"):
        write_gguf(tmp_path / "x.gguf", [], [TensorPlan("blk.0.attn_q.weight", LazyTensor.of(w), "F16")])


def test_cli_prints_one_line(good, tmp_path):
    path = _variant(good, tmp_path, lambda d: d.__delitem__(slice(good.stat().st_size // 2, None)))
    res = CliRunner().invoke(cli, ["gguf-to-hf", path, str(tmp_path / "out")])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "runs past the end" in lines[0], res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()
    res = CliRunner().invoke(cli, ["to-gguf", str(good), str(tmp_path / "o.gguf"), "--type", "q3_k"])
    assert res.exit_code == 2 and "Invalid value for '--type'" in res.output
