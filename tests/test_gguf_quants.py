"""GGUF block codecs: bytes vs gguf-py, dequantization vs gguf-py, K-quant searches vs a scalar loop."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GQT

from gemma2_convert.core.errors import ConversionError, UnsupportedError
from quant import gguf_kquants, gguf_legacy
from quant.gguf_codec import bytes_for, dequantize_tensor, fallback_type, quantize_tensor
from quant.gguf_types import FILE_TYPES, GGML_TYPES, file_type_id, ggml_type

LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
KQUANTS = ["Q4_K", "Q5_K", "Q6_K"]
F32 = np.float32


def _data(kind: str, shape: tuple[int, int] = (48, 512), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "randn":
        a = rng.standard_normal(shape)
    elif kind == "zeros":  # exact zeros, all-zero blocks and super-blocks, a constant block
        a = rng.standard_normal(shape)
        a[:, :64] = 0
        a[3] = 0
        a[5, ::3] = 0
        a[7, 256:288] = 0.25
    elif kind == "ties":  # half-integers with a 127 in every block: Q8_0 gets d = 1, x/d = k + 0.5
        a = rng.integers(-254, 255, shape) / 2
        a[:, ::32] = 127
    elif kind == "heavy":
        a = rng.standard_t(2, shape)
    elif kind == "huge":
        a = rng.standard_normal(shape) * 3e4
    elif kind == "tiny":
        a = rng.standard_normal(shape) * 1e-6
    else:  # "subnormal": block scales flush to fp16 zero / subnormal
        a = rng.standard_normal(shape) * 1e-30
    return np.ascontiguousarray(a, dtype=F32)


DATA_KINDS = ["randn", "zeros", "ties", "heavy", "huge", "tiny", "subnormal"]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _assert_bytes_equal(ours: np.ndarray, ref: np.ndarray, block_bytes: int, what: str) -> None:
    ours_b, ref_b = ours.reshape(-1, block_bytes), ref.reshape(-1, block_bytes)
    diff = np.nonzero((ours_b != ref_b).any(axis=1))[0]
    if len(diff):
        i = diff[0]
        raise AssertionError(
            f"{what}: {len(diff)}/{len(ours_b)} blocks differ; first block {i}, byte(s) "
            f"{np.nonzero(ours_b[i] != ref_b[i])[0][:8].tolist()}: ours {ours_b[i][:12].tolist()} "
            f"ref {ref_b[i][:12].tolist()}"
        )


def _assert_float_bits_equal(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    same = ours.view(np.uint32) == ref.view(np.uint32)
    if not same.all():
        idx = np.unravel_index(np.argmin(same), same.shape)
        n = int((~same).sum())
        raise AssertionError(f"{what}: {n} values differ; first {idx}: ours {ours[idx]} ref {ref[idx]}")


# ---- type tables --------------------------------------------------------------------------


def test_type_table_matches_gguf_constants():
    for name, t in GGML_TYPES.items():
        q = GQT[name]
        assert t.ggml_id == q.value, name
        assert (t.block_size, t.type_size) == gguf.GGML_QUANT_SIZES[q], name
    assert ggml_type("q4_k").bits_per_weight == 4.5
    assert ggml_type("Q6_K").bits_per_weight == 6.5625
    assert ggml_type("Q8_0").bits_per_weight == 8.5


def test_file_types_match_gguf_constants():
    for name, value in FILE_TYPES.items():
        assert gguf.LlamaFileType[name].value == value, name
    assert file_type_id("Q4_K_M") == 15
    assert file_type_id("bf16") == 32


def test_unknown_type_lists_valid_names():
    with pytest.raises(UnsupportedError, match=r"IQ3_S.*valid types: BF16, F16, F32, IQ4_NL, IQ4_XS, Q2_K, Q3_K, Q4_0"):
        ggml_type("IQ3_S")
    with pytest.raises(UnsupportedError, match=r"valid names: .*Q4_K_M"):
        file_type_id("IQ3_M")


# ---- legacy types: bytes and dequantization vs gguf-py ---------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", DATA_KINDS)
@pytest.mark.parametrize("qtype", LEGACY)
def test_legacy_bytes_match_gguf_py(qtype: str, kind: str):
    a = _data(kind)
    ref = gguf.quants.quantize(a, GQT[qtype])
    ours = getattr(gguf_legacy, f"quantize_{qtype.lower()}")(torch.from_numpy(a)).numpy()
    _assert_bytes_equal(ours, ref, ggml_type(qtype).type_size, f"{qtype}/{kind}")
    if kind != "huge":  # there Q4_1/Q5_1 mins overflow fp16 and the codec refuses (tested below)
        assert np.array_equal(quantize_tensor(torch.from_numpy(a), qtype).numpy(), ours)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("qtype", LEGACY + KQUANTS + ["F16", "BF16", "F32"])
def test_dequantize_matches_gguf_py(qtype: str):
    for kind in ("randn", "zeros", "ties", "tiny"):
        a = _data(kind, (16, 512), seed=1)
        raw = quantize_tensor(torch.from_numpy(a), qtype)
        ours = dequantize_tensor(raw, qtype, a.shape).numpy()
        ref_in = raw.numpy().view({"F16": np.float16, "F32": np.float32}.get(qtype, np.uint8))
        ref = gguf.quants.dequantize(ref_in, GQT[qtype]).reshape(a.shape)
        _assert_float_bits_equal(ours, ref.astype(F32), f"{qtype}/{kind}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("qtype", ["F16", "BF16"])
def test_float_types_match_gguf_py(qtype: str):
    a = _data("randn", (8, 64))
    a[0, :6] = [np.nan, -np.nan, np.inf, -np.inf, 3.4e38, -0.0]
    if qtype == "BF16":  # NaN payloads and the bf16 tie; (fp16 NaN payloads differ between numpy and C)
        a[1, :3] = np.frombuffer(np.array([0x7F800001, 0xFFC12345, 0x3F808000], np.uint32).tobytes(), F32)
    ours = quantize_tensor(torch.from_numpy(a), qtype).numpy()
    ref = gguf.quants.quantize(a, GQT[qtype])
    _assert_bytes_equal(ours, ref.view(np.uint8).reshape(ours.shape), 2, qtype)


def test_round_half_away_matches_c_roundf():
    grid = np.arange(-300, 301, dtype=F32) * F32(0.5)
    near = np.concatenate([np.nextafter(grid, F32(np.inf)), np.nextafter(grid, F32(-np.inf))])
    v = np.concatenate([grid, near, np.float32([0.49999997, -0.49999997, 126.5, -126.5, 1e-40])])
    v = v[np.abs(v) < 127.5]  # results fit int8
    ours = gguf_legacy.round_half_away(torch.from_numpy(v)).numpy().astype(F32)
    assert np.array_equal(ours, gguf.quants.np_roundf(v))


def test_pack_accepts_caller_chosen_codes():
    rng = np.random.default_rng(3)
    d = torch.from_numpy(rng.uniform(0.01, 1, (4, 6)).astype(np.float16))
    m = torch.from_numpy(rng.uniform(-1, 0, (4, 6)).astype(np.float16))
    q4 = torch.from_numpy(rng.integers(0, 16, (4, 6, 32), dtype=np.uint8))
    q5 = torch.from_numpy(rng.integers(0, 32, (4, 6, 32), dtype=np.uint8))
    q8 = torch.from_numpy(rng.integers(-128, 128, (4, 6, 32), dtype=np.int8))
    df, mf = d.float().unsqueeze(-1), m.float().unsqueeze(-1)
    cases = {
        "Q4_0": (gguf_legacy.pack_q4_0(d, q4), df * (q4.float() - 8)),
        "Q4_1": (gguf_legacy.pack_q4_1(d, m, q4), df * q4.float() + mf),
        "Q5_0": (gguf_legacy.pack_q5_0(d, q5), df * (q5.float() - 16)),
        "Q5_1": (gguf_legacy.pack_q5_1(d, m, q5), df * q5.float() + mf),
        "Q8_0": (gguf_legacy.pack_q8_0(d, q8), df * q8.float()),
    }
    for qtype, (raw, expected) in cases.items():
        ref = gguf.quants.dequantize(raw.numpy(), GQT[qtype])
        assert np.array_equal(ref, expected.reshape(4, -1).numpy()), qtype


# ---- K-quant searches vs a scalar loop of the C code -----------------------------------------


def _scalar_qkx2(x, w, nmax, rmin, rdelta, nstep):
    """ggml make_qkx2_quants for one block, scalar float32 (use_mad = false)."""
    mn, mx = min(F32(0), x.min()), x.max()
    sum_w, sum_x = F32(0), F32(0)
    for xi, wi in zip(x, w):
        sum_w, sum_x = sum_w + wi, sum_x + wi * xi
    if mx == mn:
        return F32(0), -mn, np.zeros(len(x), F32)

    def levels(iscale, m):
        return np.array([min(max(np.rint(iscale * (xi - m)), 0), nmax) for xi in x], F32)

    def error(s, m, lv):
        e = F32(0)
        for xi, wi, li in zip(x, w, lv):
            diff = s * li + m - xi
            e = e + wi * (diff * diff)
        return e

    iscale = F32(nmax) / (mx - mn)
    scale = F32(1) / iscale
    best_l = levels(iscale, mn)
    best = error(scale, mn, best_l)
    for step in range(nstep + 1):
        lv = levels((F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (mx - mn), mn)
        sl = sl2 = sxl = F32(0)
        for xi, wi, li in zip(x, w, lv):
            sl, sl2, sxl = sl + wi * li, sl2 + wi * li * li, sxl + wi * li * xi
        det = sum_w * sl2 - sl * sl
        if det > 0:
            s, m = (sum_w * sxl - sum_x * sl) / det, (sl2 * sum_x - sl * sxl) / det
            if m > 0:
                s, m = sxl / sl2, F32(0)
            err = error(s, m, lv)
            if err < best:
                best, scale, mn, best_l = err, s, m, lv
    return scale, -mn, best_l


def _scalar_qx(x, nmax):
    """ggml make_qx_quants for one block, scalar float32 (rmse_type = 1, no quant weights)."""
    mx = x[np.argmax(np.abs(x))]
    if abs(mx) < F32(1e-15):
        return F32(0), np.zeros(len(x), F32)

    def candidate(iscale):
        lv = np.array([min(max(np.rint(iscale * xi), -nmax), nmax - 1) for xi in x], F32)
        slx = sl2 = F32(0)
        for xi, li in zip(x, lv):
            slx, sl2 = slx + xi * xi * xi * li, sl2 + xi * xi * li * li
        return lv, slx, sl2

    lv, slx, sl2 = candidate(F32(-nmax) / mx)
    best_l, scale = lv + nmax, slx / sl2 if sl2 else F32(0)
    best = scale * slx
    for step in [s for s in range(-9, 10) if s]:
        lv, slx, sl2 = candidate(-(F32(nmax) + F32(0.1) * F32(step)) / mx)
        if sl2 > 0 and slx * slx > best * sl2:
            best_l, scale = lv + nmax, slx / sl2
            best = scale * slx
    return scale, best_l


@pytest.mark.parametrize("kind", ["randn", "zeros", "ties", "heavy"])
def test_make_qkx2_quants_matches_scalar_loop(kind: str):
    x = _data(kind, (24, 32), seed=5)
    x[0] = 1.5  # flat block above zero; x[1] flat at zero via "zeros"
    x[1] = -0.75  # flat negative block
    w = np.sqrt(np.mean(x * x, axis=1, keepdims=True)).astype(F32) + np.abs(x)
    xt, wt = torch.from_numpy(x.T.copy()), torch.from_numpy(w.T.copy())
    scale, the_min, lv = gguf_kquants.make_qkx2_quants(xt, wt, 15, -1.0, 0.1, 20)
    for b in range(x.shape[0]):
        s, m, ref_l = _scalar_qkx2(x[b], w[b], 15, -1.0, 0.1, 20)
        assert (scale[b].item(), the_min[b].item()) == (s, m), f"block {b}: ours {scale[b]}, {the_min[b]}; ref {s}, {m}"
        assert np.array_equal(lv[:, b].numpy(), ref_l), f"block {b}: {lv[:, b].tolist()} vs {ref_l.tolist()}"


@pytest.mark.parametrize("kind", ["randn", "zeros", "ties", "heavy"])
def test_make_qx_quants_matches_scalar_loop(kind: str):
    x = _data(kind, (24, 16), seed=6)
    x[2, :4] = [0.5, -0.5, 0.25, 0.1]  # |max| tie: first occurrence wins
    x[2, 4:] = 0
    scale, lv = gguf_kquants.make_qx_quants(torch.from_numpy(x.T.copy()), 32)
    for b in range(x.shape[0]):
        s, ref_l = _scalar_qx(x[b], 32)
        assert scale[b].item() == s, f"block {b}: ours {scale[b].item()} ref {s}"
        assert np.array_equal(lv[:, b].numpy(), ref_l), f"block {b}: {lv[:, b].tolist()} vs {ref_l.tolist()}"


# ---- K-quant quality and layout ---------------------------------------------------------------


def _rel_rmse(qtype: str, a: np.ndarray) -> float:
    t = torch.from_numpy(a)
    back = dequantize_tensor(quantize_tensor(t, qtype), qtype, a.shape)
    return float(((back - t).pow(2).mean() / t.pow(2).mean()).sqrt())


def test_kquant_error_floors_and_order():
    a = _data("randn", (64, 1024), seed=7)
    err = {q: _rel_rmse(q, a) for q in ["Q4_0", "Q4_1", "Q5_0", "Q8_0", *KQUANTS]}
    assert err["Q4_K"] < 0.075 and err["Q4_K"] < err["Q4_1"] < err["Q4_0"], err
    assert err["Q5_K"] < 0.038 and err["Q5_K"] < err["Q5_0"], err
    assert err["Q6_K"] < 0.019 and err["Q6_K"] < err["Q5_K"] < err["Q4_K"], err
    assert err["Q8_0"] < err["Q6_K"], err


def test_kquant_all_zero_superblock_is_exact_zero():
    a = _data("randn", (4, 512), seed=8)
    a[1, 256:] = 0
    for qtype in KQUANTS:
        raw = quantize_tensor(torch.from_numpy(a), qtype)
        back = dequantize_tensor(raw, qtype, a.shape)
        assert torch.equal(back[1, 256:], torch.zeros(256)), qtype
        assert raw.shape == (4, 2 * ggml_type(qtype).type_size)


@pytest.mark.parametrize("qtype", LEGACY + KQUANTS)
def test_chunking_and_leading_dims_do_not_change_bytes(qtype: str, monkeypatch):
    a = torch.from_numpy(_data("heavy", (12, 512), seed=9))
    whole = quantize_tensor(a, qtype)
    t = GGML_TYPES[qtype]
    monkeypatch.setitem(GGML_TYPES, qtype, dataclasses.replace(t, codec=dataclasses.replace(t.codec, chunk_elements=1000)))
    assert torch.equal(quantize_tensor(a, qtype), whole)
    assert torch.equal(quantize_tensor(a.reshape(3, 4, 512), qtype).reshape(12, -1), whole)
    assert bytes_for(qtype, (3, 4, 512)) == whole.numel()


# ---- fallback and errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    "qtype,cols,expected",
    [("Q4_K", 2304, "Q4_K"), ("Q4_K", 2336, "Q5_0"), ("Q5_K", 288, "Q5_1"), ("Q6_K", 288, "Q8_0"),
     ("Q6_K", 100, "F16"), ("Q4_K", 48, "F16"), ("Q8_0", 48, "F16"), ("Q4_0", 64, "Q4_0"), ("BF16", 7, "BF16")],
)
def test_fallback_type_mirrors_llama_cpp(qtype: str, cols: int, expected: str):
    assert fallback_type(qtype, cols) == expected


def test_errors_name_the_problem():
    with pytest.raises(UnsupportedError, match=r"2336 elements .* Q4_K block size 256.* = Q5_0"):
        quantize_tensor(torch.zeros(2, 2336), "Q4_K")
    bad = torch.ones(2, 64)
    bad[1, 5] = float("nan")
    with pytest.raises(ConversionError, match=r"Q8_0: 1 non-finite values \(first at index \(1, 5\)\)"):
        quantize_tensor(bad, "Q8_0")
    with pytest.raises(ConversionError, match=r"Q4_0: 2 block scales overflow fp16 \(first block 0\)"):
        quantize_tensor(torch.full((1, 64), 1e6), "Q4_0")
    with pytest.raises(ConversionError, match=r"needs 36 bytes, got 35"):
        dequantize_tensor(torch.zeros(35, dtype=torch.uint8), "Q4_0", (1, 64))
    with pytest.raises(UnsupportedError, match="valid types"):
        quantize_tensor(torch.zeros(2, 64), "IQ3_S")


def test_imatrix_rules():
    a = torch.from_numpy(_data("randn", (4, 512), seed=10))
    qw = torch.rand(512, generator=torch.Generator().manual_seed(0)) + 0.1
    assert torch.equal(quantize_tensor(a, "Q8_0", qw), quantize_tensor(a, "Q8_0"))  # llama.cpp ignores it too
    for qtype in (*KQUANTS, "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        with_qw = quantize_tensor(a, qtype, qw)
        assert not torch.equal(with_qw, quantize_tensor(a, qtype)), qtype
        # uniform importance is not the reference path (different weights and scale search), but as good
        err = float((dequantize_tensor(with_qw, qtype, a.shape) - a).pow(2).mean().sqrt())
        ref = float((dequantize_tensor(quantize_tensor(a, qtype), qtype, a.shape) - a).pow(2).mean().sqrt())
        assert err < 1.1 * ref, (qtype, err, ref)
    with pytest.raises(ConversionError, match=r"importance matrix has 256 entries for rows of 512 columns"):
        quantize_tensor(a, "Q4_K", qw[:256])


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_legacy_imatrix_blocks_decode_with_gguf_py_and_follow_the_importance(qtype):
    """The importance path writes stock blocks (gguf-py decodes them to our dequantization), and it
    lowers the importance-weighted error where the importance is concentrated."""
    import gguf

    a = torch.from_numpy(_data("randn", (8, 256), seed=11))
    qw = torch.ones(256)
    qw[:32] = 100.0  # the first block of every row matters most
    data = quantize_tensor(a, qtype, qw)
    ours = dequantize_tensor(data, qtype, a.shape)
    theirs = torch.from_numpy(gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType[qtype]).copy())
    assert torch.equal(ours, theirs.reshape(a.shape))
    ref = dequantize_tensor(quantize_tensor(a, qtype), qtype, a.shape)
    werr = lambda d: float(((d - a) ** 2 * qw).sum())  # noqa: E731
    assert werr(ours) < werr(ref), (werr(ours), werr(ref))
