"""The numba legacy-block quantizers (quant/gguf_legacy_jit.py) give the torch port's bytes exactly.

Every case compares ``torch.equal(jit(w), torch_ref(w))`` for Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the imatrix
Q4_0 / Q4_1: gaussian and heavy-tailed data, zero rows, constant blocks, max/-min ties in both orders,
exact .5 rounding ties, -0.0, tiny and subnormal values, fp16 scale overflow, NaN / inf, and the shapes
(1, 32), (5, 64), (33, 2304), (64, 9216). The kernels themselves (before the torch fallback for the rows
they mark) must leave a non-finite fp16 scale in every block with a NaN / inf.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from quant import gguf_imatrix as im  # noqa: E402
from quant import gguf_legacy as lg  # noqa: E402
from quant import gguf_legacy_jit as lj  # noqa: E402
from quant import jit  # noqa: E402

PLAIN = {
    "q8_0": (lj.quantize_q8_0, lg.quantize_q8_0),
    "q4_0": (lj.quantize_q4_0, lg.quantize_q4_0),
    "q4_1": (lj.quantize_q4_1, lg.quantize_q4_1),
    "q5_0": (lj.quantize_q5_0, lg.quantize_q5_0),
    "q5_1": (lj.quantize_q5_1, lg.quantize_q5_1),
}
IMATRIX = {
    "q4_0": (lj.quantize_q4_0_imatrix, im.quantize_q4_0_imatrix),
    "q4_1": (lj.quantize_q4_1_imatrix, im.quantize_q4_1_imatrix),
}
TYPE_SIZE = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24}
SCALES = {"q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2)}
SHAPES = [(1, 32), (5, 64), (33, 2304), (64, 9216)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


QK = 32


def _cases() -> dict[str, torch.Tensor]:
    g = _gen(1)
    cases: dict[str, torch.Tensor] = {}
    cases["heavy_lognormal"] = torch.randn(16, 256, generator=g) * torch.exp(2 * torch.randn(16, 256, generator=g))
    cases["heavy_cauchy"] = torch.randn(16, 256, generator=g) / torch.randn(16, 256, generator=g).abs().clamp(min=1e-3)
    cases["shifted"] = torch.randn(8, 256, generator=g) + torch.tensor([3.0, -3.0, 0.5, -0.5]).repeat_interleave(64)
    sparse = torch.randn(8, 256, generator=g)
    cases["sparse"] = torch.where(torch.rand(8, 256, generator=g) < 0.1, sparse, 0.0)  # +0.0 zeros
    zr = torch.randn(8, 256, generator=g)
    zr[1] = 0.0
    zr[4] = -0.0
    zr[6, 64:128] = 0.0
    cases["zero_rows"] = zr
    consts = [0.5, -0.5, 3.0, -7.0, 1e-3, -1e-3, 0.0, -0.0, 65504.0, -1e5, 1.0, 127.0]
    cases["constant_blocks"] = torch.tensor(consts, dtype=torch.float32).repeat_interleave(QK).reshape(3, 128)
    # max == -min in magnitude: both orders, with the rest random below it
    tie = torch.rand(8, 256, generator=g) * 2 - 1
    for r in range(8):
        for b in range(8):
            i, j = torch.randperm(QK, generator=g)[:2].tolist()
            a = float(torch.rand(1, generator=g)) * 3 + 1.0
            tie[r, 32 * b + i] = a if (r + b) % 2 else -a
            tie[r, 32 * b + j] = -a if (r + b) % 2 else a
    tie[0, :2] = torch.tensor([2.0, -2.0])
    tie[1, :2] = torch.tensor([-2.0, 2.0])
    cases["max_min_tie"] = tie
    # exact .5 ties of x*id (+ offset): small integers and half-integers whose scale makes id a power of two
    half = torch.randint(-16, 17, (12, 256), generator=g).float() / 2
    half[:4, ::32] = 8.0  # Q4_0/Q5_0: d = -1 (or -0.5), Q8_0 ties at .5 of 127/8 multiples
    half[4:8, ::32] = -8.0
    cases["half_ints"] = half
    q8 = torch.randint(-254, 255, (6, 128), generator=g).float() / 2  # k + 0.5 with amax 127: id = 1
    q8[:, ::32] = 127.0
    q8[3:, ::32] = -127.0
    cases["q8_half_ties"] = q8
    aff = torch.randint(0, 31, (6, 128), generator=g).float() / 2  # min 0, max 15: d = 1 for Q4_1
    aff[:, ::32] = 0.0
    aff[:, 1::32] = 15.0
    aff[3:, 1::32] = 31.0  # Q5_1: d = 1
    cases["affine_half_ties"] = aff
    nz = torch.randn(6, 128, generator=g)
    nz[0, ::3] = -0.0
    nz[1] = -0.0  # all -0.0: d and m keep the sign
    nz[2] = nz[2].abs()
    nz[2, 0] = -0.0  # the min is -0.0, no +0.0 in the row
    nz[3] = -nz[3].abs()
    nz[3, 40] = -0.0  # the max is -0.0
    nz[4, 32:64] = -0.0
    nz[5] = nz[5].abs()
    nz[5, 7] = 0.0  # the min is +0.0 with a -0.0 elsewhere in another block
    nz[5, 100] = -0.0
    cases["negative_zero"] = nz
    zb = torch.randn(5, 128, generator=g)  # a zero extreme of both signs: the kernels hand the tensor to torch
    zb[0, ::2] = -0.0
    zb[0, 1::2] = 0.0
    zb[1] = zb[1].abs()
    zb[1, 5] = 0.0
    zb[1, 7] = -0.0
    zb[2] = -zb[2].abs()
    zb[2, 40] = -0.0
    zb[2, 41] = 0.0
    zb[3, 32:64] = torch.tensor([0.0, -0.0] * 16)
    zb[4, 64:96] = torch.tensor([-0.0] * 31 + [0.0])
    cases["zero_both_signs"] = zb
    cases["tiny_1e-30"] = torch.randn(4, 128, generator=g) * 1e-30
    cases["subnormal_1e-40"] = torch.randn(4, 128, generator=g) * 1e-40
    sub = torch.zeros(4, 64)
    sub[0, 3] = 1.4e-45
    sub[1, 3] = -1.4e-45
    sub[2, :32] = 1.4e-45
    sub[2, 5] = 2.8e-45
    sub[3] = torch.randn(64, generator=g) * 1e-38
    cases["min_subnormal"] = sub
    cases["fp16_overflow"] = torch.randn(6, 128, generator=g) * torch.tensor([1e6, 1e7]).repeat_interleave(64)
    big = torch.randn(4, 64, generator=g)
    big[0, 0], big[0, 1] = 3e38, -3e38  # max - min overflows to inf in float32
    big[1, :32] = 3.4e38
    big[2, 7] = -3.4e38
    big[3, 40] = 70000.0
    cases["huge"] = big
    cases["nonfinite"] = _nonfinite(torch.randn(10, 128, generator=g))
    inf = torch.randn(6, 128, generator=g)
    inf[0, 3] = float("inf")
    inf[1, 40], inf[1, 41] = float("inf"), float("-inf")
    inf[2, 64:96] = float("-inf")
    inf[3, 0:32] = float("inf")
    inf[4, 100] = float("-inf")
    inf[5, 33], inf[5, 34] = float("-inf"), float("inf")
    cases["infinite"] = inf
    return cases


def _nonfinite(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    nan, inf = float("nan"), float("inf")
    x[0, 3] = nan
    x[1, 40] = inf
    x[2, 70] = -inf
    x[3, 0], x[3, 9] = inf, -inf  # a +inf / -inf tie
    x[3, 100], x[3, 101] = -inf, inf
    x[4, 33] = -nan
    x[5, :32] = nan
    x[6, 32:64] = inf
    x[7, 64:96] = -inf
    x[8, 5], x[8, 6] = nan, inf
    x[9, 96:] = 0.0
    x[9, 100] = nan
    return x


CASES = _cases()


def _check(jit_out: torch.Tensor, ref_out: torch.Tensor) -> None:
    assert jit_out.dtype == torch.uint8 and jit_out.shape == ref_out.shape
    if not torch.equal(jit_out, ref_out):
        bad = (jit_out != ref_out).nonzero()
        raise AssertionError(f"{len(bad)} bytes differ, first at {bad[:5].tolist()}")


@pytest.mark.parametrize("name", sorted(PLAIN))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gaussian_shapes(name: str, shape: tuple[int, int]) -> None:
    fn, ref = PLAIN[name]
    w = torch.randn(*shape, generator=_gen(shape[0] * 7 + shape[1]))
    _check(fn(w), ref(w))


@pytest.mark.parametrize("name", sorted(PLAIN))
@pytest.mark.parametrize("case", sorted(CASES))
def test_edge_cases(name: str, case: str) -> None:
    fn, ref = PLAIN[name]
    w = CASES[case]
    _check(fn(w), ref(w))


def _importances() -> dict[str, torch.Tensor]:
    g = _gen(5)
    cols = 256
    qw = {"uniform": torch.rand(cols, generator=g) + 0.1}
    z = torch.rand(cols, generator=g)
    z[::3] = 0.0
    z[64:96] = 0.0  # a whole block of zero importance
    qw["zeros"] = z
    qw["dynamic_range"] = 10.0 ** (torch.rand(cols, generator=g) * 24 - 12)
    qw["all_zero"] = torch.zeros(cols)
    qw["huge"] = 10.0 ** (torch.rand(cols, generator=g) * 10 + 25)  # products overflow float32
    return qw


IMPORTANCES = _importances()


@pytest.mark.parametrize("name", sorted(IMATRIX))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_imatrix_gaussian_shapes(name: str, shape: tuple[int, int]) -> None:
    fn, ref = IMATRIX[name]
    g = _gen(shape[0] * 11 + shape[1])
    w = torch.randn(*shape, generator=g)
    qw = torch.rand(shape[1], generator=g) ** 4 * 10
    qw[::17] = 0.0
    _check(fn(w, qw), ref(w, qw))


@pytest.mark.parametrize("name", sorted(IMATRIX))
@pytest.mark.parametrize("weights", sorted(IMPORTANCES))
def test_imatrix_importances(name: str, weights: str) -> None:
    fn, ref = IMATRIX[name]
    qw = IMPORTANCES[weights]
    w = torch.cat([CASES["heavy_lognormal"], torch.randn(8, 256, generator=_gen(9))])
    _check(fn(w, qw), ref(w, qw))


@pytest.mark.parametrize("name", sorted(IMATRIX))
@pytest.mark.parametrize("case", sorted(CASES))
def test_imatrix_edge_cases(name: str, case: str) -> None:
    fn, ref = IMATRIX[name]
    w = CASES[case]
    qw = torch.rand(w.shape[1], generator=_gen(w.shape[1])) + 0.05
    _check(fn(w, qw), ref(w, qw))


# Cases where a kernel may mark rows and the wrapper returns torch's result; everywhere else the bytes
# compared above are the kernels' own.
FALLBACK_CASES = {"zero_both_signs", "subnormal_1e-40", "min_subnormal", "huge", "nonfinite", "infinite"}


@pytest.mark.parametrize("name", sorted(PLAIN) + ["q4_0_imatrix", "q4_1_imatrix"])
def test_kernels_own_bytes_are_compared(name: str) -> None:
    for case, w in CASES.items():
        qw = lj._importance(torch.rand(w.shape[1], generator=_gen(w.shape[1])) + 0.05, w.shape[1])
        _, flags = lj._launch(name, w.contiguous(), qw if "imatrix" in name else None)
        assert (case in FALLBACK_CASES) or not flags.any(), case
    w = CASES["zero_both_signs"]
    qw = lj._importance(torch.ones(w.shape[1]), w.shape[1])
    _, flags = lj._launch(name, w.contiguous(), qw if "imatrix" in name else None)
    assert flags.any() or name in ("q8_0", "q4_0_imatrix")


def _scale_is_nonfinite(raw: torch.Tensor, name: str) -> torch.Tensor:
    """Per block: some fp16 scale of the block has an all-ones exponent (inf or NaN)."""
    ts = TYPE_SIZE[name]
    blocks = raw.reshape(raw.shape[0], -1, ts).to(torch.int32)
    bad = torch.zeros(blocks.shape[:2], dtype=torch.bool)
    for off in SCALES[name]:
        h = blocks[..., off] | (blocks[..., off + 1] << 8)
        bad |= (h & 0x7C00) == 0x7C00
    return bad


@pytest.mark.parametrize("name", sorted(PLAIN) + ["q4_0_imatrix", "q4_1_imatrix"])
def test_kernel_marks_nonfinite(name: str) -> None:
    """Before the fallback: the kernel's own scale is non-finite in each NaN/inf block and it marks the row."""
    w = CASES["nonfinite"]
    qw = lj._importance(torch.ones(w.shape[1]), w.shape[1]) if "imatrix" in name else None
    raw, flags = lj._launch(name, w.contiguous(), qw)
    has = ~torch.isfinite(w.reshape(w.shape[0], -1, QK)).all(-1)
    base = name[:4]
    assert torch.equal(_scale_is_nonfinite(raw, base) & has, has)
    assert np.array_equal(flags.astype(bool), has.any(-1).numpy())


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_kernel_alone_matches_inf_and_subnormal(name: str) -> None:
    """Without the fallback the kernels' bytes already equal torch's for inf and subnormal blocks.

    (Not for NaN: torch's NaN bits differ between the vectorized body and the scalar tail of its ops.)
    """
    for case in ("infinite", "subnormal_1e-40", "min_subnormal", "huge"):
        w = CASES[case]
        raw, _ = lj._launch(name, w.contiguous())
        _check(raw, PLAIN[name][1](w))


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_fp16_overflow_is_not_marked(name: str) -> None:
    """A finite block whose scale overflows fp16 is the kernel's own work: inf scale bytes, no fallback."""
    w = CASES["fp16_overflow"]
    raw, flags = lj._launch(name, w.contiguous())
    assert not flags.any()
    assert _scale_is_nonfinite(raw, name).any()
    _check(raw, PLAIN[name][1](w))


