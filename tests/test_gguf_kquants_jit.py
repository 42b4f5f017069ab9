"""The numba K-quant kernels (quant/gguf_kquants_jit.py) give the torch port's bytes, input for input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quant import gguf_kquants as ref

import quant.gguf_kquants_jit as jit
pytest.importorskip("numba")

TYPES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
F32 = np.float32


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _fns(qtype: str):
    name = "quantize_" + qtype.lower()
    return getattr(jit, name), getattr(ref, name)


def _data(kind: str, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = shape
    if kind == "gauss":
        a = rng.standard_normal(shape)
    elif kind == "heavy":  # student-t(2) and a few huge outliers
        a = rng.standard_t(2, shape)
        idx = rng.integers(0, a.size, max(3, a.size // 500))
        a.flat[idx] = rng.choice([-1.0, 1.0], idx.size) * rng.uniform(50, 5000, idx.size)
    elif kind == "large":
        a = rng.standard_normal(shape) * 1e4
    elif kind == "tiny":  # x*x underflows in float32; scales flush to fp16 zero
        a = rng.standard_normal(shape) * 1e-30
    elif kind == "small":  # around the 1e-15 all-zero threshold and fp16 subnormal scales
        a = rng.standard_normal(shape) * rng.choice([1e-16, 1e-14, 1e-9, 1e-6], (rows, cols // 16)).repeat(16, 1)
    elif kind == "positive":  # min clipped to 0 in every block
        a = np.abs(rng.standard_normal(shape)) + rng.uniform(0, 3, (rows, cols // 32)).repeat(32, 1)
    elif kind == "negative":
        a = -np.abs(rng.standard_normal(shape)) - rng.uniform(0, 3, (rows, cols // 32)).repeat(32, 1)
    elif kind == "overflow":  # finite, but x*x overflows float32 (NaN Q6_K scales); fp16 scales overflow
        a = np.clip(rng.standard_normal(shape), -4, 4) * 1e30
    elif kind == "nonfinite":  # the codec rejects these first; the kernels still follow the torch port
        a = rng.standard_normal(shape)
        a.flat[rng.integers(0, a.size, 6)] = [np.nan, np.inf, -np.inf, np.nan, np.inf, -np.inf]
        a[-1, :64] *= 1e-18  # below the all-zero threshold but for a NaN / inf
        a[-1, 7] = np.nan
        a[-1, 16 + 3] = np.inf
        a[-1, 32 + 9] = np.nan
    elif kind == "ties":  # small integers and half-integers: rounding ties everywhere
        a = rng.integers(-8, 9, shape) / rng.choice([1.0, 2.0, 4.0], (rows, cols // 16)).repeat(16, 1)
    else:  # "structured": zero rows, constant blocks, single nonzeros, mixed scales per block
        a = rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 30.0], (rows, cols // 32)).repeat(32, 1)
        a[0] = 0
        if rows > 1:
            a[1, :] = 0.5  # constant positive
        if rows > 2:
            a[2, :32] = -0.75  # constant negative block
            a[2, 32:64] = 0
            a[2, 64:96] = 0
            a[2, 70] = 3.0  # one nonzero
            a[2, 96:128] = 0
            a[2, 100] = -2.0
            a[2, 128:144] = 0
            a[2, 130] = 1e-20
        for r in range(3, rows, 4):
            a[r, :256] = 0  # an all-zero super-block
            if cols >= 512:
                a[r, 256 + 5] = 7.0  # one nonzero in a super-block
                a[r, 256:256 + 5] = 0
                a[r, 256 + 6:512] = 0
        for r in range(4, rows, 5):
            a[r, cols - 32:] = a[r, cols - 32]  # constant block
            a[r, :16] = -a[r, :16]  # mixed sign
    return np.ascontiguousarray(a, dtype=F32)


def _imatrix(kind: str, cols: int, seed: int = 1) -> torch.Tensor | None:
    rng = np.random.default_rng(seed)
    if kind == "none":
        return None
    if kind == "uniform":
        q = rng.uniform(0.1, 2.0, cols)
    elif kind == "zeros":  # zero importance on whole sub-blocks and scattered columns
        q = rng.uniform(0.0, 1.0, cols)
        q[rng.random(cols) < 0.2] = 0
        q[:32] = 0
        q[64:80] = 0
    else:  # "wide": magnitudes over 16 decades
        q = 10.0 ** rng.uniform(-8, 8, cols)
    return torch.from_numpy(q.astype(F32))


def _assert_same(ours: torch.Tensor, want: torch.Tensor, block_bytes: int, what: str) -> None:
    assert ours.dtype == torch.uint8 and ours.shape == want.shape, (ours.dtype, ours.shape, want.shape)
    o, w = ours.numpy().reshape(-1, block_bytes), want.numpy().reshape(-1, block_bytes)
    diff = np.nonzero((o != w).any(axis=1))[0]
    if len(diff):
        i = diff[0]
        raise AssertionError(
            f"{what}: {len(diff)}/{len(o)} super-blocks differ; first {i}, bytes "
            f"{np.nonzero(o[i] != w[i])[0][:8].tolist()}: ours {o[i][:16].tolist()} ref {w[i][:16].tolist()}"
        )


def test_functions_exist():
    for qtype, size in TYPES.items():
        f, _ = _fns(qtype)
        out = f(torch.zeros(2, 256))
        assert out.dtype == torch.uint8 and out.shape == (2, size)
        assert f(torch.zeros(2, 256), torch.ones(256)).shape == (2, size)


KINDS = ["gauss", "heavy", "large", "tiny", "small", "positive", "negative", "ties", "structured", "overflow",
         "nonfinite"]
BIG = {("gauss", "none"), ("heavy", "wide"), ("structured", "zeros")}
SHAPES = [(3, 256), (17, 512), (64, 2304)]


@pytest.mark.parametrize("qtype", list(TYPES))
@pytest.mark.parametrize("imatrix", ["none", "uniform", "zeros", "wide"])
@pytest.mark.parametrize("kind", KINDS)
def test_bytes_equal_torch_port(qtype: str, imatrix: str, kind: str):
    ours_fn, ref_fn = _fns(qtype)
    for n, shape in enumerate(SHAPES):
        if shape[0] * shape[1] > 20_000 and (kind, imatrix) not in BIG:
            shape = (5, shape[1])  # the big shape only for a few combinations: the torch port is slow
        x = torch.from_numpy(_data(kind, shape, seed=n))
        qw = _imatrix(imatrix, shape[1], seed=n + 10)
        _assert_same(ours_fn(x, qw), ref_fn(x, qw), TYPES[qtype], f"{qtype} {kind} {shape} imatrix={imatrix}")


@pytest.mark.parametrize("qtype", list(TYPES))
def test_layouts_and_dtypes(qtype: str):
    """Non-contiguous and non-float32 inputs are converted as the torch port converts them."""
    ours_fn, ref_fn = _fns(qtype)
    base = torch.from_numpy(_data("gauss", (512, 6), seed=3))
    x = base.T  # [6, 512], not contiguous
    _assert_same(ours_fn(x), ref_fn(x), TYPES[qtype], f"{qtype} transposed")
    xh = x.to(torch.bfloat16)
    _assert_same(ours_fn(xh), ref_fn(xh), TYPES[qtype], f"{qtype} bfloat16")
    qw = torch.linspace(0, 3, 512, dtype=torch.float64)
    _assert_same(ours_fn(x, qw), ref_fn(x, qw), TYPES[qtype], f"{qtype} float64 imatrix")


def test_bad_shapes():
    with pytest.raises(ValueError, match="multiple"):
        jit.quantize_q4_k(torch.zeros(2, 100))
    with pytest.raises(ValueError, match="quant_weights"):
        jit.quantize_q6_k(torch.zeros(2, 256), torch.ones(512))
    assert jit.quantize_q5_k(torch.zeros(0, 512)).shape == (0, 352)
