"""The ``gguf`` reader: a gemma2 GGUF (ours or llama.cpp's) as the canonical checkpoint.

The file is parsed and validated by ``gguf_file.GGUFFile`` (every part of a split set, given its first
file: ``split.open_set``); here the tensors get their HF names
back, norms their zero-centred values (−1, plus the float32 low bits our writer records),
``attn_q`` its true scale (÷ the recorded fold), and the config comes from the metadata. Tensors
are dequantized lazily from the mapped file: F32/F16/BF16 are zero-copy views.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from gemma2_convert.core.errors import (
    FormatError,
    TensorMismatchError,
    UnsupportedError,
    name_list,
)
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats.gguf.file import GGUFFile, TensorInfo
from gemma2_convert.formats.gguf.metadata import (
    K_HF_CONFIG,
    K_NORM_RESIDUAL,
    K_QUERY_FOLD,
    K_SOURCE_DTYPE,
    K_TOKENIZER_MODEL,
    PREFIX,
    config_from_metadata,
)
from gemma2_convert.formats.gguf.names import (
    ARCH,
    hf_name,
    is_norm,
    is_query,
    sub_one,
    unfold_query,
)
from gemma2_convert.formats.gguf.split import SPLIT_NO, GGUFSet, open_set, read_parts
from gemma2_convert.formats.gguf.values import GGUF_MAGIC
from gemma2_convert.formats.registry import Checkpoint, register_reader
from gemma2_convert.formats.stored import PartRow, Stored, TensorRow, json_text, summary
from gemma2_convert.formats.tokenizer.from_gguf import spm_from_gguf
from quant.gguf_blocks import BLOCK_TYPES, codes_from_blocks
from quant.gguf_codec import dequantize_tensor
from quant.gguf_kcodes import K_TYPES, kquant_codes
from quant.gguf_types import GGML_TYPES
from quant.qtensor import QuantCodes, QuantTensor

_FLOAT_VIEWS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DECODE_ELEMENTS = 16 << 20
"""Elements a quantized matrix is decoded by at a time (its codes and parameters as temporaries)."""


def _is_gguf(p: Path) -> bool:
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def dequantize(f: GGUFFile | GGUFSet, info: TensorInfo) -> torch.Tensor:
    """The stored tensor in PyTorch layout: a zero-copy view for F32/F16/BF16, else float32."""
    return _decode(f.raw(info.name), info, info.shape)


def dequantize_rows(f: GGUFFile | GGUFSet, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of ``dequantize(f, info)`` (a 2-D tensor), decoding only their bytes: every GGML
    type stores a row as whole blocks, ``nbytes / rows`` bytes each."""
    raw = f.raw(info.name)
    n_rows = info.shape[0]
    stop = min(stop, n_rows)
    per = raw.size // n_rows  # [rows, per] bytes
    return _decode(raw[start * per:stop * per], info, (stop - start, *info.shape[1:]))


def _decode(raw: np.ndarray, info: TensorInfo, shape: tuple[int, ...]) -> torch.Tensor:
    if info.type_name in _FLOAT_VIEWS:
        return torch.from_numpy(raw).view(_FLOAT_VIEWS[info.type_name]).reshape(shape)
    if info.type_name in GGML_TYPES:
        return dequantize_tensor(torch.from_numpy(raw), info.type_name, shape)
    import gguf  # types we do not write (Q2_K, Q3_K, IQ*): gguf-py's numpy dequantizers

    qtype = gguf.GGMLQuantizationType(info.type_id)
    return torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32)).reshape(shape)


def stored_dtype(info: TensorInfo) -> torch.dtype:
    return _FLOAT_VIEWS.get(info.type_name, torch.float32)


