"""Q2_K / Q3_K (quant/gguf_kquants_low.py, quant/gguf_kquants_low_jit.py): llama.cpp's bytes, gguf-py's
dequantization.

* Bytes vs llama.cpp's own quantizer (``ggml_quantize_chunk`` from llama-cpp-python's ``libggml-base``, i.e.
  ``quantize_q2_K`` / ``quantize_q3_K``), with and without importance weights, on Gaussian, heavy-tailed, grid
  (rounding ties), all-negative, sparse, per-sub-block magnitudes from 1e-30 to 1e4, and structured rows;
  both the numba kernel and the torch port. Measured: every block identical. The all-negative rows with
  importances over 20 decades are the case where Q2_K's least-squares scales turn negative and C's
  ``make_qp_quants`` stores negative levels modulo 256 in its ``uint8_t L[]``: the port does the same.
* The compiled kernel equals the torch port byte for byte on whatever ``quantize_tensor`` accepts; both refuse
  non-finite input and values whose fp16 scales overflow.
* Dequantization equals gguf-py's bit for bit; the registry entries equal gguf-py's constants.
"""

from __future__ import annotations

import ctypes
import os

import gguf
import numpy as np
import pytest
import torch

from gemma2_convert.core.errors import ConversionError
from quant import gguf_kquants_low as lo
from quant import gguf_types
from quant.gguf_codec import dequantize_tensor, fallback_type, quantize_tensor
from quant.gguf_kquants import seq_sum
from quant.gguf_types import GGML_TYPES, file_type_id, ggml_type
from tests.gguf_helpers import diff_blocks, importance

