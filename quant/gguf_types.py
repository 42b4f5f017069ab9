"""The GGML tensor types this package reads and writes (one registry entry each), and llama.cpp's file types.

An entry (:class:`GGMLType`) carries every fact about its type: the ggml name and id, the block layout,
the codec (:class:`Codec`: quantize/dequantize, scale offsets, what an importance matrix does, the
compiled kernel), the type llama.cpp falls back to for rows that are not whole blocks, the verification
bound on a file that stores it, the ``general.file_type`` of a file of that type, and a one-line help.
The GGUF writer, reader, ``--type`` choices and help, and the verification bounds all read ``GGML_TYPES``.

The entries are registered at the end of this module, one :func:`register_type` statement each, so the
registry is complete whenever this module is imported. A new type (say IQ3_S) is one codec module in
``quant/`` (its ``quantize``/``dequantize`` on ``[rows, cols]``) plus two lines here: its import and its
``register_type(GGMLType(...))``.

Numbers follow gguf-py ``constants.py`` (``GGMLQuantizationType``, ``GGML_QUANT_SIZES``,
``LlamaFileType``) and ``ggml-common.h``; ``tests/test_gguf_quants.py`` checks them against the
installed ``gguf`` package. This module does not import ``gguf`` itself.

A block of ``block_size`` consecutive row elements is stored in ``type_size`` bytes; blocks run
along the contiguous row (ggml ``ne[0]``, the ``in_features`` of a ``[out, in]`` weight).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from gemma2_convert.core.errors import UnsupportedError, name_list
from quant import gguf_float as fl
from quant import gguf_imatrix as im
from quant import gguf_iq4 as iq
from quant import gguf_kquants as kq
from quant import gguf_kquants_low as kl
from quant import gguf_legacy as lg
from quant import jit

CHUNK_ELEMENTS = 1 << 20
"""Default row-chunk size (elements) of the torch quantizers; results do not depend on it."""
JIT_CHUNK_ELEMENTS = 1 << 20
"""Row-chunk size for the compiled kernels: one chunk per task of a worker thread."""
IMATRIX_USES = ("used", "ignored", "unsupported")


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
    """``"module:function"`` of compiled kernels giving the same bytes (quant/jit.py), imported on first
    use: ``function(w)``, and ``function_imatrix(w, quant_weights)`` where ``imatrix == "used"`` and the
    module keeps it apart."""

    def kernel(self, compiled: bool = True) -> tuple[Callable[..., Tensor], int]:
        """The quantize function to run (``quantize``'s signature) and its row-chunk size in elements: the
        compiled kernel when ``compiled`` is True, the type has one and numba is installed; else ``quantize``."""
        if not compiled or self.compiled is None or not jit.available():
            return self.quantize, self.chunk_elements
        module_name, name = self.compiled.split(":")
        module = importlib.import_module(module_name)  # deferred: the kernel modules import numba
        plain, weighted = getattr(module, name), getattr(module, f"{name}_imatrix", None)
        if weighted is None:
            return plain, JIT_CHUNK_ELEMENTS

        def run(w: Tensor, quant_weights: Tensor | None = None, **out: Tensor) -> Tensor:
            return plain(w, **out) if quant_weights is None else weighted(w, quant_weights)

        return run, JIT_CHUNK_ELEMENTS


@dataclass(frozen=True)
class GGMLType:
    """One GGML tensor type: its layout, its codec, and what the writer, verifier and CLI need to know."""

    name: str
    """The ggml type name, e.g. ``"Q4_K"``."""
    ggml_id: int
    """Value of ``gguf.GGMLQuantizationType`` / ``enum ggml_type``, written into the tensor info."""
    block_size: int
    """Row elements per block (1 for the float types)."""
    type_size: int
    """Bytes per block."""
    codec: Codec
    """How rows are encoded and decoded."""
    file_type: str
    """The ``FILE_TYPES`` name a file announces when its matrices are stored in this type."""
    help: str
    """One line for ``--help`` and the docs: what the type stores."""
    fallback: str = "F16"
    """The type llama.cpp's ``tensor_type_fallback`` stores a row that is not whole blocks as (F16 when
    that does not fit either; see ``quant.gguf_codec.fallback_type``)."""
    lossy_bound: tuple[float, float] | None = None
    """(max mean KL, min top-1 agreement) that verification demands of the reference's logits on a file
    whose loosest stored type is this one; None: exact (F32). Sanity checks that catch a broken file, not
    quality gates: about 2-3× llama.cpp's published mean KLD on LLaMA-3-8B (Q8_0 0.0014, Q6_K 0.0055,
    Q5_K_M 0.011, IQ4_XS 0.036, Q4_0 0.072; QUANT_FORMATS.md §7.1) and above what random tiny models give
    (Q8_0 2e-4, Q6_K 2e-3, Q5_0 1.1e-2, IQ4_XS 1.8e-2, Q4_0 4.4e-2, all top-1 100 %)."""
    min_sqnr_db: float = float("-inf")
    """The least SQNR (dB) verification accepts for one tensor stored in this type against its source: 6 dB
    (half the signal-to-noise amplitude ratio) under the least this package's codec gives on the trained
    fixture's matrices, a Gaussian and a Student-t(3) matrix (docs/VERIFY.md). A tensor below it is not
    quantization noise: a norm off by one, q and k swapped, another model's weights."""

    @property
    def bits_per_weight(self) -> float:
        """Storage cost per element, scales included."""
        return 8.0 * self.type_size / self.block_size

    @property
    def is_quantized(self) -> bool:
        """True for block-quantized types, False for F32/F16/BF16."""
        return self.block_size > 1