def _canonical(f: GGUFSet, info: TensorInfo, hf: str, fold: float, source_dtype: torch.dtype | None) -> LazyTensor:
    """Undo the GGUF transforms lazily: −1 (+ recorded low bits) on norms, ÷fold on q_proj."""
    shape = info.shape
    if is_norm(hf):
        residual = f.kv.get(K_NORM_RESIDUAL + info.name)
        if residual is not None and len(residual) != math.prod(shape):
            raise FormatError(f"{K_NORM_RESIDUAL + info.name} has {len(residual)} values for a tensor of "
                              f"{math.prod(shape)}", f.path)

        def norm() -> torch.Tensor:
            w = sub_one(dequantize(f, info))
            return w if residual is None else w + torch.tensor(residual, dtype=torch.float32).reshape(shape)

        return LazyTensor(shape, torch.float32, norm)
    if is_query(hf) and fold != 1.0:
        exact_dtype = source_dtype if info.type_name == "F32" and source_dtype in (torch.bfloat16, torch.float16) else None

        def query() -> torch.Tensor:
            q = unfold_query(dequantize(f, info), fold)
            return q if exact_dtype is None else q.to(exact_dtype).float()  # back onto the source grid

        return LazyTensor(shape, torch.float32, query)
    by_rows = len(shape) == 2 and info.type_name not in _FLOAT_VIEWS  # a float view costs nothing to slice
    rows = (lambda a, b: dequantize_rows(f, info, a, b)) if by_rows else None
    if (info.type_name in BLOCK_TYPES or info.type_name in K_TYPES) and len(shape) == 2:
        return _quantized(f, info)  # its codes stay readable (quantized → quantized)
    return LazyTensor(shape, stored_dtype(info), lambda: dequantize(f, info), rows=rows)


def _codes(raw: np.ndarray, qtype: str, shape: tuple[int, int]) -> QuantCodes:
    data = torch.from_numpy(raw).reshape(-1)
    return codes_from_blocks(data, qtype, shape) if qtype in BLOCK_TYPES else kquant_codes(data, qtype, shape)


def _quantized(f: GGUFSet, info: TensorInfo) -> QuantTensor:
    """A block-quantized matrix as a ``QuantTensor``: decoded from its codes (bit for bit what the block
    type's decoder gives: tests/test_transcode_kquants.py), rows decoded as ``load`` decodes them, op for op;
    ``blocks``: its stored bytes, what a GGUF of the same type copies."""
    qtype, (rows, cols) = info.type_name, info.shape
    kind, bits, group = K_TYPES[qtype] if qtype in K_TYPES else (*BLOCK_TYPES[qtype], 32)

    def block_rows(a: int, b: int, out: torch.Tensor | None = None) -> torch.Tensor:
        raw = f.raw(info.name).reshape(rows, -1)[a:b]
        return _codes(raw, qtype, (raw.shape[0], cols)).dequantize(out)

    def load() -> torch.Tensor:  # by blocks of rows: no whole-tensor codes beside the float32 result
        out = torch.empty(rows, cols, dtype=torch.float32)
        step = max(1, DECODE_ELEMENTS // cols)
        for a in range(0, rows, step):
            block_rows(a, a + step, out[a:a + step])
        return out

    return QuantTensor((rows, cols), torch.float32, load, None, None, block_rows,
                       codes=lambda: _codes(f.raw(info.name), qtype, (rows, cols)), kind=kind, bits=bits,
                       group_size=group, layout=f"gguf:{qtype}",
                       blocks=lambda: torch.from_numpy(f.raw(info.name)).reshape(-1))


def _source_dtype(f: GGUFSet) -> torch.dtype | None:
    name = f.kv.get(K_SOURCE_DTYPE)
    return getattr(torch, name) if name in ("float32", "bfloat16", "float16") else None


def _tensors(f: GGUFSet, fold: float) -> dict[str, LazyTensor]:
    unknown = []
    out: dict[str, LazyTensor] = {}
    for name, info in f.tensors.items():
        try:
            hf = hf_name(name)
        except TensorMismatchError:
            unknown.append(name)
            continue
        out[hf] = _canonical(f, info, hf, fold, _source_dtype(f))
    if unknown:
        raise TensorMismatchError(f"{len(unknown)} tensor(s) that a Gemma 2 GGUF does not have: "
                                  f"{name_list(unknown)}", f.path)
    return out


def _check_vocab(f: GGUFSet) -> int:
    """Embedding rows, checked against the vocabulary length."""
    embd = f.tensors.get("token_embd.weight")
    if embd is None:
        raise TensorMismatchError("no token_embd.weight tensor", f.path)
    rows = embd.shape[0]
    tokens = f.kv.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) != rows:
        raise FormatError(f"the vocabulary has {len(tokens)} tokens but token_embd.weight has {rows} rows; "
                          "llama.cpp refuses this file. Rebuild it with the tokenizer that belongs to the "
                          "model", f.path)
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        if key in f.kv and tokens is not None and len(f.kv[key]) != len(tokens):
            raise FormatError(f"{key} has {len(f.kv[key])} entries for {len(tokens)} tokens", f.path)
    return rows