def test_f16_bits_fast_path() -> None:
    """The kernels' fp16 encoder equals numpy's float32 -> float16 (and quant.jit's) on a dense sample."""
    g = np.random.default_rng(0)
    bits = np.concatenate([
        g.integers(0, 1 << 32, 1 << 18, dtype=np.uint64),
        np.arange(0x38700000, 0x38900000, 97, dtype=np.uint64),  # around the smallest normal half
        np.arange(0x477F0000, 0x47810000, 13, dtype=np.uint64),  # around 65504 / 65520
        np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x33000000, 0x33000001], dtype=np.uint64),
    ]).astype(np.uint32)
    vals = bits.view(np.float32)
    got = _encode(vals)
    with np.errstate(over="ignore"):
        ref = vals.astype(np.float16).view(np.uint16).astype(np.int64)
    finite = np.isfinite(vals)
    assert np.array_equal(got[finite], ref[finite])
    assert np.array_equal((got[~finite] & 0x7C00), np.full((~finite).sum(), 0x7C00))


@jit.kernel
def _encode_kernel(vals, out, si, sf):  # noqa: ANN001,ANN201 - numba kernel
    for i in range(vals.shape[0]):
        out[i] = lj._f16_bits(vals[i], si, sf)


def _encode(vals: np.ndarray) -> np.ndarray:
    out = np.empty(vals.shape[0], np.int64)
    si = np.empty(1, np.int32)
    _encode_kernel(vals, out, si, si.view(np.float32))
    return out


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="multiple of the block size"):
        lj.quantize_q4_0(torch.zeros(2, 48))
    with pytest.raises(ValueError, match="quant_weights"):
        lj.quantize_q4_0_imatrix(torch.zeros(2, 64), torch.ones(32))
    assert lj.quantize_q8_0(torch.zeros(0, 64)).shape == (0, 68)


