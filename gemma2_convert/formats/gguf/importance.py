"""An importance matrix (``--imatrix``) used as ``llama-quantize --imatrix`` uses it.

llama.cpp (``tools/quantize/quantize.cpp`` ``load_imatrix``, ``src/llama-quant.cpp``), followed here:

* The per-column weights of a tensor are its entry's ``in_sum2 / counts`` (``Imatrix.importance``), looked up
  by the GGUF tensor name. A tensor without an entry is quantized without one (llama.cpp logs "did not find
  weights"): ``llama-imatrix`` collects none for ``token_embd`` (the tied output head included), so the
  embedding always gets the reference quantizer. An entry whose length is not the row length is an error,
  except for ``token_embd`` (ignored, as llama.cpp does).
* Only the quantizers that take weights use them (Q4_0, Q4_1, Q5_0, Q5_1, Q2_K … Q6_K, IQ4_NL, IQ4_XS); Q8_0 and
  the float types ignore them (``quant.gguf_types``: ``Codec.imatrix``).
* With an imatrix the mixes drop the rules llama.cpp keeps only without one (``formats.gguf.mix``: IQ4_XS's
  ``ffn_down``). llama.cpp's other imatrix-only rule (Q4_1 / Q5_1 for the first ``ffn_down`` of its Q4_0 / Q5_0
  file types) has no counterpart: ``--type q4_0`` / ``q5_0`` store every matrix in that type, as ``--pure``.
* ``tensor_requires_imatrix`` (IQ1/IQ2/IQ3_XXS, Q2_K in a Q2_K_S file) refuses those types without one; none
  of them is a ``--type`` here, so no type is refused.
* The file is recorded in the output's metadata under llama-quantize's keys: ``quantize.imatrix.file`` (the
  path as given), ``.dataset`` (the first dataset), ``.entries_count`` and ``.chunks_count`` (u32; the
  chunk count only when it is positive), strings cut to 127 bytes as llama.cpp's overrides cut them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from gemma2_convert.core.errors import ConfigError, UnsupportedError, name_list
from gemma2_convert.formats.gguf.imatrix import Imatrix, read_imatrix
from gemma2_convert.formats.gguf.values import Value, string, u32
from gemma2_convert.formats.gguf.writer import TensorPlan
from quant.gguf_types import ggml_type

K_FILE, K_DATASET = "quantize.imatrix.file", "quantize.imatrix.dataset"
K_ENTRIES, K_CHUNKS = "quantize.imatrix.entries_count", "quantize.imatrix.chunks_count"
OVERRIDE_BYTES = 127
"""llama.cpp's ``llama_model_kv_override.val_str`` holds 128 bytes with the terminating NUL."""
TOKEN_EMBD = "token_embd.weight"


def _cut(text: str) -> str:
    return text.encode("utf-8")[:OVERRIDE_BYTES].decode("utf-8", "ignore")


def imatrix_metadata(path: Path, im: Imatrix) -> list[tuple[str, Value]]:
    """The ``quantize.imatrix.*`` keys llama-quantize writes for ``--imatrix path``."""
    meta = [(K_FILE, string(_cut(str(path))))]
    if im.datasets:
        meta.append((K_DATASET, string(_cut(im.datasets[0]))))
    meta.append((K_ENTRIES, u32(len(im.entries))))
    if im.chunk_count > 0:
        meta.append((K_CHUNKS, u32(im.chunk_count)))
    return meta


def load_imatrix(path: Path | None) -> Imatrix | None:
    """The importance matrix at ``path`` (None: none given)."""
    return None if path is None else read_imatrix(path)


def weigh_plans(plans: Sequence[TensorPlan], im: Imatrix, path: Path) -> tuple[list[TensorPlan], list[str]]:
    """``plans`` with each quantized tensor's importance attached where its type uses one, and the names of
    the quantized tensors the imatrix has no entry for. A length that is not the row length is a ConfigError
    (llama-quantize aborts too: the imatrix belongs to another model)."""
    out, missing = [], []
    for p in plans:
        t = ggml_type(p.qtype)
        if not t.is_quantized or p.encoder is not None:
            out.append(p)
            continue
        qw = im.importance(p.name)
        cols = p.source.shape[-1]
        if qw is not None and qw.numel() != cols:
            if p.name == TOKEN_EMBD:
                qw = None
            else:
                raise ConfigError(f"the imatrix entry for {p.name} has {qw.numel()} values, but its rows have "
                                  f"{cols} columns: the imatrix was computed for another model. Make one for this "
                                  "model (gemma2-convert imatrix, or llama-imatrix)", path)
        if qw is None:
            missing.append(p.name)
        elif t.codec.imatrix == "unsupported":
            raise UnsupportedError(f"{p.name}: quantizing {t.name} with an importance matrix is not implemented "
                                   "(llama.cpp's quantize_row_*_impl is not ported for it); choose another --type "
                                   "or leave out --imatrix", path)
        out.append(replace(p, quant_weights=qw) if qw is not None and t.codec.imatrix == "used" else p)
    return out, missing


def missing_warning(missing: Sequence[str], path: Path) -> str | None:
    """The warning for quantized tensors without an imatrix entry (the embedding never has one)."""
    others = [n for n in missing if n != TOKEN_EMBD]
    if not others:
        return None
    return (f"{path}: no importance data for {len(others)} quantized tensor(s), quantized without it as "
            f"llama-quantize does: {name_list(others)}")
