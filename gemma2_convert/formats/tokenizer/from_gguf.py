"""Rebuild Gemma's SentencePiece ``tokenizer.model`` from a GGUF's ``tokenizer.ggml.*`` keys.

A GGUF made by llama.cpp's ``convert_hf_to_gguf.py`` carries no ``tokenizer.model``, only its rewrite
(GEMMA2_FORMATS.md §5.1; LC ``conversion/base.py`` ``_create_vocab_sentencepiece``, which our
``gguf_vocab.build_gguf_vocab`` reproduces). :func:`spm_from_gguf` undoes that rewrite and serializes
a ``ModelProto`` (sentencepiece ``sentencepiece_model.proto``) with a small protobuf wire-format
writer, the inverse of the reader in ``spm.py``; neither ``protobuf`` nor ``sentencepiece`` is needed.

What the converter changed, and how it is undone:

* ids past the SentencePiece pieces were padded with ``[PAD{id}]`` (UNUSED, score -10000): trailing
  entries of exactly that form are dropped;
* every ``added_tokens_decoder`` entry got score -1000: CONTROL / USER_DEFINED / UNKNOWN tokens with
  that score get back 0.0, the score SentencePiece's trainer gives every meta piece;
* special-looking added tokens became CONTROL. Gemma's model has exactly three CONTROL pieces
  (``<pad>`` ``<eos>`` ``<bos>``, the pad/eos/bos ids), so every other CONTROL token is a
  USER_DEFINED piece (``<mask>``, ``<unusedN>``, ``<start_of_turn>``…), and the unknown id is UNKNOWN;
* the other added tokens became USER_DEFINED with ``▁`` written as a space: spaces go back to ``▁``
  (a SentencePiece piece never holds a raw space: the normalizer escapes whitespace before matching).

The model spec, where the GGUF carries it: pieces and NORMAL/BYTE scores verbatim (f32, ``-0.0``
included); the unk/bos/eos/pad ids, and their pieces; ``byte_fallback`` when there are BYTE pieces
(llama.cpp falls back to bytes whenever they exist); the USER_DEFINED pieces as
``user_defined_symbols``; ``add_dummy_prefix`` from ``tokenizer.ggml.add_space_prefix`` and
``remove_extra_whitespaces`` from ``tokenizer.ggml.remove_extra_whitespaces``, absent keys taking
llama.cpp's defaults for a SentencePiece vocabulary (true, false; ``src/llama-vocab.cpp``).
``model_type`` is BPE: llama.cpp's ``llama`` tokenizer merges by score, which is SentencePiece BPE.

Not in the GGUF, so Gemma's published values are used (the Gemma report: "split digits, preserved
whitespace, and byte-level encodings"; Gemma 2's ``tokenizer.model`` trainer spec has
``max_sentencepiece_length`` 16; ``tiny.trainer_options`` trains the same layout): the ``identity``
normalizer with an empty ``precompiled_charsmap``, whitespace escaped as ``▁`` (the default, not
written), ``split_digits``, ``allow_whitespace_only_pieces``, ``max_sentencepiece_length`` 16. The
other trainer fields (corpus, coverage, threads…) only steer training and keep their defaults, so
the bytes differ from the original file there; encoding and decoding do not read them.

Cannot be recovered: a USER_DEFINED piece that the HF directory did not list in
``added_tokens_decoder`` reaches the GGUF as NORMAL with score 0.0 and stays NORMAL (our HF
directories list every one); an added token whose HF ``content`` differs from the piece replaced the
piece's text.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gemma2_convert.core.errors import FormatError
from gemma2_convert.formats.tokenizer.gguf_vocab import ADDED_TOKEN_SCORE, PADDING_SCORE
from gemma2_convert.formats.tokenizer.spm import Piece, PieceType

__all__ = ["pieces_from_gguf", "serialize_model", "spm_from_gguf"]

_K = "tokenizer.ggml."
_SPACE = "▁"
_TYPES = {int(t): t for t in PieceType}  # a dict lookup: PieceType(i) is slow on 256000 tokens
_META = (PieceType.CONTROL, PieceType.USER_DEFINED, PieceType.UNKNOWN)
_FIX = "the vocabulary is corrupt. Make the GGUF again from the model's HF directory"
_ROLE_KEYS = {"unk": "unknown_token_id", "bos": "bos_token_id", "eos": "eos_token_id",
              "pad": "padding_token_id"}

# TrainerSpec / NormalizerSpec field numbers (sentencepiece_model.proto).
_BPE = 2
# max_sentencepiece_length 16, split_digits, allow_whitespace_only_pieces: Gemma's values
_GEMMA_TRAINER = ((20, 16), (25, True), (26, True))
_ROLE_FIELDS = {"unk": (40, 45), "bos": (41, 46), "eos": (42, 47), "pad": (43, 48)}  # (id, piece)


def spm_from_gguf(kv: Mapping[str, Any], where: str | Path) -> bytes | None:
    """The serialized ``tokenizer.model`` that the GGUF metadata ``kv`` describes.

    None when ``kv`` holds no SentencePiece vocabulary (no ``tokenizer.ggml.tokens``, or a
    ``tokenizer.ggml.model`` other than ``llama``). Raises FormatError when the keys contradict
    each other (array lengths, an id out of range, no unknown token).
    """
    if kv.get(_K + "model") != "llama" or _K + "tokens" not in kv:
        return None
    pieces, ids = pieces_from_gguf(kv, where)
    normalizer = {"add_dummy_prefix": bool(kv.get(_K + "add_space_prefix", True)),
                  "remove_extra_whitespaces": bool(kv.get(_K + "remove_extra_whitespaces", False))}
    return serialize_model(pieces, ids, **normalizer)


def pieces_from_gguf(kv: Mapping[str, Any], where: str | Path) -> tuple[list[Piece], dict[str, int]]:
    """The SentencePiece pieces and the ``unk``/``bos``/``eos``/``pad`` ids (-1: none) behind the keys."""
    tokens = kv[_K + "tokens"]
    n = len(tokens) if isinstance(tokens, list) else 0
    scores, types = kv.get(_K + "scores", [0.0] * n), kv.get(_K + "token_type", [int(PieceType.NORMAL)] * n)
    if not all(isinstance(v, list) and len(v) == n for v in (tokens, scores, types)):
        raise FormatError(f"{_K}tokens, scores and token_type are not three arrays of one length; {_FIX}",
                          where)
    n = _without_padding(tokens, scores, types)
    ids = {role: _role_id(kv, key, where) for role, key in _ROLE_KEYS.items()}
    bad = {role: i for role, i in ids.items() if not -1 <= i < n}
    if bad:
        raise FormatError(f"{_name_ids(bad)} points outside the {n} SentencePiece tokens; {_FIX}", where)
    if ids["unk"] < 0:
        unknown = [i for i in range(n) if types[i] == PieceType.UNKNOWN]
        if not unknown:
            raise FormatError(f"no {_K}unknown_token_id and no UNKNOWN token, which SentencePiece needs; "
                              f"{_FIX}", where)
        ids["unk"] = unknown[0]
    try:
        pieces = [_piece(i, str(tokens[i]), float(scores[i]), _TYPES[int(types[i])], ids) for i in range(n)]
    except KeyError as err:
        raise FormatError(f"{_K}token_type holds {err}, outside 1..6; {_FIX}", where) from None
    except (TypeError, ValueError) as err:  # a score or a type that is not a number
        raise FormatError(f"{_K}scores or token_type holds a value that is not a number ({err}); {_FIX}",
                          where) from None
    return pieces, ids


def _role_id(kv: Mapping[str, Any], key: str, where: str | Path) -> int:
    """``tokenizer.ggml.<key>`` as an id; -1 when the key is absent."""
    value = kv.get(_K + key, -1)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"{_K}{key} is {value!r}, not a token id; {_FIX}", where)
    return value


def _without_padding(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> int:
    """How many entries remain once the converter's trailing ``[PAD{id}]`` placeholders are dropped."""
    n = len(tokens)
    while n and tokens[n - 1] == f"[PAD{n - 1}]" and types[n - 1] == PieceType.UNUSED \
            and scores[n - 1] == PADDING_SCORE:
        n -= 1
    return n


