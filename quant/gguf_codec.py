"""Public GGUF tensor codec: float tensor <-> the raw bytes of one GGML type.

``quantize_tensor(t, "Q4_K")`` returns uint8 ``[..., row_bytes]`` for a float ``[..., cols]`` tensor: the
bytes a GGUF writer stores for that tensor (rows in order, each row a run of blocks). They are
byte-identical to llama.cpp's ``llama_model_quantize`` (legacy types and K-quants; K-quants also with an
imatrix) and to gguf-py's ``gguf.quants.quantize`` (BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; F16 too, except
for NaN payloads). ``dequantize_tensor`` inverts it as ggml's ``dequantize_row_*`` does. Rows are
processed in chunks so that temporaries stay small; a NaN/inf input or an fp16 scale overflow is an error.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gemma2_convert.core.errors import ConversionError, UnsupportedError

from quant import gguf_imatrix as im
from quant import gguf_kquants as kq
from quant import gguf_legacy as lg
from quant import jit
from quant.gguf_types import GGMLType, ggml_type

CHUNK_ELEMENTS = 1 << 20
"""Default row-chunk size (elements) for quantization; results do not depend on it."""
JIT_CHUNK_ELEMENTS = 1 << 20
"""Row-chunk size for the compiled kernels: one chunk per task of a worker thread."""


@dataclass(frozen=True)
class Codec:
    """Row-wise quantize/dequantize functions of one GGML type."""

    quantize: Callable[..., Tensor]
    """``[rows, cols]`` float32 -> ``[rows, row_bytes]`` uint8; takes ``quant_weights=`` if ``imatrix == "used"``."""
    dequantize: Callable[[Tensor], Tensor]
    """``[rows, row_bytes]`` uint8 -> ``[rows, cols]`` float32."""
    scale_offsets: tuple[int, ...] = ()
    """Byte offsets of the fp16 scales inside a block (checked to be finite after quantization)."""
    imatrix: str = "ignored"
    """What an importance matrix does: ``"used"``, ``"ignored"`` (as llama.cpp) or ``"unsupported"`` here."""
    scales_show_nonfinite: bool = False
    """A NaN/inf input always yields a non-finite scale in its block (max/min based), so the scale check
    also catches bad input and the separate input pass is skipped."""
    chunk_elements: int = CHUNK_ELEMENTS
    """Rows are quantized this many elements at a time (K-quant searches prefer cache-sized chunks)."""
    takes_bf16: bool = False
    """The compiled kernel reads bfloat16 rows as they are: a bfloat16 input is not copied to float32 first."""
    writes_out: bool = False
    """The compiled kernel takes ``out=`` (a uint8 ``[rows, row_bytes]`` tensor) and writes its bytes there."""
    compiled: str | None = None
    """``"module:function"`` of compiled kernels giving the same bytes (quant/jit.py), used when numba
    is available and imported on first use: ``function(w)``, and ``function_imatrix(w, quant_weights)``
    where ``imatrix == "used"`` and the legacy module keeps it apart."""

    def kernel(self) -> tuple[Callable[..., Tensor], int]:
        """The quantize function to run (``quantize``'s signature) and its row-chunk size in elements."""
        if self.compiled is None or not jit.available():
            return self.quantize, self.chunk_elements
        module_name, name = self.compiled.split(":")
        module = importlib.import_module(module_name)
        plain, weighted = getattr(module, name), getattr(module, f"{name}_imatrix", None)
        if weighted is None:
            return plain, JIT_CHUNK_ELEMENTS

        def run(w: Tensor, quant_weights: Tensor | None = None, **out: Tensor) -> Tensor:
            return plain(w, **out) if quant_weights is None else weighted(w, quant_weights)

        return run, JIT_CHUNK_ELEMENTS


CODECS: dict[str, Codec] = {}


def register_codec(name: str, codec: Codec) -> None:
    """Add ``codec`` for GGML type ``name``; a second registration of the same name is an error."""
    if name in CODECS:
        raise ValueError(f"a codec for {name} is already registered")
    ggml_type(name)
    CODECS[name] = codec


# ---- float types ------------------------------------------------------------------------------


def _f32_bytes(w: Tensor) -> Tensor:
    return w.to(torch.float32).contiguous().view(torch.uint8)


def _f16_bytes(w: Tensor) -> Tensor:
    return w.to(torch.float32).to(torch.float16).contiguous().view(torch.uint8)


def _bf16_bytes(w: Tensor) -> Tensor:
    """ggml ``fp32_to_bf16``: round to nearest even; a NaN keeps its sign and top bits and is made quiet."""
    n = w.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    rounded = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    quiet = ((n & 0xFFFF0000) | (64 << 16)) >> 16
    h = torch.where(nan, quiet, rounded)  # [0, 0xFFFF]
    return (((h + 0x8000) & 0xFFFF) - 0x8000).to(torch.int16).view(torch.uint8)


def _view_dequantize(dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    def dequantize(raw: Tensor) -> Tensor:
        if dtype == torch.bfloat16:
            return (raw.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)
        return raw.contiguous().view(dtype).to(torch.float32)

    return dequantize


register_codec("F32", Codec(_f32_bytes, _view_dequantize(torch.float32)))
register_codec("F16", Codec(_f16_bytes, _view_dequantize(torch.float16)))
register_codec("BF16", Codec(_bf16_bytes, _view_dequantize(torch.bfloat16)))
# Legacy types: an imatrix is ignored for Q8_0 (as in llama.cpp) and used for Q4_0 / Q4_1
# (quant/gguf_imatrix.py); the Q5_0 / Q5_1 `_impl` paths are not ported.
_LEGACY = {"scales_show_nonfinite": True, "writes_out": True}
_LEGACY_JIT = "quant.gguf_legacy_jit"
register_codec("Q8_0", Codec(lg.quantize_q8_0, lg.dequantize_q8_0, (0,), "ignored", **_LEGACY, takes_bf16=True,
                             compiled=f"{_LEGACY_JIT}:quantize_q8_0"))
register_codec("Q4_0", Codec(im.with_imatrix(lg.quantize_q4_0, im.quantize_q4_0_imatrix), lg.dequantize_q4_0, (0,),
                             "used", **_LEGACY, compiled=f"{_LEGACY_JIT}:quantize_q4_0"))
register_codec("Q4_1", Codec(im.with_imatrix(lg.quantize_q4_1, im.quantize_q4_1_imatrix), lg.dequantize_q4_1,
                             (0, 2), "used", **_LEGACY, compiled=f"{_LEGACY_JIT}:quantize_q4_1"))
register_codec("Q5_0", Codec(lg.quantize_q5_0, lg.dequantize_q5_0, (0,), "unsupported", **_LEGACY,
                             compiled=f"{_LEGACY_JIT}:quantize_q5_0"))
register_codec("Q5_1", Codec(lg.quantize_q5_1, lg.dequantize_q5_1, (0, 2), "unsupported", **_LEGACY,
                             compiled=f"{_LEGACY_JIT}:quantize_q5_1"))
# K-quants: the search passes prefer cache-sized chunks.
_KQUANT = {"chunk_elements": 1 << 18}
_KQUANT_JIT = "quant.gguf_kquants_jit"
register_codec("Q4_K", Codec(kq.quantize_q4_k, kq.dequantize_q4_k, (0, 2), "used", **_KQUANT,
                             compiled=f"{_KQUANT_JIT}:quantize_q4_k"))
register_codec("Q5_K", Codec(kq.quantize_q5_k, kq.dequantize_q5_k, (0, 2), "used", **_KQUANT,
                             compiled=f"{_KQUANT_JIT}:quantize_q5_k"))
register_codec("Q6_K", Codec(kq.quantize_q6_k, kq.dequantize_q6_k, (208,), "used", **_KQUANT,
                             compiled=f"{_KQUANT_JIT}:quantize_q6_k"))


# ---- public API ---------------------------------------------------------------------------------


def _codec(qtype: str) -> tuple[GGMLType, Codec]:
    t = ggml_type(qtype)
    return t, CODECS[t.name]


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

    ``qtype`` itself when ``cols`` is a multiple of its block; otherwise Q4_K -> Q5_0, Q5_K -> Q5_1,
    Q6_K -> Q8_0, and F16 when even the 32-element fallback (or a 32-block ``qtype``) does not fit.
    """
    t = ggml_type(qtype)
    if cols % t.block_size == 0:
        return t.name
    smaller = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}.get(t.name, t.name)
    return smaller if cols % ggml_type(smaller).block_size == 0 else "F16"


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
        used = sorted(k for k, c in CODECS.items() if c.imatrix == "used")
        raise UnsupportedError(
            f"importance-matrix quantization to {qtype} is not implemented; it is for {', '.join(used)}"
        )
    qw = torch.as_tensor(quant_weights, dtype=torch.float32).reshape(-1)
    if qw.numel() != cols:
        raise ConversionError(f"importance matrix has {qw.numel()} entries for rows of {cols} columns; they must match")
    _check_finite(qw, f"{qtype} (importance matrix)")
    return {"quant_weights": qw}


def quantize_tensor(t: Tensor, qtype: str, quant_weights: Tensor | None = None, threads: int | None = None,
                    out: Tensor | None = None) -> Tensor:
    """float ``[..., cols]`` -> uint8 ``[..., row_bytes(qtype, cols)]``, GGML type ``qtype``.

    ``quant_weights``: optional per-column importance ``[cols]`` (an imatrix entry, mean of squared
    activations); K-quants then follow llama.cpp's ``quantize_row_*_impl``, Q8_0 and float types ignore it.
    ``threads``: worker threads for the compiled kernels (default: every CPU available; the torch
    kernels always run on the calling thread). Callers that already run one quantization per thread
    pass 1. The bytes do not depend on it. ``out``: a contiguous CPU uint8 tensor with as many bytes to
    write the result into (reused buffers spare a fresh allocation's page faults on every call).
    """
    gt, codec = _codec(qtype)
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
    fn, chunk_elements = codec.kernel()
    step = max(1, chunk_elements // cols)
    compiled = fn is not codec.quantize
    keep = t.dtype == torch.bfloat16 and codec.takes_bf16 and compiled
    into = codec.writes_out and compiled

    def one(r0: int) -> None:
        rows, dst = rows2d[r0 : r0 + step], out[r0 : r0 + step]
        res = fn(rows if keep else rows.to(torch.float32), **kwargs, **({"out": dst} if into else {}))
        if res.data_ptr() != dst.data_ptr():
            dst.copy_(res)

    workers = 1 if fn is codec.quantize else threads or jit.default_threads()  # torch ports hold the GIL
    jit.parallel_for(one, range(0, rows2d.shape[0], step), workers, "quantize")
    _check_scales(out, gt, codec.scale_offsets, rows2d)
    return out.reshape(*t.shape[:-1], nbytes)


def dequantize_tensor(data: Tensor | np.ndarray, qtype: str, shape: tuple[int, ...] | list[int] | torch.Size) -> Tensor:
    """Raw bytes of a ``qtype`` tensor -> float32 of ``shape`` (last dim = row)."""
    gt, codec = _codec(qtype)
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
    return codec.dequantize(raw.reshape(-1, row_bytes(gt.name, shape[-1]))).reshape(shape)
