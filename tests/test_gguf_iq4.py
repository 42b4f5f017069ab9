"""IQ4_NL / IQ4_XS (quant/gguf_iq4.py, quant/gguf_iq4_jit.py): llama.cpp's bytes, gguf-py's dequantization.

* Bytes vs llama.cpp's own quantizer (``ggml_quantize_chunk`` from llama-cpp-python's ``libggml-base``,
  i.e. ``quantize_iq4_nl`` / ``quantize_iq4_xs``), with and without importance weights, on Gaussian,
  heavy-tailed, grid (rounding ties), structured and extreme-scale rows; both the numba kernel and the
  torch port. Measured: every block identical. Finite rows whose squares overflow float32 (|x| > 1.8e19)
  are the one known difference: llama.cpp's IQ4_XS skips the NaN scales and writes blocks with d = -0,
  ours keeps the NaN and ``quantize_tensor`` refuses the tensor (tested below).
* ``llama_model_quantize`` (pure IQ4_XS) on a tiny model with 288-wide rows: its per-tensor types (IQ4_XS,
  and IQ4_NL where a row is not whole super-blocks) and bytes equal ``to_gguf --type iq4_xs``; llama.cpp
  runs our file with top-1 agreement against the reference.
* Dequantization equals gguf-py's bit for bit; the compiled kernel equals the torch port byte for byte.
"""

from __future__ import annotations

import ctypes
import os

import gguf
import numpy as np
import pytest
import torch

from gemma2_convert.core.errors import ConversionError
from quant import gguf_iq4 as iq
from quant import gguf_types
from quant.gguf_codec import dequantize_tensor, fallback_type, quantize_tensor
from quant.gguf_types import GGML_TYPES, file_type_id, ggml_type
from tests.gguf_helpers import diff_blocks, importance, llama_logits