def _piece(i: int, text: str, score: float, kind: PieceType, ids: Mapping[str, int]) -> Piece:
    """Token ``i`` as the SentencePiece piece it was made from (see the module docstring)."""
    if i == ids["unk"]:
        kind = PieceType.UNKNOWN
    elif kind == PieceType.CONTROL and i not in (ids["bos"], ids["eos"], ids["pad"]):
        kind = PieceType.USER_DEFINED
    if kind == PieceType.USER_DEFINED:
        text = text.replace(" ", _SPACE)
    if kind in _META and score == ADDED_TOKEN_SCORE:
        score = 0.0
    return Piece(text, score, kind)


def _name_ids(bad: Mapping[str, int]) -> str:
    return ", ".join(f"{_K}{_ROLE_KEYS[role]} = {i}" for role, i in sorted(bad.items()))


# ----------------------------------------------------------------------------- protobuf wire format

_SMALL = [bytes((n,)) for n in range(0x80)]  # one-byte varints (every key and short length)
_F32 = struct.Struct("<f")
_PIECE_KEY, _SCORE_KEY, _TYPE_KEY = b"\x0a", b"\x15", b"\x18"  # fields 1 (bytes), 2 (f32), 3 (enum)


def _varint(n: int) -> bytes:
    """Base-128 varint; a negative int32/int64 is written as its 64-bit two's complement (10 bytes)."""
    if 0 <= n < 0x80:
        return _SMALL[n]
    n &= (1 << 64) - 1
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _int(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(int(value))


def _blob(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _text(number: int, text: str) -> bytes:
    return _blob(number, text.encode("utf-8"))


def _encode_piece(p: Piece) -> bytes:
    """``SentencePiece {piece, score, type}``; ``type`` left out for NORMAL, as the trainer writes it."""
    text = p.text.encode("utf-8")
    kind = b"" if p.type == PieceType.NORMAL else _TYPE_KEY + _SMALL[p.type]
    body = b"".join((_PIECE_KEY, _varint(len(text)), text, _SCORE_KEY, _F32.pack(p.score), kind))
    return b"".join((_PIECE_KEY, _varint(len(body)), body))


def _trainer_spec(pieces: Sequence[Piece], ids: Mapping[str, int]) -> bytes:
    """``TrainerSpec``, fields in number order (see the module docstring for where each comes from)."""
    out = [_int(3, _BPE), _int(4, len(pieces))]
    out += [_int(number, int(value)) for number, value in _GEMMA_TRAINER]
    out += [_text(31, p.text) for p in pieces if p.type == PieceType.USER_DEFINED]
    out.append(_int(35, any(p.type == PieceType.BYTE for p in pieces)))
    out += [_int(_ROLE_FIELDS[role][0], ids[role]) for role in ("unk", "bos", "eos", "pad")]
    out += [_text(_ROLE_FIELDS[role][1], pieces[ids[role]].text) for role in ("unk", "bos", "eos", "pad")
            if ids[role] >= 0]
    return b"".join(out)


def _normalizer_spec(add_dummy_prefix: bool, remove_extra_whitespaces: bool) -> bytes:
    """``NormalizerSpec``: identity, no character map, whitespace escaped (default, not written)."""
    flags = _int(3, add_dummy_prefix) + _int(4, remove_extra_whitespaces)
    return _text(1, "identity") + _blob(2, b"") + flags


def serialize_model(pieces: Sequence[Piece], ids: Mapping[str, int], *, add_dummy_prefix: bool = False,
                    remove_extra_whitespaces: bool = False) -> bytes:
    """A serialized ``ModelProto`` of ``pieces``; ``ids``: the ``unk``/``bos``/``eos``/``pad`` ids (-1: none)."""
    body = b"".join(_encode_piece(p) for p in pieces)
    spec = _blob(2, _trainer_spec(pieces, ids))
    return body + spec + _blob(3, _normalizer_spec(add_dummy_prefix, remove_extra_whitespaces))
