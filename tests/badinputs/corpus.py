"""The bad-input corpus, built programmatically into a temporary directory: small valid artifacts
(``build_good``), then every case of the families in ``families.py`` (``build_corpus``). Each
:class:`Case` says which commands read far enough to meet its problem, and the regex that the
one-line error must then match."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from gemma2_convert.core.lazy import LazyTensor
from reference.config import Gemma2Config

CFG = Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                   sliding_window=8, max_position_embeddings=64, torch_dtype="float32")
"""512 rows: the tiny tokenizer's vocabulary, so every writer finds a matching tokenizer."""

ORIG_COMMANDS = ("orig-to-hf", "orig-to-safetensors", "orig-to-gguf")
COMMANDS = ORIG_COMMANDS + ("to-gguf", "gguf-to-hf", "verify", "inspect", "gemma2-quantize", "imatrix")
READS = {
    "orig": frozenset(COMMANDS) - {"gguf-to-hf"},
    "orbax": frozenset(COMMANDS) - {"gguf-to-hf"},  # a directory: gguf-to-hf refuses it before reading
    # a gemma_pytorch model of unpublished shape: only the commands that take --config reach the weights
    "orig-config": frozenset(ORIG_COMMANDS + ("verify", "inspect")),
    "hf": frozenset({"to-gguf", "verify", "inspect", "gemma2-quantize", "imatrix"}),
    "gguf": frozenset({"to-gguf", "gguf-to-hf", "verify", "inspect", "gemma2-quantize", "imatrix"}),
    "any": frozenset(COMMANDS),
}
TB = 1 << 40


@dataclass(frozen=True)
class Good:
    """Valid inputs of every format (the same tiny model), and the tokenizer."""

    hf: Path
    hf_sharded: Path
    single: Path
    ckpt: Path
    config: Path
    orig_sharded: Path
    gguf: Path
    tokenizer: Path


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    kind: str
    """Which commands reach the problem: ``READS[kind]``."""
    problem: str
    """Regex the error line matches for those commands."""
    config: Path | None = None
    """``--config`` for the commands that take it (gemma_pytorch of unpublished shape)."""
    marker: Path | None = None
    """A file the input tries to create: it must never exist."""
    lying: bool = False
    """Claims about a terabyte: must fail fast, with no allocation to match."""
    family: str = ""

    @property
    def reads(self) -> frozenset[str]:
        return READS[self.kind]


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    from gemma2_convert.formats.synthetic import random_tensors

    return {k: v.load() for k, v in random_tensors(CFG, seed, torch.float32).items()}


def build_good(root: Path) -> Good:
    from gemma2_convert.formats.hf import write_hf_dir
    from gemma2_convert.formats.single_safetensors import write_single_safetensors
    from gemma2_convert.pipeline.gguf import to_gguf
    from gemma2_convert.formats.testing import write_orig_ckpt, write_orig_sharded
    from gemma2_convert.formats.tokenizer.tiny import make_tiny_spm

    root.mkdir(parents=True, exist_ok=True)
    tok = make_tiny_spm(root / "tokenizer.model", CFG.vocab_size)
    sd = tensors()
    items = [(k, LazyTensor.of(v)) for k, v in sd.items()]
    hf, sharded, orig = root / "hf", root / "hf-sharded", root / "orig"
    for d in (hf, sharded):
        d.mkdir()
        write_hf_dir(d, CFG, items, tokenizer=tok, max_shard_size="5GB" if d == hf else 20_000)
    ckpt = write_orig_ckpt(orig / "model.ckpt", sd, CFG)
    shutil.copy(tok, orig / "tokenizer.model")
    (orig / "config.json").write_text(json.dumps(CFG.to_hf_dict()))
    orig_sharded = write_orig_sharded(root / "orig-sharded", sd, CFG, shards=2)
    single = root / "single" / "model.safetensors"
    single.parent.mkdir()
    write_single_safetensors(single, CFG, items, provenance={"source": "corpus"})
    gguf = root / "model.gguf"
    to_gguf(hf, gguf, type_name="f32", tokenizer=tok, verify=False)
    return Good(hf, sharded, single, ckpt, orig / "config.json", orig_sharded, gguf, tok)


def build_corpus(root: Path, good: Good) -> list[Case]:
    """Every case, written under ``root``."""
    from tests.badinputs.families import FAMILIES

    cases = []
    for family in FAMILIES:
        name = family.__name__.strip("_")
        d = root / name
        d.mkdir(parents=True)
        cases += [replace(c, family=name) for c in family(d, good)]
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), names
    return cases
