"""Public GGUF tensor codec: float tensor <-> the raw bytes of one GGML type.

``quantize_tensor(t, "Q4_K")`` returns uint8 ``[..., row_bytes]`` for a float ``[..., cols]`` tensor: the
bytes a GGUF writer stores for that tensor (rows in order, each row a run of blocks). They are
byte-identical to llama.cpp's ``llama_model_quantize`` (legacy types, K-quants and IQ4_NL / IQ4_XS;
K-quants and IQ4 also with an imatrix) and to gguf-py's ``gguf.quants.quantize`` (BF16, Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1; F16 too, except for NaN payloads). ``dequantize_tensor`` inverts it as ggml's
``dequantize_row_*`` does. Rows are processed in chunks so that temporaries stay small; a NaN/inf input
or an fp16 scale overflow is an error.
Everything about a type (block layout, codec functions, fallback) comes from its entry in
``quant.gguf_types.GGML_TYPES``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gemma2_convert.core.errors import ConversionError, UnsupportedError
from quant import jit
from quant.gguf_types import GGML_TYPES, Codec, GGMLType, ggml_type


def row_bytes(qtype: str, cols: int) -> int:
    """Bytes of one row of ``cols`` elements; UnsupportedError if ``cols`` is not a whole number of blocks."""
    t = ggml_type(qtype)
    if cols % t.block_size:
        raise UnsupportedError(
            f"a row of {cols} elements is not a multiple of the {t.name} block size {t.block_size}; "
            f"use fallback_type({t.name!r}, {cols}) = {fallback_type(t.name, cols)} for this tensor"
        )
    return cols // t.block_size * t.type_size


def bytes_for(qtype: str, shape: tuple[int, ...] | list[int] | torch.Size) -> int:
    """Total bytes of a tensor of ``shape`` (last dim = row) stored as ``qtype``."""
    shape = tuple(shape)
    if not shape:
        raise ValueError("bytes_for needs a shape with at least one dimension")
    return int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes(qtype, shape[-1])


def fallback_type(qtype: str, cols: int) -> str:
    """The type llama.cpp's ``tensor_type_fallback`` stores a row of ``cols`` elements as.

    ``qtype`` itself when ``cols`` is a multiple of its block; otherwise the entry's ``fallback`` (Q4_K ->
    Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), and F16 when that does not fit either (or is F16: the 32-block types).
    """
    t = ggml_type(qtype)
    if cols % t.block_size == 0:
        return t.name
    return t.fallback if cols % ggml_type(t.fallback).block_size == 0 else "F16"


def _check_finite(t: Tensor, qtype: str) -> None:
    """Quantized types need finite input; a finite sum (one pass) proves it in the common case."""
    if bool(torch.isfinite(t.sum())):  # float32 sum: NaN/inf propagate; a finite overflow only costs the slow check
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ConversionError(
            f"cannot quantize to {qtype}: {int(bad.sum())} non-finite values (first at index {first}); "
            "the source tensor is corrupt, or store it as F32"
        )


def _check_scales(raw: Tensor, t: GGMLType, offsets: tuple[int, ...], source: Tensor) -> None:
    """Every fp16 scale of the quantized blocks must be finite (as llama.cpp's ``ggml_validate_row_data``)."""
    blocks = raw.reshape(-1, t.type_size)
    for off in offsets:
        if not blocks.shape[0] or int((blocks[:, off + 1] & 0x7C).max()) != 0x7C:
            continue  # no fp16 scale has an all-ones exponent (the high byte's bits 2-6): all are finite
        d = blocks[:, off : off + 2].contiguous().view(torch.float16).squeeze(-1)
        bad = ~torch.isfinite(d)
        if bool(bad.any()):
            _check_finite(source, t.name)  # a NaN/inf input gets its own message
            raise ConversionError(
                f"{t.name}: {int(bad.sum())} block scales overflow fp16 (first block {int(bad.nonzero()[0, 0])}); "
                "the values are too large for this type, store the tensor as BF16 or F32"
            )


def _imatrix_kwargs(codec: Codec, qtype: str, cols: int, quant_weights: Tensor | None) -> dict:
    if quant_weights is None or codec.imatrix == "ignored":
        return {}
    if codec.imatrix == "unsupported":
        used = sorted(k for k, t in GGML_TYPES.items() if t.codec.imatrix == "used")
        raise UnsupportedError(
            f"importance-matrix quantization to {qtype} is not implemented; it is for {', '.join(used)}"
        )
    qw = torch.as_tensor(quant_weights, dtype=torch.float32).reshape(-1)
    if qw.numel() != cols:
        raise ConversionError(f"importance matrix has {qw.numel()} entries for rows of {cols} columns; they must match")
    _check_finite(qw, f"{qtype} (importance matrix)")
    return {"quant_weights": qw}


def quantize_tensor(t: Tensor, qtype: str, quant_weights: Tensor | None = None, threads: int | None = None,
                    out: Tensor | None = None, compiled: bool = True) -> Tensor:
    """float ``[..., cols]`` -> uint8 ``[..., row_bytes(qtype, cols)]``, GGML type ``qtype``.

    ``quant_weights``: optional per-column importance ``[cols]`` (an imatrix entry, mean of squared
    activations); K-quants then follow llama.cpp's ``quantize_row_*_impl``, IQ4_NL / IQ4_XS weight their
    scale search with it, Q8_0 and float types ignore it.
    ``threads``: worker threads for the compiled kernels (default: every CPU available; the torch
    kernels always run on the calling thread). Callers that already run one quantization per thread
    pass 1. The bytes do not depend on it. ``out``: a contiguous CPU uint8 tensor with as many bytes to
    write the result into (reused buffers spare a fresh allocation's page faults on every call).
    ``compiled``: run the type's compiled kernel where numba is installed (quant/jit.py; the same bytes);
    False runs the torch port.
    """
    gt = ggml_type(qtype)
    codec = gt.codec
    if t.dim() == 0:
        raise ValueError("quantize_tensor needs a tensor with at least one dimension")
    cols = t.shape[-1]
    nbytes = row_bytes(gt.name, cols)
    kwargs = _imatrix_kwargs(codec, gt.name, cols, quant_weights)
    rows2d = t.detach().reshape(-1, cols)
    if gt.is_quantized and not codec.scales_show_nonfinite:
        _check_finite(rows2d, gt.name)
    shape = (rows2d.shape[0], nbytes)
    if out is None:
        out = torch.empty(shape, dtype=torch.uint8)
    elif out.dtype != torch.uint8 or out.numel() != shape[0] * nbytes or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous uint8 tensor of {shape[0] * nbytes} bytes")
    else:
        out = out.view(shape)
    fn, chunk_elements = codec.kernel(compiled)
    step = max(1, chunk_elements // cols)
    kernel = fn is not codec.quantize
    keep = t.dtype == torch.bfloat16 and codec.takes_bf16 and kernel
    into = codec.writes_out and kernel

    def one(r0: int) -> None:
        rows, dst = rows2d[r0 : r0 + step], out[r0 : r0 + step]
        res = fn(rows if keep else rows.to(torch.float32), **kwargs, **({"out": dst} if into else {}))
        if res.data_ptr() != dst.data_ptr():
            dst.copy_(res)

    workers = (threads or jit.default_threads()) if kernel else 1  # the torch ports hold the GIL
    jit.parallel_for(one, range(0, rows2d.shape[0], step), workers, "quantize")
    _check_scales(out, gt, codec.scale_offsets, rows2d)
    return out.reshape(*t.shape[:-1], nbytes)


def dequantize_tensor(data: Tensor | np.ndarray, qtype: str, shape: tuple[int, ...] | list[int] | torch.Size) -> Tensor:
    """Raw bytes of a ``qtype`` tensor -> float32 of ``shape`` (last dim = row)."""
    gt = ggml_type(qtype)
    shape = tuple(int(s) for s in shape)
    if isinstance(data, np.ndarray):  # e.g. a read-only GGUFReader memmap: torch needs a writable array
        data = np.ascontiguousarray(data) if data.flags.writeable else np.array(data)
    raw = torch.as_tensor(data)
    raw = raw.contiguous().view(torch.uint8).reshape(-1)
    expected = bytes_for(gt.name, shape)
    if raw.numel() != expected:
        raise ConversionError(
            f"{gt.name} tensor of shape {list(shape)} needs {expected} bytes, got {raw.numel()}; "
            "the file is truncated or the header lies"
        )
    return gt.codec.dequantize(raw.reshape(-1, row_bytes(gt.name, shape[-1]))).reshape(shape)
