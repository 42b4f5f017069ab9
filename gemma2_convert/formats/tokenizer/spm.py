"""Gemma's SentencePiece tokenizer: read ``tokenizer.model``, write the HF files, build the GGUF vocabulary.

Public API:

* :func:`find_tokenizer` — locate ``tokenizer.model`` next to a checkpoint.
* :func:`read_spm` — parse a SentencePiece model into a :class:`SpmModel` (pieces, scores, types).
* ``hf_files.write_hf_tokenizer`` — ``tokenizer.model``, ``tokenizer.json``, ``tokenizer_config.json``,
  ``special_tokens_map.json`` (builders in ``tokenizer_hf.py``).
* :func:`gguf_vocab` — the ``tokenizer.*`` GGUF metadata as a :class:`GGUFVocab` (``tokenizer_gguf.py``).

How Gemma's ``tokenizer.model`` types its pieces (ggml-org/llama.cpp PR #8228 and
``convert_hf_to_gguf.py`` ``does_token_look_special``; huggingface/transformers PR #32191 review,
"<start_of_turn>, <end_of_turn> were already added in Gemma, but not as special"; the published
Gemma ``tokenizer_config.json`` lists ``<mask>`` (4), ``<2mass>``, ``[@BOS@]``, ``<unusedN>`` with
``special: false``): ``<pad>`` ``<eos>`` ``<bos>`` are CONTROL, ``<unk>`` is UNKNOWN, and ``<mask>``,
``<2mass>``, ``[@BOS@]``, ``<unusedN>``, ``<start_of_turn>``, ``<end_of_turn>``, newline / tab /
space runs and HTML tags are USER_DEFINED. SentencePiece matches USER_DEFINED pieces in the text
atomically, longest first; CONTROL pieces never come out of text.

The SentencePiece protobuf is parsed by a small wire-format reader here, so neither
``protobuf`` nor ``sentencepiece`` is needed to read it (``sentencepiece`` is used by tests).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from gemma2_convert.core.errors import ConversionError, FormatError, UnsupportedError
from gemma2_convert.formats.tokenizer.gguf_vocab import (
    GGUFVocab,
    TokenType,
    build_gguf_vocab,
)

__all__ = [
    "GEMMA2_CHAT_TEMPLATE", "GGUFVocab", "Piece", "PieceType", "SpmModel", "TokenType",
    "find_tokenizer", "gguf_vocab", "read_spm",
]

# Gemma 2 instruction-tuned chat template (GEMMA2_FORMATS.md §4.5). Renders
# "<bos><start_of_turn>user\n{msg}<end_of_turn>\n<start_of_turn>model\n"; the assistant role is "model".
GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

TOKENIZER_FILE = "tokenizer.model"

# USER_DEFINED pieces that Gemma's tokenizer_config.json marks special (HF: never split, skipped by
# decode(skip_special_tokens=True); GGUF: CONTROL).
TURN_MARKERS = frozenset({"<start_of_turn>", "<end_of_turn>"})


class PieceType(IntEnum):
    """SentencePiece ``ModelProto.SentencePiece.Type`` (same numbers as GGUF's :class:`TokenType`)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


@dataclass(frozen=True)
class Piece:
    """One SentencePiece vocabulary entry."""

    text: str
    score: float
    type: PieceType


@dataclass(frozen=True)
class SpmModel:
    """What the converters need from a SentencePiece ``ModelProto``."""

    path: Path
    pieces: tuple[Piece, ...]
    model_type: int  # TrainerSpec.ModelType: 1 UNIGRAM, 2 BPE, 3 WORD, 4 CHAR
    byte_fallback: bool
    ids: dict[str, int]  # "unk"/"bos"/"eos"/"pad" -> id; -1 = none
    normalizer: dict[str, object]  # NormalizerSpec fields that were read

    def id_of(self, role: str) -> int | None:
        """Id of the ``unk``/``bos``/``eos``/``pad`` piece, or None if the model has none."""
        i = self.ids[role]
        return i if 0 <= i < len(self.pieces) else None

    def is_special(self, i: int) -> bool:
        """Whether piece ``i`` is a special token on the HF side (CONTROL, UNKNOWN or a turn marker)."""
        p = self.pieces[i]
        return p.type in (PieceType.CONTROL, PieceType.UNKNOWN) or (
            p.type == PieceType.USER_DEFINED and p.text in TURN_MARKERS
        )

    def added_ids(self) -> list[int]:
        """Ids that HF keeps as added tokens: every CONTROL, UNKNOWN and USER_DEFINED piece."""
        kinds = (PieceType.CONTROL, PieceType.UNKNOWN, PieceType.USER_DEFINED)
        return [i for i, p in enumerate(self.pieces) if p.type in kinds]


# ----------------------------------------------------------------------------- protobuf wire format


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        result |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not b & 0x80:
            return result, pos


def _fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """Yield ``(field_number, value)``: ints for varint/fixed fields, bytes for length-delimited ones."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        yield number, value


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _blob(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise ValueError("a length-delimited field holds a number")
    return value


def _number(value: Any) -> int:
    if not isinstance(value, int):
        raise ValueError("a numeric field holds bytes")
    return value


def _parse_piece(buf: bytes) -> Piece:
    text, score, kind = "", 0.0, 1
    for number, value in _fields(buf):
        if number == 1:
            text = _blob(value).decode("utf-8")
        elif number == 2:
            score = struct.unpack("<f", _number(value).to_bytes(4, "little"))[0]
        elif number == 3:
            kind = _number(value)
    return Piece(text, score, PieceType(kind))


def _parse_model(path: Path, buf: bytes) -> SpmModel:
    pieces: list[Piece] = []
    trainer: dict[int, Any] = {}
    normalizer: dict[int, Any] = {}
    for number, value in _fields(buf):
        if number == 1:
            pieces.append(_parse_piece(_blob(value)))
        elif number == 2:
            trainer = dict(_fields(_blob(value)))
        elif number == 3:
            normalizer = dict(_fields(_blob(value)))
    # Field numbers and defaults from sentencepiece_model.proto (TrainerSpec, NormalizerSpec).
    ids = {role: _signed(_number(trainer.get(num, default))) for role, num, default in
           (("unk", 40, 0), ("bos", 41, 1), ("eos", 42, 2), ("pad", 43, (1 << 64) - 1))}
    norm = {
        "name": _blob(normalizer.get(1, b"")).decode("utf-8"),
        "precompiled_charsmap": bool(_blob(normalizer.get(2, b""))),
        "add_dummy_prefix": bool(_number(normalizer.get(3, 1))),
        "remove_extra_whitespaces": bool(_number(normalizer.get(4, 1))),
        "escape_whitespaces": bool(_number(normalizer.get(5, 1))),
    }
    model_type, byte_fallback = _number(trainer.get(3, 1)), bool(_number(trainer.get(35, 0)))
    return SpmModel(path, tuple(pieces), model_type, byte_fallback, ids, norm)


# ----------------------------------------------------------------------------- reading + checks


def read_spm(path: str | Path) -> SpmModel:
    """Parse and check a Gemma-style SentencePiece model (BPE, byte fallback, no dummy prefix)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"no such file ({TOKENIZER_FILE} expected). Pass the tokenizer.model that "
                              "ships with the checkpoint.", path)
    try:
        model = _parse_model(path, path.read_bytes())
    except (ValueError, OverflowError, struct.error) as err:  # UnicodeDecodeError is a ValueError
        raise FormatError(f"not a SentencePiece model ({err}). Pass the tokenizer.model that ships "
                          "with the checkpoint, not tokenizer.json or a weights file.", path) from err
    if not model.pieces or not model.normalizer["name"]:
        raise FormatError("not a SentencePiece model (no pieces or no normalizer spec). Pass the "
                          "tokenizer.model that ships with the checkpoint.", path)
    _check_gemma_style(model)
    return model