TYPES = {"Q2_K": 84, "Q3_K": 110}
F32 = np.float32
KINDS = ["gauss", "heavy", "grid", "negative", "sparse", "scales", "structured"]

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _data(kind: str, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = shape
    if kind == "gauss":
        a = rng.standard_normal(shape) * 0.02
    elif kind == "heavy":  # Cauchy, and outliers up to 1e4 times the rest in some sub-blocks
        a = rng.standard_t(1, shape) * 1e-3
        idx = rng.integers(0, a.size, a.size // 50)
        a.flat[idx] *= 10.0 ** rng.uniform(0, 4, idx.size)
    elif kind == "grid":  # small multiples of 1/2: exact rounding ties everywhere
        a = rng.integers(-3, 4, shape) * 0.5
    elif kind == "negative":  # all negative: least-squares scales can turn negative
        a = -np.abs(rng.standard_normal(shape))
    elif kind == "sparse":
        a = (rng.random(shape) < 0.05) * rng.standard_normal(shape)
    elif kind == "scales":  # sub-blocks of very different magnitude, below the 1e-15 all-zero threshold too
        a = rng.standard_normal(shape) * 10.0 ** rng.uniform(-30, 4, (rows, cols // 16)).repeat(16, 1)
    else:  # "structured": zero rows and super-blocks, constant sub-blocks, x and -x ties, one nonzero
        a = rng.standard_normal(shape)
        a[0] = 0
        a[1] = 0.5
        a[2, :16] = -0.75
        a[2, 16:48] = 0
        a[2, 20] = 3.0
        a[3, :256] = 0
        a[4, :8] = -a[4, 8:16]
        a[5, ::2] = 0
    return np.ascontiguousarray(a, dtype=F32)


def test_nearest_int_is_the_c_bit_trick():
    """Round half to even inside the assert's range; beyond it (and for inf / NaN) C's out-of-range integers."""
    v = np.concatenate([np.arange(-20, 20, 0.25), [4194303.0, -4194303.0, 4194304.5, 1e7, -3e9, 1e30, -1e30],
                        [np.inf, -np.inf, np.nan, -0.0, 2.5, 3.5, -2.5]]).astype(F32)
    c = ((v + F32(12582912.0)).view(np.int32) & 0x7FFFFF) - 0x400000
    got = lo.nearest_int(torch.from_numpy(v)).numpy()
    assert np.array_equal(got, c.astype(F32))
    inside = np.abs(v) <= 4194303
    assert np.array_equal(got[inside], np.rint(v[inside]))


# ---- bytes vs llama.cpp's quantizer ----------------------------------------------------------

import llama_cpp  # a real client: missing in CI is a failure, not a skip


@pytest.fixture(scope="module")
def ggml_quantize_chunk():
    """llama.cpp's ``ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)``, via ctypes."""
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_void_p]

    def run(qtype: str, x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
        t = ggml_type(qtype)
        out = np.zeros((x.shape[0], x.shape[1] // t.block_size * t.type_size), np.uint8)
        n = f(t.ggml_id, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
              None if qw is None else qw.ctypes.data)
        assert n == out.size, f"ggml_quantize_chunk({qtype}) wrote {n} bytes, expected {out.size}"
        return out

    return run


@pytest.mark.parametrize("imatrix", ["none", "mean_sq", "zeros", "wide"])
@pytest.mark.parametrize("qtype", list(TYPES))
def test_bytes_equal_llama_cpp(ggml_quantize_chunk, qtype: str, imatrix: str):
    """``quantize_tensor`` (compiled and torch port) vs ``quantize_q2_K`` / ``quantize_q3_K`` on the same rows."""
    n_blocks = n_diff = 0
    first = ""
    for n, kind in enumerate(KINDS):
        shape = (64, 2304) if kind in ("gauss", "heavy", "negative") else (24, 512)
        x = _data(kind, shape, seed=n)
        qw = importance(imatrix, shape[1], seed=n + 10, decades=20)
        want = ggml_quantize_chunk(qtype, x, qw)
        for compiled in (True, False):
            ours = quantize_tensor(torch.from_numpy(x), qtype, None if qw is None else torch.from_numpy(qw),
                                   threads=1, compiled=compiled).numpy()
            d, b, where = diff_blocks(ours, want, TYPES[qtype])
            n_blocks, n_diff = n_blocks + b, n_diff + d
            first = first or (f"{kind} compiled={compiled}: {where}" if d else "")
    print(f"{qtype} imatrix={imatrix}: {n_blocks - n_diff}/{n_blocks} blocks identical to llama.cpp")
    assert n_diff <= n_blocks // 1000, (
        f"{qtype} imatrix={imatrix}: {n_diff}/{n_blocks} blocks differ; first {first}")


def test_negative_scales_wrap_as_in_c(ggml_quantize_chunk):
    """All-negative rows, importances over 20 decades: some Q2_K sub-block scales come out negative and C's
    ``make_qp_quants`` keeps their levels modulo 256 (``uint8_t L[]``) and reads them back so; the bytes agree
    (two super-blocks of this input differ if the levels are kept unwrapped)."""
    x, qw = _data("negative", (128, 2048), seed=8), importance("wide", 2048, seed=9, decades=20)
    xs = torch.from_numpy(x).reshape(128, 8, 256)
    xt = xs.reshape(-1, 16).T.contiguous()  # [16, B]: sub-blocks element-major
    wt = lo.imatrix_weights(xs, xt, torch.from_numpy(qw), 1.0)
    scale, _, _ = lo.make_qkx_quants(xt, wt, 3, (-0.9, 0.05, 36), mad=False)
    _, levels = lo.make_qp_quants(scale.reshape(-1, 16).T.contiguous(), 15, seq_sum(wt).reshape(-1, 16).T)
    assert int((levels > 15).sum()) > 0, "this input no longer produces wrapped (negative) levels"
    want = ggml_quantize_chunk("Q2_K", x, qw)
    for compiled in (True, False):
        ours = quantize_tensor(torch.from_numpy(x), "Q2_K", torch.from_numpy(qw), threads=1, compiled=compiled)
        d, b, where = diff_blocks(ours.numpy(), want, 84)
        assert d == 0, f"compiled={compiled}: {d}/{b} blocks differ; first {where}"


# ---- dequantization, layout, kernels, registry ------------------------------------------------


@pytest.mark.parametrize("qtype", list(TYPES))
def test_dequantize_matches_gguf_py(qtype: str):
    for kind in ("gauss", "structured", "grid", "negative", "scales"):
        x = _data(kind, (16, 512), seed=3)
        raw = quantize_tensor(torch.from_numpy(x), qtype)
        ours = dequantize_tensor(raw, qtype, x.shape).numpy()
        ref = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[qtype]).reshape(x.shape).astype(F32)
        same = ours.view(np.uint32) == ref.view(np.uint32)
        i = np.unravel_index(np.argmin(same), same.shape)
        assert same.all(), (
            f"{qtype}/{kind}: {int((~same).sum())} values differ; first {i}: ours {ours[i]} gguf-py {ref[i]}")
        if kind == "gauss":  # a 2- / 3-bit quantization of x
            rel = np.sqrt(((ours - x) ** 2).mean() / (x**2).mean())
            lo_hi = (0.25, 0.45) if qtype == "Q2_K" else (0.12, 0.25)
            assert lo_hi[0] < rel < lo_hi[1], f"{qtype}: relative RMS error {rel}"


def test_two_bit_packing():
    """Bits 2k of byte ``32h + l`` hold element ``128h + 32k + l``."""
    e = torch.arange(256)
    q = ((e // 32) % 4).to(torch.uint8).reshape(1, 256)  # element 128h + 32k + l has code k
    assert lo.pack_2bit(q).tolist() == [[0 | 1 << 2 | 2 << 4 | 3 << 6] * 64]
    r = torch.randint(0, 4, (3, 2, 256), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert torch.equal(lo.unpack_2bit(lo.pack_2bit(r)), r)


def test_q3_k_layout():
    """hmask bit ``e // 32`` of byte ``e % 32`` = bit 2 of code e; ls_j's low nibble in nibble ``j // 8`` of byte
    ``j % 8``, its top bits at bits ``2(j // 4)`` of byte ``8 + j % 4``; x = d*(ls_j-32)*(q-4)."""
    ls = torch.tensor([[[0, 63, 17, 32, 48, 1, 62, 33, 5, 40, 31, 16, 47, 15, 60, 2]]], dtype=torch.uint8)
    q = (torch.arange(256) % 8).to(torch.uint8).reshape(1, 1, 256)
    raw = lo.pack_q3_k(torch.tensor([[0.5]], dtype=torch.float16), ls, q)
    hmask, scales = raw[0, :32], raw[0, 96:108]
    assert hmask.tolist() == [0xFF if (l % 8) >= 4 else 0 for l in range(32)]
    low = [int(v) & 15 for v in ls[0, 0]]
    assert scales[:8].tolist() == [low[k] | low[k + 8] << 4 for k in range(8)]
    high = [int(v) >> 4 for v in ls[0, 0]]
    assert scales[8:].tolist() == [sum(high[4 * g + r] << 2 * g for g in range(4)) for r in range(4)]
    assert torch.equal(lo.unpack_q3_scales(scales), ls[0, 0])
    x = lo.dequantize_q3_k(raw.reshape(1, -1)).reshape(16, 16)
    want = 0.5 * (ls[0, 0].float() - 32).unsqueeze(-1) * (q.reshape(16, 16).float() - 4)
    assert torch.equal(x, want)


def _cases() -> dict[str, np.ndarray]:
    cases = {kind: _data(kind, (33, 512), seed=7) for kind in KINDS}
    cases["transposed"] = np.ascontiguousarray(_data("gauss", (512, 6)).T)
    cases["one_block"] = _data("heavy", (1, 256))
    return cases


@pytest.mark.parametrize("qtype", list(TYPES))
def test_compiled_equals_torch_port(qtype: str):
    import quant.gguf_kquants_low_jit as jit
    name = "quantize_" + qtype.lower()
    fast, port = getattr(jit, name), getattr(lo, name)
    for kind, x in _cases().items():
        for imatrix in ("none", "mean_sq", "zeros", "wide"):
            qw = importance(imatrix, x.shape[1], decades=20)
            qw = None if qw is None else torch.from_numpy(qw)
            got, want = fast(torch.from_numpy(x), qw), port(torch.from_numpy(x), qw)
            d, b, where = diff_blocks(got.numpy(), want.numpy(), TYPES[qtype])
            assert d == 0, f"{qtype} {kind} imatrix={imatrix}: {d}/{b} blocks differ; first {where}"
    assert fast(torch.zeros(0, 256)).shape == (0, TYPES[qtype])


@pytest.mark.parametrize("qtype", list(TYPES))
def test_extreme_values(ggml_quantize_chunk, qtype: str):
    """NaN / inf input is refused on both paths. Huge finite values are refused where an fp16 scale overflows
    and stored as llama.cpp stores them otherwise: Q3_K without importances gives a row with |x| past ~7e12
    (x³ overflows float32, so no sub-block scale is finite) zero scales, as C does, and verification then
    catches the file."""
    rng = np.random.default_rng(5)
    nan = rng.standard_normal((6, 512)).astype(F32)
    nan[4, 17] = np.nan
    for compiled in (True, False):
        with pytest.raises(ConversionError, match="non-finite"):
            quantize_tensor(torch.from_numpy(nan), qtype, compiled=compiled)
    refused = 0
    for m in (1e4, 1e6, 1e20, 1e30):
        x = np.clip(rng.standard_normal((4, 512)), -4, 4).astype(F32) * F32(m)
        for qw in (None, np.ones(512, F32)):
            outcome = []
            for compiled in (True, False):
                try:
                    outcome.append(quantize_tensor(torch.from_numpy(x), qtype, None if qw is None else
                                                   torch.from_numpy(qw), compiled=compiled).numpy())
                except ConversionError as e:
                    assert "overflow fp16" in str(e), e
                    outcome.append(None)
            label = f"{qtype} |x| ~ {m:g}, imatrix {qw is not None}"
            if outcome[0] is None or outcome[1] is None:
                assert outcome[0] is None and outcome[1] is None, f"{label}: only one path refused"
                refused += 1
            else:
                d, b, where = diff_blocks(outcome[0], ggml_quantize_chunk(qtype, x, qw), TYPES[qtype])
                assert d == 0 and np.array_equal(outcome[0], outcome[1]), f"{label}: {d}/{b} differ; {where}"
    assert refused >= 2  # at least |x| ~ 1e30 with and without importances for Q2_K, with them for Q3_K


@pytest.mark.parametrize("qtype", list(TYPES))
def test_quantize_tensor_threads_and_chunks(qtype: str, monkeypatch):
    w = torch.randn(96, 2048, generator=torch.Generator().manual_seed(2))
    w[::7] *= 40
    w[3, :64] = 0
    w = w.to(torch.bfloat16)
    qw = torch.rand(2048, generator=torch.Generator().manual_seed(3)) * 10
    monkeypatch.setattr(gguf_types, "JIT_CHUNK_ELEMENTS", 5 * 2048)  # many chunks, a short last one
    for q in (None, qw):
        want = quantize_tensor(w, qtype, quant_weights=q, compiled=False)
        for threads in (1, 3):
            got = quantize_tensor(w, qtype, quant_weights=q, threads=threads, compiled=True)
            assert torch.equal(got, want), (qtype, threads, q is not None)


def test_registry_entries_and_fallbacks():
    q2, q3 = GGML_TYPES["Q2_K"], GGML_TYPES["Q3_K"]
    gqt = gguf.GGMLQuantizationType
    assert (q2.ggml_id, q3.ggml_id) == (10, 11) == (gqt.Q2_K, gqt.Q3_K)
    assert (q2.block_size, q2.type_size) == gguf.GGML_QUANT_SIZES[gqt.Q2_K] == (256, 84)
    assert (q3.block_size, q3.type_size) == gguf.GGML_QUANT_SIZES[gqt.Q3_K] == (256, 110)
    assert (q2.bits_per_weight, q3.bits_per_weight) == (2.625, 3.4375)
    lft = gguf.LlamaFileType
    assert file_type_id("Q2_K") == lft.MOSTLY_Q2_K.value == 10
    assert [file_type_id(f"Q3_K_{s}") for s in "SML"] == [lft.MOSTLY_Q3_K_S, lft.MOSTLY_Q3_K_M, lft.MOSTLY_Q3_K_L]
    assert [file_type_id(f"Q3_K_{s}") for s in "SML"] == [11, 12, 13]
    assert (file_type_id("Q4_K_S"), file_type_id("Q5_K_S"), file_type_id("Q6_K"), file_type_id("IQ4_XS")) == (
        lft.MOSTLY_Q4_K_S, lft.MOSTLY_Q5_K_S, lft.MOSTLY_Q6_K, lft.MOSTLY_IQ4_XS) == (14, 16, 18, 30)
    assert q2.codec.imatrix == q3.codec.imatrix == "used"
    # llama-quant.cpp tensor_type_fallback: Q2_K / Q3_K -> Q4_0, then F16 where 32 does not divide either
    for qtype in TYPES:
        assert [fallback_type(qtype, c) for c in (512, 288, 100)] == [qtype, "Q4_0", "F16"]


def test_bad_shapes():
    import quant.gguf_kquants_low_jit as jit
    with pytest.raises(ValueError, match="multiple of the K-quant block size 256"):
        lo.quantize_q3_k(torch.zeros(2, 288))
    with pytest.raises(ValueError, match="multiple of the K-quant block size 256"):
        jit.quantize_q2_k(torch.zeros(2, 288))
    with pytest.raises(ValueError, match="quant_weights has 512 values"):
        jit.quantize_q3_k(torch.zeros(2, 256), torch.ones(512))
