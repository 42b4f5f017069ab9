"""Tokenizer: tiny Gemma-layout SentencePiece model, HF files checked against sentencepiece, GGUF vocabulary."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer

from gemma2_convert.core.errors import ConfigError, ConversionError, FormatError, UnsupportedError
from gemma2_convert.formats.tokenizer.tiny import CORPUS, USER_DEFINED_PIECES, make_tiny_spm
from gemma2_convert.formats.tokenizer.spm import (
    GEMMA2_CHAT_TEMPLATE,
    Piece,
    PieceType,
    SpmModel,
    find_tokenizer,
    gguf_vocab,
    read_spm,
)
from gemma2_convert.formats.tokenizer.hf_files import hf_merges, hf_vocab, write_hf_tokenizer

FIRST_BYTE_ID = 4 + len(USER_DEFINED_PIECES)  # <pad> <eos> <bos> <unk>, user-defined, then <0x00>

TEXTS = {
    "prose": "The river was low that autumn, and the ferryman counted the boats.",
    "two_spaces": "a  b",
    "three_spaces": "a   b",
    "sixteen_spaces": "a" + " " * 16 + "b",
    "forty_spaces": "x" + " " * 40 + "y",
    "leading_trailing": "  indented and trailing   ",
    "only_spaces": "     ",
    "tabs": "\tone\t\ttwo\t\t\tthree\t\t\t\tfour",
    "newlines": "line one\nline two\n\nline four\n\n\n\n\nline nine\n",
    "mixed_whitespace": " \t \n  \t\t\n   x",
    "digits": "Pi is 3.14159, e is 2.71828; 1234567890 and 2024-06-27 at 07:45.",
    "code": 'def f(x):\n    if x > 0:\n        return x * 2\n    return {"k": [1, 2]}\n',
    "c_code": "int main(void) {\n\tfor (int i = 0; i < 10; i++) {\n\t\tputs(\"hi\");\n\t}\n}",
    "cjk": "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "cyrillic": "Москва — столица России. Привет, мир!",
    "arabic": "مرحبا بالعالم. القاهرة مدينة كبيرة.",
    "greek_hindi": "Καλημέρα σε όλους! नमस्ते दुनिया।",
    "emoji": "emoji 😀👍🏽 and a flag 🇫🇷 then é, ß, \u00a0nbsp, \u3000ideographic space",
    "literal_meta_space": "▁ already ▁▁ escaped",
    "turn_markers": "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n",
    "glued_markers": "x<start_of_turn>y<end_of_turn>z<mask>w",
    "empty": "",
    "corpus": CORPUS,
}


@pytest.fixture(scope="module", params=[512, 1024])
def spm_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_spm(tmp_path_factory.mktemp("spm") / "tokenizer.model", request.param)


@pytest.fixture(scope="module")
def sp(spm_path: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(spm_path))


@pytest.fixture(scope="module")
def hf_dir(spm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf")
    write_hf_tokenizer(spm_path, out)
    return out


@pytest.fixture(scope="module")
def fast(hf_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(hf_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def auto(hf_dir: Path):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(hf_dir))


def assert_same_ids(expected: list[int], got: list[int], sp: spm.SentencePieceProcessor, label: str) -> None:
    if expected == got:
        return
    at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    window = slice(max(0, at - 3), at + 5)
    raise AssertionError(
        f"{label}: ids diverge at index {at} (lengths {len(expected)} vs {len(got)}); "
        f"sentencepiece {[sp.id_to_piece(i) for i in expected[window]]} "
        f"vs {[sp.id_to_piece(i) for i in got[window]]}"
    )


# ----------------------------------------------------------------------------- tiny model


def test_tiny_spm_layout(spm_path: Path, sp: spm.SentencePieceProcessor) -> None:
    model = read_spm(spm_path)
    assert sp.vocab_size() == len(model.pieces) in (512, 1024)
    head = [(p.text, p.type) for p in model.pieces[:7]]
    assert head == [
        ("<pad>", PieceType.CONTROL), ("<eos>", PieceType.CONTROL), ("<bos>", PieceType.CONTROL),
        ("<unk>", PieceType.UNKNOWN), ("<mask>", PieceType.USER_DEFINED),
        ("<start_of_turn>", PieceType.USER_DEFINED), ("<end_of_turn>", PieceType.USER_DEFINED),
    ]
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [p.text for p in model.pieces[4:FIRST_BYTE_ID]] == list(USER_DEFINED_PIECES)
    assert "▁" * 16 in USER_DEFINED_PIECES and "▁▁" in USER_DEFINED_PIECES
    byte_pieces = model.pieces[FIRST_BYTE_ID : FIRST_BYTE_ID + 256]
    assert [p.text for p in byte_pieces] == [f"<0x{b:02X}>" for b in range(256)]
    assert {p.type for p in byte_pieces} == {PieceType.BYTE}
    assert {p.type for p in model.pieces[FIRST_BYTE_ID + 256 :]} == {PieceType.NORMAL}
    assert model.normalizer["add_dummy_prefix"] is False
    assert model.normalizer["remove_extra_whitespaces"] is False
    assert sp.encode("12345", out_type=str) == ["1", "2", "3", "4", "5"]  # split_digits


def test_tiny_spm_is_deterministic_and_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    a = make_tiny_spm(tmp_path / "a.model")
    elapsed = time.perf_counter() - start
    b = make_tiny_spm(tmp_path / "b.model")
    assert a.read_bytes() == b.read_bytes()
    assert elapsed < 3.0, f"make_tiny_spm took {elapsed:.2f} s"


def test_tiny_spm_rejects_vocab_size(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"vocab_size 64 is outside \[\d+, 1024\]"):
        make_tiny_spm(tmp_path / "x.model", 64)


# ----------------------------------------------------------------------------- HF tokenizer vs sentencepiece


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_hf_ids_equal_sentencepiece(name: str, sp, fast: Tokenizer, auto) -> None:
    text = TEXTS[name]
    expected = [sp.bos_id()] + sp.encode(text)
    assert_same_ids(expected, fast.encode(text).ids, sp, f"{name}: tokenizer.json")
    assert_same_ids(expected, auto(text)["input_ids"], sp, f"{name}: AutoTokenizer")


def test_whitespace_runs_take_longest_piece(sp, fast: Tokenizer) -> None:
    # 40 spaces: greedy longest user-defined run first, as tokenizer.model does (16 + 16 + 8).
    pieces = [fast.id_to_token(i) for i in fast.encode(" " * 40, add_special_tokens=False).ids]
    assert pieces == ["▁" * 16, "▁" * 16, "▁" * 8]
    assert sp.encode(" " * 40, out_type=str) == pieces


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_decode_round_trips(name: str, sp, fast: Tokenizer, auto) -> None:
    text = TEXTS[name].replace("▁", " ")  # a literal "▁" decodes as a space, in sentencepiece too
    ids = sp.encode(TEXTS[name])
    assert sp.decode(ids) == text
    assert fast.decode(ids, skip_special_tokens=False) == text
    assert auto.decode(ids, skip_special_tokens=False) == text
    assert auto.decode([sp.bos_id()] + ids, skip_special_tokens=True) == text.replace(
        "<start_of_turn>", "").replace("<end_of_turn>", "").replace("<mask>", "")


def test_turn_markers_are_single_special_ids(sp, auto) -> None:
    text = "<start_of_turn>user\nHi<end_of_turn>"
    ids = auto(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 5 and ids[-1] == 6
    assert ids == sp.encode(text)
    assert set(auto.all_special_tokens) >= {"<bos>", "<eos>", "<unk>", "<pad>", "<start_of_turn>", "<end_of_turn>"}
    assert auto.convert_ids_to_tokens([0, 1, 2, 3, 4, 5, 6]) == [
        "<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]


def test_control_pieces_in_text_follow_hf_convention(sp, fast: Tokenizer) -> None:
    # SentencePiece never produces CONTROL pieces from text; HF (and llama.cpp with parse_special)
    # match the special added tokens. Gemma's published tokenizer.json behaves the same way.
    text = "a<bos>b<eos>"
    assert fast.encode(text, add_special_tokens=False).ids == [sp.piece_to_id("a"), 2, sp.piece_to_id("b"), 1]
    assert 2 not in sp.encode(text) and 1 not in sp.encode(text)


def test_autotokenizer_is_built_from_our_tokenizer_json(hf_dir: Path, fast: Tokenizer, auto, sp,
                                                        tmp_path: Path) -> None:
    assert auto.is_fast and type(auto).__name__ == "GemmaTokenizer"
    ours, theirs = json.loads(fast.to_str()), json.loads(auto.backend_tokenizer.to_str())
    assert theirs["model"]["vocab"] == ours["model"]["vocab"]
    assert theirs["model"]["merges"] == ours["model"]["merges"]
    assert auto.get_vocab() == fast.get_vocab(with_added_tokens=True)
    assert len(auto) == sp.vocab_size()
    # Without tokenizer.model on disk, only tokenizer.json can be the source.
    json_only = tmp_path / "json_only"
    shutil.copytree(hf_dir, json_only)
    (json_only / "tokenizer.model").unlink()
    alone = type(auto).from_pretrained(str(json_only))
    assert alone(CORPUS)["input_ids"] == [sp.bos_id()] + sp.encode(CORPUS)


def test_chat_template_renders_gemma_turns(auto, sp) -> None:
    messages = [{"role": "user", "content": " Hello? "}, {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": "Bye"}]
    text = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<bos><start_of_turn>user\nHello?<end_of_turn>\n<start_of_turn>model\nHi.<end_of_turn>\n"
                    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    ids = auto.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids == [2] + sp.encode("<start_of_turn>user\nHello?<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(Exception, match="System role not supported"):
        auto.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)


def test_written_files(spm_path: Path, tmp_path: Path) -> None:
    paths = write_hf_tokenizer(spm_path, tmp_path / "out", chat_template=None, model_max_length=4096)
    assert [p.name for p in paths] == ["tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                                       "special_tokens_map.json"]
    assert paths[0].read_bytes() == spm_path.read_bytes()
    config = json.loads(paths[2].read_text(encoding="utf-8"))
    assert (config["tokenizer_class"], config["bos_token"], config["eos_token"], config["pad_token"],
            config["unk_token"]) == ("GemmaTokenizer", "<bos>", "<eos>", "<pad>", "<unk>")
    assert (config["add_bos_token"], config["add_eos_token"], config["clean_up_tokenization_spaces"],
            config["model_max_length"]) == (True, False, False, 4096)
    assert "chat_template" not in config
    decoder = config["added_tokens_decoder"]
    assert decoder["5"]["content"] == "<start_of_turn>"
    assert (decoder["5"]["special"], decoder["6"]["special"], decoder["4"]["special"]) == (True, True, False)
    assert decoder["2"] == {"content": "<bos>", "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True}
    assert len(decoder) == FIRST_BYTE_ID
    special_map = json.loads(paths[3].read_text(encoding="utf-8"))
    assert special_map["additional_special_tokens"] == ["<start_of_turn>", "<end_of_turn>"]
    assert special_map["bos_token"]["content"] == "<bos>"
    default = json.loads(write_hf_tokenizer(spm_path, tmp_path / "it")[2].read_text(encoding="utf-8"))
    assert default["chat_template"] == GEMMA2_CHAT_TEMPLATE


def test_tab_byte_piece_is_spelled_as_tab_when_merges_need_it(tmp_path: Path) -> None:
    # Gemma has NORMAL pieces made of tabs but no "\t" piece; HF BPE needs "\t" in the vocabulary.
    bytes_ = [Piece(f"<0x{b:02X}>", 0.0, PieceType.BYTE) for b in range(256)]
    pieces = (Piece("<unk>", 0.0, PieceType.UNKNOWN), *bytes_, Piece("a", -2.0, PieceType.NORMAL),
              Piece("\t\t", -1.0, PieceType.NORMAL), Piece("a\t\t", -3.0, PieceType.NORMAL))
    model = SpmModel(tmp_path / "m.model", pieces, 2, True, {"unk": 0, "bos": -1, "eos": -1, "pad": -1}, {})
    vocab = hf_vocab(model)
    assert vocab["\t"] == 1 + 0x09 and "<0x09>" not in vocab and vocab["<0x0A>"] == 1 + 0x0A
    assert hf_merges(model, vocab) == [("\t", "\t"), ("a", "\t\t")]


# ----------------------------------------------------------------------------- GGUF vocabulary


def test_gguf_vocab_types_and_ids(spm_path: Path, sp) -> None:
    n = sp.vocab_size()
    vocab = gguf_vocab(spm_path, n + 3)
    assert len(vocab.tokens) == len(vocab.scores) == len(vocab.token_types) == n + 3
    control, user, byte, normal, unused = 3, 4, 6, 1, 5
    assert vocab.token_types[:7] == [control] * 7  # pad eos bos unk mask start_of_turn end_of_turn
    assert vocab.tokens[:7] == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    assert vocab.scores[:7] == [-1000.0] * 7
    runs = range(7, FIRST_BYTE_ID)
    assert [vocab.token_types[i] for i in runs] == [user] * len(runs)
    assert [vocab.tokens[i] for i in runs] == [p.replace("▁", " ") for p in USER_DEFINED_PIECES[3:]]
    assert vocab.tokens[FIRST_BYTE_ID + 0x41] == "<0x41>" and vocab.token_types[FIRST_BYTE_ID + 0x41] == byte
    first_normal = FIRST_BYTE_ID + 256
    assert vocab.tokens[first_normal] == sp.id_to_piece(first_normal)
    assert vocab.token_types[first_normal:n] == [normal] * (n - first_normal)
    assert vocab.scores[first_normal:n] == [sp.get_score(i) for i in range(first_normal, n)]
    assert vocab.tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 3)]
    assert vocab.token_types[n:] == [unused] * 3 and vocab.scores[n:] == [-10000.0] * 3
    assert (vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.pad_id) == (2, 1, 3, 0)
    meta = vocab.metadata()
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.pre"] == "default"
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.unknown_token_id"], meta["tokenizer.ggml.padding_token_id"]) == (2, 1, 3, 0)
    assert (meta["tokenizer.ggml.add_bos_token"], meta["tokenizer.ggml.add_eos_token"],
            meta["tokenizer.ggml.add_space_prefix"]) == (True, False, False)
    assert meta["tokenizer.chat_template"] == GEMMA2_CHAT_TEMPLATE


def test_gguf_vocab_rejects_larger_tokenizer(spm_path: Path, sp) -> None:
    n = sp.vocab_size()
    with pytest.raises(ConfigError, match=rf"tokenizer.model: .*has {n} pieces .*vocab_size is {n - 1}"):
        gguf_vocab(spm_path, n - 1)


def _write_vocab_only_gguf(path: Path, vocab) -> None:
    """A GGUF holding only the vocabulary and the gemma2 hyper-parameters llama.cpp reads first."""
    import gguf
    writer = gguf.GGUFWriter(str(path), "gemma2")
    writer.add_context_length(64)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(1)
    writer.add_key_length(16)
    writer.add_value_length(16)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.token_types)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_unk_token_id(vocab.unk_id)
    writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_vocab_tokenizes_like_sentencepiece_in_llama_cpp(spm_path: Path, sp, tmp_path: Path) -> None:
    import llama_cpp
    path = tmp_path / "vocab.gguf"
    _write_vocab_only_gguf(path, gguf_vocab(spm_path, sp.vocab_size()))
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    # llama.cpp matches user-defined tokens on the raw text, so a literal "▁" typed in the input is
    # not joined with spaces into a whitespace-run token; every other case must agree.
    for name, text in sorted(TEXTS.items()):
        if name == "literal_meta_space":
            continue
        expected = [sp.bos_id()] + sp.encode(text)
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert_same_ids(expected, got, sp, f"{name}: llama.cpp")
        assert llm.detokenize(got[1:], special=True).decode("utf-8") == sp.decode(expected[1:]), name


# ----------------------------------------------------------------------------- errors + lookup


def test_not_a_sentencepiece_model(tmp_path: Path, hf_dir: Path) -> None:
    with pytest.raises(FormatError, match=r"tokenizer.json: not a SentencePiece model"):
        read_spm(hf_dir / "tokenizer.json")
    noise = tmp_path / "noise.model"
    noise.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(FormatError, match=r"noise.model: not a SentencePiece model"):
        write_hf_tokenizer(noise, tmp_path / "out")
    with pytest.raises(ConversionError, match=r"missing.model: no such file"):
        gguf_vocab(tmp_path / "missing.model", 10)


def test_rejects_non_gemma_sentencepiece(tmp_path: Path) -> None:
    lines = CORPUS.splitlines()
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "uni"),
                                       vocab_size=400, character_coverage=0.98, num_threads=1,
                                       logstream=quiet)
    with pytest.raises(UnsupportedError, match=r"uni.model: model_type is 1, expected 2 \(BPE\); byte_fallback is off"
                                               r"; normalizer adds a dummy prefix"):
        read_spm(tmp_path / "uni.model")


def test_find_tokenizer(tmp_path: Path) -> None:
    ckpt = tmp_path / "pt"
    ckpt.mkdir()
    (ckpt / "model.ckpt").write_bytes(b"")
    assert find_tokenizer(ckpt / "model.ckpt") is None
    (ckpt / "tokenizer.model").write_bytes(b"")
    assert find_tokenizer(ckpt / "model.ckpt") == ckpt / "tokenizer.model"
    assert find_tokenizer(ckpt) == ckpt / "tokenizer.model"
    flax = tmp_path / "kaggle" / "gemma2-2b"  # Kaggle Flax: tokenizer.model beside the checkpoint dir
    flax.mkdir(parents=True)
    assert find_tokenizer(flax) is None
    (tmp_path / "kaggle" / "tokenizer_gemma2.model").write_bytes(b"")
    assert find_tokenizer(flax) == tmp_path / "kaggle" / "tokenizer_gemma2.model"
