"""A GGUF without an embedded tokenizer.model (llama.cpp's own files) still yields Gemma's tokenizer.

The ``tokenizer.ggml.*`` keys our writer produces equal llama.cpp's ``convert_hf_to_gguf.py`` output for
the same HF directory (``tokenizer/gguf_vocab.py``); from them ``from_gguf.spm_from_gguf`` rebuilds the
SentencePiece model. Checked piece by piece against the trained original, id for id by sentencepiece on
varied text, and end to end: ``gguf-to-hf`` of a GGUF stripped of every ``gemma2_convert.*`` key gives an
HF directory whose ``AutoTokenizer`` returns the original ids.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2 as pb

from gemma2_convert.core.errors import FormatError
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.core.progress import Warnings
from gemma2_convert.formats import open_checkpoint
from gemma2_convert.formats.gguf.file import GGUFFile
from gemma2_convert.formats.gguf.metadata import PREFIX, vocab_metadata
from gemma2_convert.formats.gguf.output import copy_value
from gemma2_convert.formats.gguf.writer import TensorPlan, write_gguf
from gemma2_convert.formats.tokenizer.from_gguf import spm_from_gguf
from gemma2_convert.formats.tokenizer.spm import PieceType, gguf_vocab, read_spm
from gemma2_convert.formats.tokenizer.tiny import CORPUS, make_tiny_spm
from gemma2_convert.pipeline.gguf import gguf_to_hf, to_gguf
from tests.gguf_helpers import CONFIGS, write_model

TEXTS = {
    "prose": "The river was low that autumn, and the ferryman counted the boats.",
    "whitespace_runs": "a  b   c" + " " * 16 + "d" + " " * 40 + "e\t\tf\t\t\tg\n\nh\n\n\n\n"
                       "i \t \n  \t\t\n   x",
    "edges": "  indented and trailing   ",
    "digits": "Pi is 3.14159, e is 2.71828; 1234567890 and 2024-06-27 at 07:45.",
    "code": 'def f(x):\n    if x > 0:\n        return x * 2\n    return {"k": [1, 2]}\n',
    "multilingual": "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다. Москва — столица. "
                    "مرحبا بالعالم. Καλημέρα! नमस्ते दुनिया।",
    "byte_fallback": "emoji 😀👍🏽 and a flag 🇫🇷 then é, ß, \u00a0nbsp, \u3000ideographic space",
    "turns": "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"
             "x<start_of_turn>y<end_of_turn>z<mask>w",
    "corpus": CORPUS,
}


def _first_diff(want: list[int], got: list[int]) -> str:
    i = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    return (f"first difference at position {i}: {want[i:i + 5]} vs {got[i:i + 5]} "
            f"(lengths {len(want)}, {len(got)})")


def _vocab_kv(spm_path: Path, vocab_size: int, tmp_path: Path) -> dict:
    """The tokenizer.* keys our writer makes for ``spm_path``, written to a GGUF and read back."""
    path = tmp_path / f"vocab-{vocab_size}.gguf"
    write_gguf(path, vocab_metadata(gguf_vocab(spm_path, vocab_size).metadata()), [])
    return GGUFFile(path).kv


@pytest.fixture(scope="module", params=[512, 1024])
def spm_path(request, tmp_path_factory) -> Path:
    return make_tiny_spm(tmp_path_factory.mktemp("spm") / "tokenizer.model", request.param)


@pytest.fixture(scope="module")
def rebuilt(spm_path, tmp_path_factory) -> bytes:
    n = len(read_spm(spm_path).pieces)
    blob = spm_from_gguf(_vocab_kv(spm_path, n, tmp_path_factory.mktemp("kv")), "vocab.gguf")
    assert blob is not None
    return blob


def test_pieces_scores_and_types_are_the_originals(spm_path, rebuilt):
    original, got = pb.ModelProto(), pb.ModelProto()
    original.ParseFromString(spm_path.read_bytes())
    got.ParseFromString(rebuilt)
    assert len(got.pieces) == len(original.pieces)
    for i, (a, b) in enumerate(zip(original.pieces, got.pieces)):
        # byte-equal messages: same text, same f32 score bits (the first BPE piece scores -0.0), same type
        assert a.SerializeToString() == b.SerializeToString(), (i, a, b)
    types = {p.type for p in read_spm(spm_path).pieces}
    assert types == {PieceType.NORMAL, PieceType.UNKNOWN, PieceType.CONTROL, PieceType.USER_DEFINED,
                     PieceType.BYTE}


def test_model_spec_fields_match_where_known(spm_path, rebuilt):
    original, got = pb.ModelProto(), pb.ModelProto()
    original.ParseFromString(spm_path.read_bytes())
    got.ParseFromString(rebuilt)
    assert got.normalizer_spec.SerializeToString() == original.normalizer_spec.SerializeToString()
    assert not got.HasField("denormalizer_spec") and not original.HasField("denormalizer_spec")
    fields = ("model_type", "vocab_size", "byte_fallback", "unk_id", "bos_id", "eos_id", "pad_id", "unk_piece",
              "bos_piece", "eos_piece", "pad_piece", "unk_surface", "user_defined_symbols", "control_symbols",
              "split_digits", "allow_whitespace_only_pieces", "max_sentencepiece_length",
              "treat_whitespace_as_suffix")
    for name in fields:
        assert getattr(got.trainer_spec, name) == getattr(original.trainer_spec, name), name


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_rebuilt_model_encodes_like_the_original(name, spm_path, rebuilt):
    a = spm.SentencePieceProcessor(model_file=str(spm_path))
    b = spm.SentencePieceProcessor(model_proto=rebuilt)
    text = TEXTS[name]
    want, got = a.encode(text), b.encode(text)
    assert got == want, _first_diff(want, got)
    assert b.decode(got) == a.decode(want)
    roles = ("bos_id", "eos_id", "unk_id", "pad_id")
    assert [getattr(b, r)() for r in roles] == [getattr(a, r)() for r in roles]


def test_padding_rows_are_dropped(spm_path, rebuilt, tmp_path):
    """A vocabulary padded to the embedding's rows with [PAD{id}] rebuilds the same model."""
    n = len(read_spm(spm_path).pieces)
    kv = _vocab_kv(spm_path, n + 37, tmp_path)
    assert kv["tokenizer.ggml.tokens"][-1] == f"[PAD{n + 36}]"
    assert spm_from_gguf(kv, "padded.gguf") == rebuilt


