"""GGUF files that are well-formed but wrong for the model (vocabulary, tensors, metadata, tokenizer, float16
range): one clear error each, by message. Damaged and lying files are in the corpus, tests/badinputs/,
for every reader and command."""

from __future__ import annotations

import pytest

from gemma2_convert.core.errors import ConfigError, FormatError, TensorMismatchError
from gemma2_convert.formats import open_checkpoint
from gemma2_convert.formats.gguf.reader import GGUFFile
from gemma2_convert.formats.gguf.writer import TensorPlan, write_gguf
from gemma2_convert.pipeline.gguf import to_gguf
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.pipeline.load import from_pretrained
from reference import Gemma2ForCausalLM
from reference.config import Gemma2Config
from tests.gguf_helpers import CONFIGS, write_model

SMALL = Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                     sliding_window=8, max_position_embeddings=64, torch_dtype="float32")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    out = root / "good.gguf"
    to_gguf(write_model(root / "hf", SMALL), out, type_name="f32", verify=False)
    return out


def _rewrite(good, tmp_path, change_meta=None, drop_tensor=None) -> str:
    """``good`` rewritten with edited metadata (a dict key → Value or None to delete) or a tensor left out."""
    f = GGUFFile(good)
    from gemma2_convert.formats.gguf.output import copy_value

    meta = [(k, copy_value(f, k)) for k in f.kv]
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


def test_vocabulary_shorter_than_the_embedding(good, tmp_path):
    from gemma2_convert.formats.gguf.values import ValueType, array

    f = GGUFFile(good)
    short = {k: array(ValueType(f.kv_types[k][1]), f.kv[k][:500])
             for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")}
    with pytest.raises(FormatError, match="vocabulary has 500 tokens but token_embd.weight has 512 rows"):
        open_checkpoint(_rewrite(good, tmp_path, short))


def test_missing_tensor_and_metadata(good, tmp_path):
    with pytest.raises(TensorMismatchError, match="missing 1 tensors: model.layers.1.mlp.up_proj.weight"):
        from_pretrained(_rewrite(good, tmp_path, drop_tensor="blk.1.ffn_up.weight"), Gemma2ForCausalLM)
    with pytest.raises(ConfigError, match="lacks 'gemma2.block_count'"):
        open_checkpoint(_rewrite(good, tmp_path, {"gemma2.block_count": None}))


def test_writer_refuses_a_foreign_tokenizer(tmp_path):
    """A tokenizer with more pieces than the embedding has rows is not this model's."""
    cfg = CONFIGS["mha"]
    src = write_model(tmp_path / "hf", cfg)
    from gemma2_convert.formats.tokenizer.tiny import make_tiny_spm

    big = make_tiny_spm(tmp_path / "big.model", 600)
    with pytest.raises(ConfigError, match="600 pieces but the model's vocab_size is 512"):
        to_gguf(src, tmp_path / "x.gguf", type_name="f32", tokenizer=big)
    assert not (tmp_path / "x.gguf").exists()
    (src / "tokenizer.model").unlink()
    with pytest.raises(ConfigError, match="no tokenizer.model found"):
        to_gguf(src, tmp_path / "x.gguf", type_name="f32")


def test_float16_overflow_is_refused(tmp_path):
    import torch

    from gemma2_convert.core.errors import ConversionError

    w = torch.randn(4, 64)
    w[1, 3] = 1e6
    with pytest.raises(ConversionError, match="'blk.0.attn_q.weight': values beyond the float16 range .* use --type bf16"):
        write_gguf(tmp_path / "x.gguf", [], [TensorPlan("blk.0.attn_q.weight", LazyTensor.of(w), "F16")])
