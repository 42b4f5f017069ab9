"""The GGUF ``tokenizer.*`` metadata for a Gemma SentencePiece model (GEMMA2_FORMATS.md §5.1).

Built to equal what llama.cpp's ``convert_hf_to_gguf.py`` (``_set_vocab_sentencepiece``,
``_create_vocab_sentencepiece``) makes of the HF directory that ``write_hf_tokenizer`` writes, so a
GGUF written from ``tokenizer.model`` directly and one converted from our HF output agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

from gemma2_convert.core.errors import ConfigError

if TYPE_CHECKING:
    from gemma2_convert.formats.tokenizer.spm import SpmModel


class TokenType(IntEnum):
    """GGUF ``tokenizer.ggml.token_type`` values (LC gguf-py ``constants.py`` ``TokenType``).

    Numerically equal to SentencePiece's piece types.
    """

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Added tokens that llama.cpp's converter types CONTROL although Gemma's tokenizer_config.json does
# not mark them special (LC convert_hf_to_gguf.py does_token_look_special: "<mask>", "<2mass>",
# "[@BOS@]", "<unused…>", "<|…|>", "<pad>").
_LOOKS_CONTROL = re.compile(r"<mask>|<2mass>|\[@BOS@\]|<unused.*>|<pad>|<\|.*\|>", re.DOTALL)

ADDED_TOKEN_SCORE = -1000.0  # LC: score of every entry taken from added_tokens_decoder
PADDING_SCORE = -10000.0  # LC: score of the [PAD{i}] placeholders


@dataclass(frozen=True)
class GGUFVocab:
    """Values of the GGUF ``tokenizer.*`` keys; :meth:`metadata` names them."""

    tokens: list[str]  # tokenizer.ggml.tokens, arr[str]
    scores: list[float]  # tokenizer.ggml.scores, arr[f32]
    token_types: list[int]  # tokenizer.ggml.token_type, arr[i32], TokenType values
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool = True
    add_eos: bool = False
    add_space_prefix: bool = False
    chat_template: str | None = None
    model: str = "llama"  # tokenizer.ggml.model: SentencePiece
    pre: str = "default"

    def metadata(self) -> dict[str, object]:
        """GGUF key -> value. Ids are u32, flags bool, tokens arr[str], scores arr[f32], types arr[i32].

        Ids that are None and a None chat template are left out.
        """
        keys: dict[str, object] = {
            "tokenizer.ggml.model": self.model,
            "tokenizer.ggml.pre": self.pre,
            "tokenizer.ggml.tokens": self.tokens,
            "tokenizer.ggml.scores": self.scores,
            "tokenizer.ggml.token_type": self.token_types,
        }
        ids = {"bos": self.bos_id, "eos": self.eos_id, "unknown": self.unk_id, "padding": self.pad_id}
        keys.update({f"tokenizer.ggml.{name}_token_id": i for name, i in ids.items() if i is not None})
        keys["tokenizer.ggml.add_bos_token"] = self.add_bos
        keys["tokenizer.ggml.add_eos_token"] = self.add_eos
        keys["tokenizer.ggml.add_space_prefix"] = self.add_space_prefix
        if self.chat_template is not None:
            keys["tokenizer.chat_template"] = self.chat_template
        return keys


def build_gguf_vocab(model: SpmModel, vocab_size: int, chat_template: str | None) -> GGUFVocab:
    """The vocabulary of ``model`` padded to ``vocab_size`` entries (the embedding's rows).

    SentencePiece pieces, scores and types; every added token (CONTROL / UNKNOWN / USER_DEFINED
    piece, as listed in our ``added_tokens_decoder``) gets score -1000 and becomes CONTROL if it is
    special or looks like a marker (``<start_of_turn>``, ``<mask>``, ``<unusedN>``, …), else
    USER_DEFINED with ``▁`` written as a space (llama.cpp matches user-defined tokens on the raw
    text, ggml-org/llama.cpp PR #8228). Ids past the pieces are ``[PAD{id}]``, UNUSED, score -10000.
    """
    if len(model.pieces) > vocab_size:
        raise ConfigError(
            f"the SentencePiece model has {len(model.pieces)} pieces but the model's vocab_size is "
            f"{vocab_size}; the tokenizer does not belong to this checkpoint. Pass the matching tokenizer.model.",
            model.path,
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [PADDING_SCORE] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    for i, piece in enumerate(model.pieces):
        tokens[i], scores[i], types[i] = piece.text, piece.score, int(piece.type)
    for i in model.added_ids():
        text = model.pieces[i].text
        control = model.is_special(i) or _LOOKS_CONTROL.fullmatch(text) is not None
        tokens[i] = text if control else text.replace("▁", " ")
        types[i] = int(TokenType.CONTROL if control else TokenType.USER_DEFINED)
        scores[i] = ADDED_TOKEN_SCORE
    return GGUFVocab(
        tokens, scores, types,
        bos_id=model.id_of("bos"), eos_id=model.id_of("eos"), unk_id=model.id_of("unk"), pad_id=model.id_of("pad"),
        chat_template=chat_template,
    )