def _check_gemma_style(model: SpmModel) -> None:
    """Refuse models whose normalization the fast tokenizer built here would not reproduce."""
    norm = model.normalizer
    problems = []
    if model.model_type != 2:
        problems.append(f"model_type is {model.model_type}, expected 2 (BPE)")
    if not model.byte_fallback:
        problems.append("byte_fallback is off")
    if norm["add_dummy_prefix"] or norm["remove_extra_whitespaces"] or not norm["escape_whitespaces"]:
        problems.append("normalizer adds a dummy prefix, removes whitespace or does not escape it")
    if norm["precompiled_charsmap"]:
        problems.append(f"normalizer {norm['name']!r} rewrites characters")
    if problems:
        raise UnsupportedError("; ".join(problems) + ". Only Gemma-style SentencePiece models (BPE, byte "
                               "fallback, identity normalizer, no dummy prefix) are supported.", model.path)


def find_tokenizer(path: str | Path) -> Path | None:
    """Find ``tokenizer.model`` for a checkpoint file or directory, or None.

    Looks next to a file; inside a directory, then beside it (Kaggle's Flax layout keeps
    ``tokenizer.model`` next to the checkpoint directory). Falls back to a single
    ``tokenizer*.model`` (e.g. ``tokenizer_gemma2.model``) in the same places.
    """
    path = Path(path)
    places = [path, path.parent] if path.is_dir() else [path.parent]
    for place in places:
        if (place / TOKENIZER_FILE).is_file():
            return place / TOKENIZER_FILE
        named = sorted(p for p in place.glob("tokenizer*.model") if p.is_file())
        if len(named) == 1:
            return named[0]
    return None


# ----------------------------------------------------------------------------- GGUF vocabulary


def gguf_vocab(
    spm_path: str | Path, vocab_size: int, *, chat_template: str | None = GEMMA2_CHAT_TEMPLATE
) -> GGUFVocab:
    """The GGUF vocabulary for ``spm_path`` padded to the model's ``vocab_size`` (embedding rows).

    Equal to what llama.cpp's ``convert_hf_to_gguf.py`` makes of the directory
    :func:`write_hf_tokenizer` writes; details in ``tokenizer_gguf.py``. Raises ConfigError if the
    tokenizer has more pieces than ``vocab_size``.
    """
    return build_gguf_vocab(read_spm(spm_path), vocab_size, chat_template)