FILE_TYPES: dict[str, int] = {
    "ALL_F32": 0,
    "MOSTLY_F16": 1,
    "MOSTLY_Q4_0": 2,
    "MOSTLY_Q4_1": 3,
    "MOSTLY_Q8_0": 7,
    "MOSTLY_Q5_0": 8,
    "MOSTLY_Q5_1": 9,
    "MOSTLY_Q2_K": 10,
    "MOSTLY_Q3_K_S": 11,
    "MOSTLY_Q3_K_M": 12,
    "MOSTLY_Q3_K_L": 13,
    "MOSTLY_Q4_K_S": 14,
    "MOSTLY_Q4_K_M": 15,
    "MOSTLY_Q5_K_S": 16,
    "MOSTLY_Q5_K_M": 17,
    "MOSTLY_Q6_K": 18,
    "MOSTLY_IQ4_NL": 25,
    "MOSTLY_IQ4_XS": 30,
    "MOSTLY_BF16": 32,
}
"""``general.file_type`` values (llama.cpp ``enum llama_ftype`` / gguf-py ``LlamaFileType``); each is also
known by its name without the ``ALL_`` / ``MOSTLY_`` prefix (``"Q4_K_M"``)."""

GGML_TYPES: dict[str, GGMLType] = {}
"""The types handled by ``quant.gguf_codec``, keyed by ggml name, in ``--type`` order."""


def register_type(t: GGMLType) -> GGMLType:
    """Add ``t`` to ``GGML_TYPES``; a second type of the same name or ggml id, or an entry that names an
    unknown file type or fallback, is an error."""
    for other in GGML_TYPES.values():
        if t.name == other.name or t.ggml_id == other.ggml_id:
            raise ValueError(f"GGML type {t.name} (id {t.ggml_id}) clashes with the registered "
                             f"{other.name} (id {other.ggml_id}); each name and id is registered once")
    if t.file_type not in FILE_TYPES:
        raise ValueError(f"{t.name}: file_type {t.file_type!r} is not one of FILE_TYPES; add it there first")
    fb = GGML_TYPES.get(t.fallback)
    if t.is_quantized and (fb is None or fb.block_size >= t.block_size):
        raise ValueError(f"{t.name}: fallback {t.fallback!r} must be a registered type with a smaller block "
                         f"than {t.block_size}; register it before {t.name}")
    if t.codec.imatrix not in IMATRIX_USES:
        raise ValueError(f"{t.name}: codec.imatrix is {t.codec.imatrix!r}; expected one of {IMATRIX_USES}")
    if any(off + 2 > t.type_size for off in t.codec.scale_offsets):
        raise ValueError(f"{t.name}: scale offsets {t.codec.scale_offsets} run past the {t.type_size}-byte block")
    GGML_TYPES[t.name] = t
    return t


def ggml_type(name: str) -> GGMLType:
    """The GGMLType called ``name`` (case-insensitive); UnsupportedError lists the valid names."""
    key = name.upper()
    if key not in GGML_TYPES:
        raise UnsupportedError(
            f"unsupported GGML tensor type {name!r}; valid types: {name_list(GGML_TYPES)}"
        )
    return GGML_TYPES[key]


def file_type_id(name: str) -> int:
    """The ``general.file_type`` id for ``name`` (``"Q4_K_M"`` or ``"MOSTLY_Q4_K_M"``, case-insensitive)."""
    short = {k.split("_", 1)[1]: k for k in FILE_TYPES}  # "Q4_K_M" -> "MOSTLY_Q4_K_M"
    key = name.upper()
    key = short.get(key, key)
    if key not in FILE_TYPES:
        valid = list(FILE_TYPES) + list(short)
        raise UnsupportedError(f"unsupported GGUF file type {name!r}; valid names: {name_list(valid, 40)}")
    return FILE_TYPES[key]