TYPES = {"IQ4_NL": 18, "IQ4_XS": 136}
F32 = np.float32

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _data(kind: str, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = shape
    if kind == "gauss":
        a = rng.standard_normal(shape) * 0.02
    elif kind == "heavy":  # student-t(2) and a few huge outliers
        a = rng.standard_t(2, shape) * 1e-3
        idx = rng.integers(0, a.size, max(3, a.size // 500))
        a.flat[idx] = rng.choice([-1.0, 1.0], idx.size) * rng.uniform(0.05, 5, idx.size)
    elif kind == "grid":  # small integers and half-integers: exact midpoints and rounding ties everywhere
        a = rng.integers(-8, 9, shape) / rng.choice([1.0, 2.0, 4.0], (rows, cols // 16)).repeat(16, 1)
    elif kind == "scales":  # blocks of very different magnitude, down to the 1e-15 all-zero threshold
        mags = rng.choice([1e-20, 1e-15, 1e-9, 1e-3, 1.0, 3e3], (rows, cols // 32)).repeat(32, 1)
        a = rng.standard_normal(shape) * mags
    elif kind == "tiny":  # x*x underflows; scales flush to fp16 subnormals and zero
        a = rng.standard_normal(shape) * 1e-30
    elif kind == "positive":
        a = np.abs(rng.standard_normal(shape)) + rng.uniform(0, 3, (rows, cols // 32)).repeat(32, 1)
    else:  # "structured": zero rows and super-blocks, constant blocks, single nonzeros, max/-max ties
        a = rng.standard_normal(shape)
        a[0] = 0
        a[1] = 0.5
        a[2, :32] = -0.75
        a[2, 32:64] = 0
        a[2, 40] = 3.0
        a[2, 64:96] = -0.0
        a[3 % rows, :256] = 0
        a[4 % rows, :16] = -a[4 % rows, 16:32]  # x and -x in one block: the first one sets the sign
        a[5 % rows, ::2] = 0
    return np.ascontiguousarray(a, dtype=F32)


# ---- the codebook look-up --------------------------------------------------------------------


def _best_index_c(x: np.float32) -> int:
    """ggml ``best_index_int8(16, kvalues_iq4nl, x)``, line for line in float32."""
    val = [F32(v) for v in iq.KVALUES]
    if x <= val[0]:
        return 0
    if x >= val[15]:
        return 15
    ml, mu = 0, 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < val[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if F32(x - val[mu - 1]) < F32(val[mu] - x) else mu


def test_best_index_equals_the_c_search():
    """Around every midpoint and code (10 float32 neighbours each side), a grid, and NaN / inf / -0.0."""
    points = [F32(p) for p in iq.MIDPOINTS + iq.KVALUES]
    near = []
    for p in points:
        lo = hi = p
        for _ in range(10):
            lo, hi = np.nextafter(lo, F32(-np.inf)), np.nextafter(hi, F32(np.inf))
            near += [lo, hi]
    grid = np.linspace(-140, 130, 20001, dtype=F32)
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-30, -1e-30, 3e38, -3e38], F32)
    x = np.concatenate([np.array(points + near, F32), grid, special])
    want = np.array([_best_index_c(v) for v in x])
    got = iq.best_index(torch.from_numpy(x)).numpy()
    bad = np.nonzero(got != want)[0]
    assert not len(bad), f"{len(bad)} differ; first x={x[bad[0]]!r}: ours {got[bad[0]]} C {want[bad[0]]}"
    values = iq.codebook_value(torch.from_numpy(x)).numpy()
    assert np.array_equal(values, np.array(iq.KVALUES, F32)[want])


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


KINDS = ["gauss", "heavy", "grid", "scales", "tiny", "positive", "structured"]


@pytest.mark.parametrize("imatrix", ["none", "mean_sq", "zeros", "wide"])
@pytest.mark.parametrize("qtype", list(TYPES))
def test_bytes_equal_llama_cpp(ggml_quantize_chunk, qtype: str, imatrix: str):
    """``quantize_tensor`` (compiled and torch port) vs ``quantize_iq4_*`` on the same float32 rows."""
    n_blocks = n_diff = 0
    first = ""
    for n, kind in enumerate(KINDS):
        shape = (64, 2304) if kind in ("gauss", "heavy") else (24, 512)
        x = _data(kind, shape, seed=n)
        qw = importance(imatrix, shape[1], seed=n + 10)
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


def test_squares_overflowing_are_refused(ggml_quantize_chunk):
    """|x| ~ 1e30: x*x is inf, the block scales NaN. llama.cpp's IQ4_XS skips NaN scales and stores d = -0
    (its bytes then differ from ours); we keep the NaN, and quantize_tensor refuses the tensor."""
    x = np.ascontiguousarray(np.clip(np.random.default_rng(0).standard_normal((4, 512)), -4, 4) * 1e30, F32)
    c = ggml_quantize_chunk("IQ4_XS", x, None).reshape(-1, 136)
    assert (c[:, :2] == [0x00, 0x80]).all()  # llama.cpp: d = -0.0 in every super-block
    for qtype in TYPES:
        for compiled in (True, False):
            with pytest.raises(ConversionError, match="overflow fp16"):
                quantize_tensor(torch.from_numpy(x), qtype, compiled=compiled)


# ---- dequantization, kernels, registry -------------------------------------------------------


@pytest.mark.parametrize("qtype", list(TYPES))
def test_dequantize_matches_gguf_py(qtype: str):
    for kind in ("gauss", "structured", "grid", "tiny", "scales"):
        x = _data(kind, (16, 512), seed=3)
        raw = quantize_tensor(torch.from_numpy(x), qtype)
        ours = dequantize_tensor(raw, qtype, x.shape).numpy()
        ref = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[qtype])
        ref = ref.reshape(x.shape).astype(F32)
        same = ours.view(np.uint32) == ref.view(np.uint32)
        i = np.unravel_index(np.argmin(same), same.shape)
        assert same.all(), (
            f"{qtype}/{kind}: {int((~same).sum())} values differ; first {i}: ours {ours[i]} gguf-py {ref[i]}")
        if kind == "gauss":  # and it is a 4-bit quantization of x: relative RMS error ~ 0.1
            rel = np.sqrt(((ours - x) ** 2).mean() / (x**2).mean())
            assert 0.05 < rel < 0.15, f"{qtype}: relative RMS error {rel}"


def test_xs_scales_layout():
    """IQ4_XS's 6-bit scales: low nibbles in scales_l (two per byte), top bits in scales_h (2 bits each)."""
    d = torch.tensor([[1.0]], dtype=torch.float16)
    ls = torch.tensor([[[0, 63, 17, 32, 48, 1, 62, 33]]], dtype=torch.uint8)
    raw = iq.pack_iq4_xs(d, ls, torch.full((1, 1, 256), 8, dtype=torch.uint8))
    assert raw[0, 4:8].tolist() == [0 | 15 << 4, 1 | 0 << 4, 0 | 1 << 4, 14 | 1 << 4]
    high = sum((v >> 4) << (2 * j) for j, v in enumerate(ls[0, 0].tolist()))
    assert int(raw[0, 2]) | int(raw[0, 3]) << 8 == high == 0b10_11_00_11_10_01_11_00  # sub-block 7 first
    x = iq.dequantize_iq4_xs(raw).reshape(8, 32)
    assert torch.equal(x[:, 0], (ls[0, 0].float() - 32) * iq.KVALUES[8])


@pytest.mark.parametrize("qtype", list(TYPES))
def test_compiled_equals_torch_port(qtype: str):
    """Including what the codec refuses before or after (NaN / inf input, squares overflowing)."""
    import quant.gguf_iq4_jit as jit
    name = "quantize_" + qtype.lower()
    fast, port = getattr(jit, name), getattr(iq, name)
    rng = np.random.default_rng(5)
    bad = rng.standard_normal((6, 512)).astype(F32)
    bad.flat[rng.integers(0, bad.size, 6)] = [np.nan, np.inf, -np.inf, np.nan, np.inf, -np.inf]
    bad[-1, :64] *= F32(1e-18)
    cases = {kind: _data(kind, (33, 512), seed=7) for kind in KINDS}
    huge = np.clip(rng.standard_normal((5, 512)), -4, 4).astype(F32) * F32(1e30)
    cases |= {"nonfinite": bad, "overflow": huge, "transposed": _data("gauss", (512, 6)).T,
              "one_block": _data("heavy", (1, 256))}
    for kind, x in cases.items():
        for imatrix in ("none", "mean_sq", "zeros", "wide"):
            qw = importance(imatrix, x.shape[1])
            qw = None if qw is None else torch.from_numpy(qw)
            got, want = fast(torch.from_numpy(x), qw), port(torch.from_numpy(x), qw)
            d, b, where = diff_blocks(got.numpy(), want.numpy(), TYPES[qtype])
            assert d == 0, f"{qtype} {kind} imatrix={imatrix}: {d}/{b} blocks differ; first {where}"
    assert fast(torch.zeros(0, 256)).shape == (0, 136 if qtype == "IQ4_XS" else 144)


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
    nan = torch.randn(8, 256)
    nan[5, 17] = float("nan")
    for compiled in (False, True):
        with pytest.raises(ConversionError, match="non-finite"):
            quantize_tensor(nan, qtype, compiled=compiled)


def test_registry_entries_and_fallbacks():
    nl, xs = GGML_TYPES["IQ4_NL"], GGML_TYPES["IQ4_XS"]
    gqt = gguf.GGMLQuantizationType
    assert (nl.ggml_id, xs.ggml_id) == (20, 23) == (gqt.IQ4_NL, gqt.IQ4_XS)
    assert (nl.bits_per_weight, xs.bits_per_weight) == (4.5, 4.25)
    assert file_type_id("IQ4_NL") == gguf.LlamaFileType.MOSTLY_IQ4_NL.value == 25
    assert file_type_id("iq4_xs") == gguf.LlamaFileType.MOSTLY_IQ4_XS.value == 30
    assert nl.codec.imatrix == xs.codec.imatrix == "used"
    # llama-quant.cpp tensor_type_fallback: IQ4_XS -> IQ4_NL, then F16 where 32 does not divide either
    assert [fallback_type("IQ4_XS", c) for c in (512, 288, 100)] == ["IQ4_XS", "IQ4_NL", "F16"]
    assert [fallback_type("IQ4_NL", c) for c in (64, 48)] == ["IQ4_NL", "F16"]


def test_bad_shapes():
    import quant.gguf_iq4_jit as jit
    with pytest.raises(ValueError, match="multiple of the IQ4_XS block size 256"):
        iq.quantize_iq4_xs(torch.zeros(2, 288))
    with pytest.raises(ValueError, match="multiple of the IQ4_NL block size 32"):
        jit.quantize_iq4_nl(torch.zeros(2, 48))
    with pytest.raises(ValueError, match="quant_weights has 512 values"):
        jit.quantize_iq4_xs(torch.zeros(2, 256), torch.ones(512))


# ---- whole files: llama-quantize's choice and bytes, llama.cpp runs ours -----------------------

N_TOKENS = 48


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A tiny Gemma 2 with 288-wide rows (q/k/v/gate/up and the embedding: IQ4_XS falls back to IQ4_NL)
    and 256/512-wide ones (o_proj, down_proj: IQ4_XS)."""
    from reference.config import Gemma2Config
    from tests.gguf_helpers import VOCAB, write_model

    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=288, intermediate_size=512, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
                       sliding_window=16, max_position_embeddings=256, torch_dtype="float32")
    return write_model(tmp_path_factory.mktemp("iq4") / "wide", cfg, seed=5), cfg




def _reference_logits(path, ids: list[int]) -> torch.Tensor:
    from gemma2_convert.pipeline.load import from_pretrained
    from reference import Gemma2ForCausalLM

    model = from_pretrained(path, Gemma2ForCausalLM, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def test_to_gguf_iq4_xs_equals_llama_quantize_and_runs(wide_model, tmp_path):
    """Our ``--type iq4_xs`` (verified on writing) vs ``llama_model_quantize`` (pure IQ4_XS) of our F32
    file: the same type for every tensor and the same bytes; llama.cpp then runs ours."""
    from gemma2_convert.formats.gguf.reader import GGUFFile
    from gemma2_convert.pipeline.gguf import to_gguf

    src, cfg = wide_model
    f32, ours, theirs = tmp_path / "f32.gguf", tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    to_gguf(src, f32, type_name="f32", verify=False)
    result = to_gguf(src, ours, type_name="iq4_xs")  # verified against the source within IQ4_XS's bound
    print(f"IQ4_XS verification: mean KL {result.report.mean_kl:.4g}, top-1 {result.report.top1:.2%}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type_id("IQ4_XS")
    params.pure = True
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize(IQ4_XS) returned {rc}"

    a, b = GGUFFile(ours), GGUFFile(theirs)
    types = {n: t.type_name for n, t in a.tensors.items()}
    assert types == {n: t.type_name for n, t in b.tensors.items()}
    assert {"IQ4_XS", "IQ4_NL"} <= set(types.values()), types
    assert a.kv["general.file_type"] == b.kv["general.file_type"] == 30
    blocks = differ = 0
    for name, t in a.tensors.items():
        size = TYPES.get(t.type_name, 4)
        x, y = a.raw(name).reshape(-1, size), b.raw(name).reshape(-1, size)
        blocks += len(x)
        differ += int((x != y).any(axis=1).sum())
    print(f"IQ4_XS file: {blocks - differ}/{blocks} blocks identical to llama-quantize")
    assert differ <= blocks // 1000

    gen = torch.Generator().manual_seed(4)
    ids = [2] + torch.randint(3, cfg.vocab_size, (N_TOKENS - 1,), generator=gen).tolist()
    got, want, source = llama_logits(ours, ids), _reference_logits(ours, ids), _reference_logits(src, ids)
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    top1_src = (got.argmax(-1) == source.argmax(-1)).float().mean().item()
    print(f"IQ4_XS: llama.cpp vs reference on the dequantized weights: max |Δ| "
          f"{(got - want).abs().max().item():.3g}, top-1 {top1:.2%}; vs the float32 source: "
          f"top-1 {top1_src:.2%}")
    assert top1 >= 0.95, f"llama.cpp's top-1 agrees with the reference on {top1:.2%} of {N_TOKENS} positions"
