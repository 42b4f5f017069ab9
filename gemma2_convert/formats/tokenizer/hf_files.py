"""HF tokenizer files for a Gemma SentencePiece model, built with the ``tokenizers`` library.

``tokenizer.json`` reproduces SentencePiece's BPE encoding id for id:

* normalizer ``Replace(" ", "▁")``, no pre-tokenizer: SentencePiece (identity normalizer, no dummy
  prefix) encodes the whole escaped text as one sequence;
* BPE model over all pieces with ``byte_fallback``; the merge list holds every split ``(a, b)`` of
  every NORMAL piece ``a + b`` whose halves are NORMAL pieces, ranked by the score of ``a + b`` —
  SentencePiece merges the adjacent pair whose concatenation has the highest score;
* every CONTROL / UNKNOWN / USER_DEFINED piece is an added token. USER_DEFINED pieces are matched
  on the normalized text, longest first, like SentencePiece's atomic user-defined symbols (so
  ``▁▁``-style whitespace runs take the longest run piece, as ``tokenizer.model`` does); the special
  ones (CONTROL, UNKNOWN, turn markers) are matched on the raw text;
* decoder ``Replace("▁", " ")``, ``ByteFallback``, ``Fuse``; post-processor prepends ``<bos>``.

Gemma's published ``tokenizer.json`` disagrees with ``tokenizer.model`` on long whitespace runs
(it prefers the 16-space piece; ggml-org/llama.cpp PR #8228); this one follows ``tokenizer.model``.
One HF convention is kept on purpose: CONTROL pieces typed in the text (``<bos>``) become their
special ids, where SentencePiece spells them out; llama.cpp does the same with ``parse_special``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from gemma2_convert.formats.tokenizer.spm import (
    GEMMA2_CHAT_TEMPLATE,
    PieceType,
    SpmModel,
    read_spm,
)

_SPACE = "▁"


def hf_vocab(model: SpmModel) -> dict[str, int]:
    """Piece -> id. A byte piece becomes its ASCII character where a NORMAL piece needs that character.

    SentencePiece merges any two symbols whose concatenation is a piece, even characters that are
    not pieces themselves; HF BPE merges only vocabulary entries. Gemma has no ``\\t`` piece, so
    ``<0x09>`` is spelled ``\\t`` (as HF's Gemma converter does, GEMMA2_FORMATS.md §4.5). The id is
    unchanged: SentencePiece's byte fallback for a lone tab is ``<0x09>`` too.
    """
    vocab = {p.text: i for i, p in enumerate(model.pieces)}
    normal = [p.text for p in model.pieces if p.type == PieceType.NORMAL]
    missing = {ch for text in normal for ch in text if ch not in vocab and ch.isascii()}
    for ch in sorted(missing):
        byte_piece = f"<0x{ord(ch):02X}>"
        if byte_piece in vocab:
            vocab[ch] = vocab.pop(byte_piece)
    return vocab


def hf_merges(model: SpmModel, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every ``(a, b)`` with ``a + b`` a NORMAL piece and ``a``, ``b`` mergeable, best score first."""
    mergeable = {p.text for p in model.pieces if p.type == PieceType.NORMAL}
    mergeable |= {text for text in vocab if len(text) == 1 and model.pieces[vocab[text]].type == PieceType.BYTE}
    ranked: list[tuple[float, int, int, str, str]] = []
    for i, p in enumerate(model.pieces):
        if p.type != PieceType.NORMAL:
            continue
        for cut in range(1, len(p.text)):
            left, right = p.text[:cut], p.text[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-p.score, i, vocab[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def added_token(model: SpmModel, i: int) -> AddedToken:
    """The added token for piece ``i``: special ones match raw text, the others normalized text."""
    special = model.is_special(i)
    return AddedToken(model.pieces[i].text, single_word=False, lstrip=False, rstrip=False,
                      normalized=not special, special=special)


def build_tokenizer(model: SpmModel) -> Tokenizer:
    """The fast tokenizer equivalent to ``model``."""
    vocab = hf_vocab(model)
    unk = model.id_of("unk")
    bpe = models.BPE(
        vocab=vocab,
        merges=hf_merges(model, vocab),
        unk_token=None if unk is None else model.pieces[unk].text,
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Replace(" ", _SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_tokens([added_token(model, i) for i in model.added_ids()])
    bos = model.id_of("bos")
    if bos is not None:
        name = model.pieces[bos].text
        tok.post_processor = processors.TemplateProcessing(
            single=f"{name}:0 $A:0", pair=f"{name}:0 $A:0 {name}:1 $B:1", special_tokens=[(name, bos)]
        )
    return tok


def _token_dict(token: AddedToken, with_special: bool = True) -> dict[str, Any]:
    entry: dict[str, Any] = {"content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
                             "rstrip": token.rstrip, "single_word": token.single_word}
    if with_special:
        entry["special"] = token.special
    return entry


def _role_tokens(model: SpmModel) -> dict[str, str | None]:
    texts = {role: (None if (i := model.id_of(role)) is None else model.pieces[i].text)
             for role in ("bos", "eos", "unk", "pad")}
    return {f"{role}_token": text for role, text in texts.items()}


def _extra_specials(model: SpmModel) -> list[str]:
    return [model.pieces[i].text for i in model.added_ids()
            if model.is_special(i) and model.pieces[i].type == PieceType.USER_DEFINED]


def tokenizer_config(model: SpmModel, chat_template: str | None, model_max_length: int) -> dict[str, Any]:
    """``tokenizer_config.json`` (GEMMA2_FORMATS.md §4.5)."""
    mask = next((p.text for p in model.pieces if p.text == "<mask>"), None)
    config: dict[str, Any] = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): _token_dict(added_token(model, i)) for i in model.added_ids()},
        "additional_special_tokens": _extra_specials(model),
        **_role_tokens(model),
        "mask_token": mask,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "use_default_system_prompt": False,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def special_tokens_map(model: SpmModel) -> dict[str, Any]:
    """``special_tokens_map.json``: the turn markers plus bos/eos/pad/unk."""
    out: dict[str, Any] = {"additional_special_tokens": _extra_specials(model)}
    for key, text in _role_tokens(model).items():
        if text is not None:
            out[key] = _token_dict(AddedToken(text, normalized=False, special=True), with_special=False)
    return out


def write_files(model: SpmModel, out_dir: Path, chat_template: str | None, model_max_length: int) -> list[Path]:
    """Write the four tokenizer files into ``out_dir`` (created if missing); return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / name for name in
               ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]
    if model.path.resolve() != written[0].resolve():
        shutil.copyfile(model.path, written[0])
    build_tokenizer(model).save(str(written[1]))
    _write_json(written[2], tokenizer_config(model, chat_template, model_max_length))
    _write_json(written[3], special_tokens_map(model))
    return written


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hf_tokenizer(
    spm_path: str | Path,
    out_dir: str | Path,
    *,
    chat_template: str | None = GEMMA2_CHAT_TEMPLATE,
    model_max_length: int = 8192,
) -> list[Path]:
    """Write the HF tokenizer files for ``spm_path`` into ``out_dir``; return the written paths.

    ``tokenizer.json`` reproduces SentencePiece's ids exactly (see ``tokenizer_hf.py``).
    ``chat_template=None`` omits the template (base models).
    """
    return write_files(read_spm(spm_path), Path(out_dir), chat_template, model_max_length)