# ---- the types ------------------------------------------------------------------------------------
# Float types: plain casts, no compiled kernel.
register_type(GGMLType("F32", 0, 1, 4, Codec(fl.quantize_f32, fl.dequantize_f32), "ALL_F32",
                       "float32, exact for any source", min_sqnr_db=120.0))
register_type(GGMLType("F16", 1, 1, 2, Codec(fl.quantize_f16, fl.dequantize_f16), "MOSTLY_F16",
                       "IEEE half float, exact for float16 weights", lossy_bound=(1e-3, 0.95),
                       min_sqnr_db=67.0))
register_type(GGMLType("BF16", 30, 1, 2, Codec(fl.quantize_bf16, fl.dequantize_bf16), "MOSTLY_BF16",
                       "bfloat16, exact for bfloat16 weights: Gemma 2's own dtype", lossy_bound=(2e-3, 0.95),
                       min_sqnr_db=49.0))
# Legacy 32-blocks: an imatrix is ignored for Q8_0 (as in llama.cpp) and used for Q4_0 / Q4_1 / Q5_0 / Q5_1
# (quant/gguf_imatrix.py).
_LEGACY = {"scales_show_nonfinite": True, "writes_out": True}
_LEGACY_JIT = "quant.gguf_legacy_jit"
register_type(GGMLType("Q8_0", 8, 32, 34, Codec(
    lg.quantize_q8_0, lg.dequantize_q8_0, (0,), "ignored", **_LEGACY, takes_bf16=True,
    compiled=f"{_LEGACY_JIT}:quantize_q8_0"), "MOSTLY_Q8_0",
    "8-bit codes, an fp16 scale per 32 weights; near lossless", lossy_bound=(1e-2, 0.9), min_sqnr_db=35.0))
register_type(GGMLType("Q4_0", 2, 32, 18, Codec(
    im.with_imatrix(lg.quantize_q4_0, im.quantize_q4_0_imatrix), lg.dequantize_q4_0, (0,), "used", **_LEGACY,
    compiled=f"{_LEGACY_JIT}:quantize_q4_0"), "MOSTLY_Q4_0",
    "4-bit codes, an fp16 scale per 32 weights", lossy_bound=(0.2, 0.7), min_sqnr_db=12.0))
register_type(GGMLType("Q4_1", 3, 32, 20, Codec(
    im.with_imatrix(lg.quantize_q4_1, im.quantize_q4_1_imatrix), lg.dequantize_q4_1, (0, 2), "used", **_LEGACY,
    compiled=f"{_LEGACY_JIT}:quantize_q4_1"), "MOSTLY_Q4_1",
    "4-bit codes, an fp16 scale and minimum per 32 weights", lossy_bound=(0.2, 0.7), min_sqnr_db=14.0))
register_type(GGMLType("Q5_0", 6, 32, 22, Codec(
    im.with_imatrix(lg.quantize_q5_0, im.quantize_q5_0_imatrix), lg.dequantize_q5_0, (0,), "used", **_LEGACY,
    compiled=f"{_LEGACY_JIT}:quantize_q5_0"), "MOSTLY_Q5_0",
    "5-bit codes, an fp16 scale per 32 weights", lossy_bound=(5e-2, 0.8), min_sqnr_db=17.0))
register_type(GGMLType("Q5_1", 7, 32, 24, Codec(
    im.with_imatrix(lg.quantize_q5_1, im.quantize_q5_1_imatrix), lg.dequantize_q5_1, (0, 2), "used", **_LEGACY,
    compiled=f"{_LEGACY_JIT}:quantize_q5_1"), "MOSTLY_Q5_1",
    "5-bit codes, an fp16 scale and minimum per 32 weights", lossy_bound=(5e-2, 0.8), min_sqnr_db=20.0))