def test_bf16_and_noncontiguous_input() -> None:
    w = torch.randn(64, 96, generator=_gen(3))
    for src in (w.to(torch.bfloat16), w.T.contiguous().T, w[:, ::1]):
        for name, (fn, ref) in PLAIN.items():
            _check(fn(src), ref(src))


def test_q8_0_reads_bf16_bits_as_they_are() -> None:
    """A bfloat16 input goes to the Q8_0 kernel as its 16-bit patterns (no float32 copy) and gives the bytes
    of the torch port on the same values, every edge case included (the fallback keeps NaN's bytes)."""
    for case, w in CASES.items():
        b = w.to(torch.bfloat16)
        _check(lj.quantize_q8_0(b), lg.quantize_q8_0(b.float()))
        raw, flags = lj._launch("q8_0", b.contiguous())
        assert (case in FALLBACK_CASES) or not flags.any(), case


def test_q8_0_scales_round_like_numpy() -> None:
    """Q8_0's fp16 scales (rounded in the kernel's own row pass) equal numpy's float16 of amax/127 for
    block maxima spread over the whole float32 range: normal halves, subnormal halves, zero, overflow."""
    g = np.random.default_rng(1)
    bits = np.concatenate([g.integers(0x00800000, 0x7F800000, 1 << 14), np.arange(0x3C000000, 0x3C100000, 61),
                           np.arange(0x4A7D0000, 0x4A800000, 7), [0, 1, 0x00800000, 0x7F7FFFFF]]).astype(np.uint32)
    amax = bits.view(np.float32)
    w = torch.zeros(len(amax), QK)
    w[:, 0] = torch.from_numpy(amax)
    w[:, 1] = -torch.from_numpy(amax) / 2
    raw, _ = lj._launch("q8_0", w)  # its own scales, also in a row it marks (1/d overflows for amax 1e-45)
    got = raw[:, :2].contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1)
    with np.errstate(over="ignore"):
        want = (amax / np.float32(127)).astype(np.float16).view(np.uint16)
    assert np.array_equal(got, want)
    _check(lj.quantize_q8_0(w), lg.quantize_q8_0(w))


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_out_receives_the_bytes(name: str) -> None:
    fn, ref = PLAIN[name]
    w = CASES["heavy_lognormal"]
    out = torch.full((w.shape[0], w.shape[1] // QK * TYPE_SIZE[name]), 7, dtype=torch.uint8)
    assert fn(w, out=out).data_ptr() == out.data_ptr()
    _check(out, ref(w))
    nan = CASES["nonfinite"]  # the torch fallback's bytes land in out too
    out = torch.empty((nan.shape[0], nan.shape[1] // QK * TYPE_SIZE[name]), dtype=torch.uint8)
    _check(fn(nan, out=out), ref(nan))
    _check(out, ref(nan))
    with pytest.raises(ValueError, match="out must be"):
        fn(w, out=torch.empty(3, dtype=torch.uint8))