def _tokenizer_blob(f: GGUFFile | GGUFSet) -> bytes | None:
    """The tokenizer.model our GGUFs embed, else the one rebuilt from llama.cpp's ``tokenizer.ggml.*`` keys."""
    blob = f.kv.get(K_TOKENIZER_MODEL)
    return blob if isinstance(blob, bytes) and blob else spm_from_gguf(f.kv, f.path)


def stored_gguf(path: Path) -> Stored:
    """The file as stored: tensors in their ggml types, metadata, and our provenance keys apart; of a split
    set, every part that belongs to it, and each part with its size and what is wrong with it."""
    found = read_parts(path)
    f = GGUFSet([p.file for p in found if p.file is not None and (not p.problem or p.path == path)])
    parts = [PartRow(p.path.name, p.nbytes, len(p.file.tensors) if p.file else 0, p.problem) for p in found]
    rows = [TensorRow(t.name, t.shape, t.type_name, t.nbytes) for t in f.tensors.values()]
    tensors = {t.name: LazyTensor(t.shape, stored_dtype(t), lambda t=t: dequantize(f, t)) for t in f.tensors.values()}
    ours = {k: v for k, v in f.kv.items() if k.startswith(PREFIX)}
    prov = {k.removeprefix(PREFIX): summary(v) for k, v in ours.items()
            if not k.startswith(K_NORM_RESIDUAL) and k != K_HF_CONFIG}
    residuals = sum(k.startswith(K_NORM_RESIDUAL) for k in ours)
    if residuals:
        prov["norm_residual"] = f"low bits of {residuals} norm tensor(s)"
    meta = {"gguf_version": f.version, **{k: summary(v) for k, v in f.kv.items() if not k.startswith(PREFIX)}}
    raw = json_text(f.kv.get(K_HF_CONFIG)) if isinstance(f.kv.get(K_HF_CONFIG), str) else None
    later = f.kv.get(SPLIT_NO, 0) != 0  # a later part of a split set: no model metadata for the doctor to judge
    return Stored(rows, tensors, meta, prov or None, raw, gguf_kv=None if later else f.kv,
                  parts=parts if f.split else [])


@register_reader("gguf", "a llama.cpp GGUF file of architecture gemma2", _is_gguf, stored=stored_gguf)
def open_gguf(path: Path, **_: object) -> Checkpoint:
    f = open_set(path)
    arch = f.kv.get("general.architecture")
    if arch != ARCH:
        raise UnsupportedError(f"GGUF architecture is {arch!r}; only {ARCH!r} (Gemma 2) is supported", path)
    cfg = config_from_metadata(f.kv, _check_vocab(f), str(path))
    if "output.weight" in f.tensors and cfg.tie_word_embeddings:  # a separate head (a merged adapter's)
        cfg = cfg.replace(tie_word_embeddings=False)
    fold = float(f.kv.get(K_QUERY_FOLD, 1.0))
    if not math.isfinite(fold) or fold <= 0:
        raise FormatError(f"{K_QUERY_FOLD} is {fold}, expected a positive factor", path)
    types = sorted({i.type_name for i in f.tensors.values()})
    meta = {"gguf_version": str(f.version), "tensor_types": ", ".join(types),
            "file_type": str(f.kv.get("general.file_type", "?"))}
    meta.update({k.removeprefix(PREFIX): str(v) for k, v in f.kv.items()
                 if k.startswith(PREFIX) and not k.startswith(K_NORM_RESIDUAL) and k not in (K_HF_CONFIG, K_TOKENIZER_MODEL)})
    return Checkpoint("gguf", path, cfg, _tensors(f, fold), None, meta,
                      tokenizer_source=lambda: _tokenizer_blob(f),
                      default_dtype=meta.get("source_dtype", "float32"),
                      parts=tuple(g.path for g in f.files[1:]))


__all__ = ["GGUFFile", "TensorInfo", "dequantize", "open_gguf"]