# K-quants: 256-element super-blocks; the search passes prefer cache-sized chunks. A row that is not
# whole super-blocks falls back to a 32-block type as llama.cpp does.
_KQUANT = {"chunk_elements": 1 << 18}
_KQUANT_JIT = "quant.gguf_kquants_jit"
# Q2_K / Q3_K (quantize_q2_K / quantize_q3_K, with or without an imatrix): sixteen 16-weight sub-blocks per
# super-block; a row that is not whole super-blocks falls back to Q4_0 (tensor_type_fallback). Bounds: tiny
# random models (tests/gguf_helpers.py "kmix" and "fold", seeds 3 and 11) give 0.21-0.30 with every matrix Q2_K
# and 0.059-0.074 with every matrix Q3_K, top-1 100 % (Q4_K 0.011-0.017 on the same models); llama.cpp
# publishes no KLD for them, only perplexity (Llama-2-70B: Q2_K +8.8 %, Q3_K_S +7.9 %, Q4_K_S +1.6 %), so the
# bounds are about 3.3x the tiny-model maximum. The mixes (formats/gguf/mix.py) keep the embedding in Q6_K and
# give 0.008-0.012 (q2_k) and 0.004-0.005 (q3_k_s) there.
_LOW_JIT = "quant.gguf_kquants_low_jit"
register_type(GGMLType("Q2_K", 10, 256, 84, Codec(
    kl.quantize_q2_k, kl.dequantize_q2_k, (80, 82), "used", **_KQUANT, compiled=f"{_LOW_JIT}:quantize_q2_k"),
    "MOSTLY_Q2_K", "2-bit K-quant: 256-weight super-blocks, 4-bit scales and minimums per 16",
    fallback="Q4_0", lossy_bound=(1.0, 0.5), min_sqnr_db=3.0))
register_type(GGMLType("Q3_K", 11, 256, 110, Codec(
    kl.quantize_q3_k, kl.dequantize_q3_k, (108,), "used", **_KQUANT, compiled=f"{_LOW_JIT}:quantize_q3_k"),
    "MOSTLY_Q3_K_S", "3-bit K-quant: 256-weight super-blocks, 6-bit scales per 16",
    fallback="Q4_0", lossy_bound=(0.25, 0.6), min_sqnr_db=8.0))
register_type(GGMLType("Q4_K", 12, 256, 144, Codec(
    kq.quantize_q4_k, kq.dequantize_q4_k, (0, 2), "used", **_KQUANT, compiled=f"{_KQUANT_JIT}:quantize_q4_k"),
    "MOSTLY_Q4_K_S", "4-bit K-quant: 256-weight super-blocks, 6-bit scales and minimums per 32",
    fallback="Q5_0", lossy_bound=(0.2, 0.7), min_sqnr_db=14.0))
register_type(GGMLType("Q5_K", 13, 256, 176, Codec(
    kq.quantize_q5_k, kq.dequantize_q5_k, (0, 2), "used", **_KQUANT, compiled=f"{_KQUANT_JIT}:quantize_q5_k"),
    "MOSTLY_Q5_K_S", "5-bit K-quant: Q4_K's super-blocks with one more bit per weight",
    fallback="Q5_1", lossy_bound=(5e-2, 0.8), min_sqnr_db=20.0))
register_type(GGMLType("Q6_K", 14, 256, 210, Codec(
    kq.quantize_q6_k, kq.dequantize_q6_k, (208,), "used", **_KQUANT, compiled=f"{_KQUANT_JIT}:quantize_q6_k"),
    "MOSTLY_Q6_K", "6-bit K-quant: 256-weight super-blocks, 8-bit scales per 16",
    fallback="Q8_0", lossy_bound=(2e-2, 0.85), min_sqnr_db=26.0))
# Non-linear 4-bit (llama.cpp's quantize_iq4_nl / quantize_iq4_xs: the same weighted search with or
# without an imatrix). An IQ4_XS row that is not whole super-blocks falls back to IQ4_NL; an IQ4_NL row
# that is not whole blocks to F16, as llama.cpp's tensor_type_fallback does. Bound: llama.cpp's mean KLD
# on LLaMA-3-8B is 0.036 for both (with an imatrix; Q4_K_S without one 0.043), tiny random models give
# 0.014-0.017 (IQ4_NL) and 0.015-0.018 (IQ4_XS), top-1 100 % (tests/gguf_helpers.py "kmix" and "fold",
# seeds 3 and 11; Q4_K 0.011-0.017 and Q4_0 0.018-0.023 on the same models), so 0.1 is 2.8x the first.
_IQ4_JIT = "quant.gguf_iq4_jit"
register_type(GGMLType("IQ4_NL", 20, 32, 18, Codec(
    iq.quantize_iq4_nl, iq.dequantize_iq4_nl, (0,), "used", compiled=f"{_IQ4_JIT}:quantize_iq4_nl"),
    "MOSTLY_IQ4_NL", "4-bit codes on a non-linear 16-value grid, an fp16 scale per 32 weights",
    lossy_bound=(0.1, 0.75), min_sqnr_db=14.0))
register_type(GGMLType("IQ4_XS", 23, 256, 136, Codec(
    iq.quantize_iq4_xs, iq.dequantize_iq4_xs, (0,), "used", compiled=f"{_IQ4_JIT}:quantize_iq4_xs"),
    "MOSTLY_IQ4_XS", "IQ4_NL's grid in 256-weight super-blocks, 6-bit scales per 32",
    fallback="IQ4_NL", lossy_bound=(0.1, 0.75), min_sqnr_db=14.0))