def test_no_sentencepiece_vocabulary_gives_none(spm_path, tmp_path):
    kv = _vocab_kv(spm_path, len(read_spm(spm_path).pieces), tmp_path)
    assert spm_from_gguf({**kv, "tokenizer.ggml.model": "gpt2"}, "bpe.gguf") is None
    assert spm_from_gguf({k: v for k, v in kv.items() if k != "tokenizer.ggml.tokens"}, "none.gguf") is None


def test_inconsistent_keys_are_refused_by_name(tmp_path):
    spm_path = make_tiny_spm(tmp_path / "tokenizer.model", 512)
    kv = _vocab_kv(spm_path, 512, tmp_path)
    with pytest.raises(FormatError, match="tokens, scores and token_type are not three arrays of one length"):
        spm_from_gguf({**kv, "tokenizer.ggml.scores": kv["tokenizer.ggml.scores"][:-1]}, "short.gguf")
    with pytest.raises(FormatError, match="unknown_token_id = 600 points outside the 512 SentencePiece tokens"):
        spm_from_gguf({**kv, "tokenizer.ggml.unknown_token_id": 600}, "unk.gguf")
    with pytest.raises(FormatError, match="token_type holds 9, outside 1..6"):
        spm_from_gguf({**kv, "tokenizer.ggml.token_type": [9] * 512}, "types.gguf")


def test_absent_space_prefix_key_takes_llama_cpp_default(spm_path, tmp_path):
    """Without ``tokenizer.ggml.add_space_prefix`` llama.cpp prepends a space (its SPM default); so does the
    rebuilt model."""
    kv = _vocab_kv(spm_path, len(read_spm(spm_path).pieces), tmp_path)
    del kv["tokenizer.ggml.add_space_prefix"]
    got = pb.ModelProto()
    got.ParseFromString(spm_from_gguf(kv, "no-prefix-key.gguf"))
    assert got.normalizer_spec.add_dummy_prefix
    sp = spm.SentencePieceProcessor(model_proto=got.SerializeToString())
    assert sp.encode("the", out_type=str)[0].startswith("▁")


# ----------------------------------------------------------------------------- gguf-to-hf, end to end


def _strip(src: Path, out: Path, drop) -> Path:
    """``src`` (an F32 GGUF) rewritten without the metadata keys ``drop(key)`` selects."""
    f = GGUFFile(src)
    meta = [(k, copy_value(f, k)) for k in f.kv if not drop(k)]
    plans = [TensorPlan(n, LazyTensor.of(torch.from_numpy(f.raw(n).copy()).view(torch.float32).reshape(i.shape)),
                        "F32") for n, i in f.tensors.items()]
    write_gguf(out, meta, plans)
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny HF directory, and its F32 GGUF as llama.cpp's converter would write it (no ``gemma2_convert.*``
    keys, so no embedded tokenizer.model)."""
    root = tmp_path_factory.mktemp("e2e")
    hf = write_model(root / "hf", CONFIGS["mha"], seed=4)
    ours = root / "ours.gguf"
    to_gguf(hf, ours, type_name="f32", verify=False)
    return hf, _strip(ours, root / "llama-style.gguf", lambda k: k.startswith(PREFIX))


def test_gguf_to_hf_rebuilds_the_tokenizer_for_transformers(model, tmp_path):
    from transformers import AutoTokenizer

    hf, gguf = model
    assert open_checkpoint(gguf).tokenizer_blob is not None
    warnings = Warnings()
    gguf_to_hf(gguf, tmp_path / "back", progress=warnings)
    assert not [m for m in warnings.messages if "tokenizer" in m], warnings.messages
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "back" / name).is_file(), name
    sp = spm.SentencePieceProcessor(model_file=str(hf / "tokenizer.model"))
    auto = AutoTokenizer.from_pretrained(tmp_path / "back")
    for name, text in sorted(TEXTS.items()):
        want, got = [sp.bos_id(), *sp.encode(text)], auto(text)["input_ids"]
        assert got == want, f"{name}: {_first_diff(want, got)}"
    assert auto.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [5, 6]


def test_warning_only_without_any_tokenizer(model, tmp_path):
    _, gguf = model
    bare = _strip(gguf, tmp_path / "bare.gguf", lambda k: k.startswith("tokenizer."))
    warnings = Warnings()
    gguf_to_hf(bare, tmp_path / "back", progress=warnings)
    neither = "embeds neither a tokenizer.model nor a SentencePiece vocabulary"
    assert any(neither in m for m in warnings.messages), warnings.messages
    assert not (tmp_path / "back" / "tokenizer.model").exists()
