"""GPTQ's cost at the 2B shape: one ``XᵀX`` per input, shared by the weights it feeds, factored once.

Numbers asserted: the block-triangular ``XᵀX`` equals the full product bit for bit; the new inverse-Cholesky
factor (one factorization and a triangular inverse) matches factor–invert–factor to float32 precision; q/k/v
and gate/up share one Hessian object; and sequential GPTQ with shared Hessians gives the codes of the
per-weight loop it replaced, bit for bit (same factorization on both sides).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gemma2_convert.formats import open_checkpoint
from gemma2_convert.pipeline.calibrate import InputHessians, SequentialGPTQ, calibration_ids
from gemma2_convert.pipeline.quantize import QuantizeOptions, plan_specs
from quant.methods import quantize_weight
from quant.methods.gptq import (
    XTX_BLOCK,
    accumulate_hessian,
    add_xtx,
    error_feedback,
    inverse_cholesky_upper,
    lower_inverse,
    mirror_upper,
)
from quant.qparams import dequantize
from reference.model import Gemma2Model
from reference.weights import WeightStore

FIX = Path(__file__).parent / "fixtures"
MODEL, CAL = FIX / "gemma2-tiny-trained", FIX / "calibration.txt"


def test_block_triangular_xtx_is_the_full_product() -> None:
    g = torch.Generator().manual_seed(0)
    n = XTX_BLOCK + 280  # a partial last block
    x = torch.randn(3, 100, n, generator=g)
    full = x.reshape(-1, n).T @ x.reshape(-1, n)
    got = mirror_upper(add_xtx(None, x))
    assert torch.equal(got, full), f"max |Δ| {float((got - full).abs().max()):.3g}"
    two = mirror_upper(add_xtx(add_xtx(None, x[:2]), x[2:]))  # a second call accumulates
    torch.testing.assert_close(two, full, rtol=1e-5, atol=1e-3)


def old_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The factorization before: factor, invert, factor again."""
    h = h.clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


@pytest.mark.parametrize("n", [96, 1100])
def test_inverse_cholesky_matches_factor_invert_factor(n: int) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * n, n, generator=g) * torch.logspace(0, -2, n)  # a decaying spectrum
    h = 2 / x.shape[0] * (x.T @ x)
    u, ref = inverse_cholesky_upper(h, 0.01), old_factor(h, 0.01)
    assert torch.equal(u, u.triu()) and bool((u.diagonal() > 0).all())
    err = float((u - ref).abs().max() / ref.abs().max())
    assert err < 2e-5, f"max relative difference {err:.3g}"
    lower = torch.linalg.cholesky(h + torch.eye(n))
    torch.testing.assert_close(lower_inverse(lower, block=256) @ lower, torch.eye(n), rtol=0, atol=1e-5)


def columns_loop(w: torch.Tensor, u: torch.Tensor, block: int, column) -> torch.Tensor:
    """error_feedback as it was: the block held as ``[out, block]`` columns."""
    q = torch.zeros_like(w)
    for i1 in range(0, w.shape[1], block):
        i2 = min(i1 + block, w.shape[1])
        w1, err1, u1 = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1), u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            q[:, i1 + i], deq = column(i1 + i, w1[:, i], None)
            err = (w1[:, i] - deq) / u1[i, i]
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return q


def test_transposed_block_keeps_the_codes() -> None:
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(300, 320, generator=g), torch.randn(1024, 320, generator=g)
    u = inverse_cholesky_upper(x.T @ x / 512, 0.01)

    def column(c: int, col: torch.Tensor, _blk) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.clamp(col * 3, -8, 7).round_()
        return q, q / 3

    w1, w2 = w.clone(), w.clone()
    assert torch.equal(error_feedback(w1, u, 128, column), columns_loop(w2, u, 128, column))
    assert torch.equal(w1, w2)


def test_inputs_shared_by_qkv_and_gate_up() -> None:
    ckpt = open_checkpoint(MODEL)
    ids = calibration_ids(ckpt, CAL.read_text(), 128, 8)
    model = Gemma2Model(ckpt.config, WeightStore(ckpt.tensors, ckpt.config, torch.float32))
    names = [n for n in ckpt.tensors if n.startswith("model.layers.0.") and n.endswith("proj.weight")]
    hs, seen = InputHessians(names), {}

    def observe(name: str, x: torch.Tensor) -> None:
        hs.observe(name, x)
        seen[name] = accumulate_hessian(None, 0, x)[0]

    model.observer = observe
    with torch.no_grad():
        model.decode(ids)
    p = "model.layers.0."
    assert {k: [n[len(p):] for n in v] for k, v in hs.groups().items()} == {
        p + "self_attn.q_proj.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                        "self_attn.v_proj.weight"],
        p + "self_attn.o_proj.weight": ["self_attn.o_proj.weight"],
        p + "mlp.gate_proj.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
        p + "mlp.down_proj.weight": ["mlp.down_proj.weight"]}
    for owner, group in hs.groups().items():
        h = hs.take(owner)
        for name in group:
            assert torch.equal(h, seen[name]), f"{name}: the shared Hessian differs from its own"


@pytest.mark.slow  # GPTQ over the fixture's 4 layers twice (~10 s quiet; 500 s at load 17)
@pytest.mark.parametrize("act_order", [True, False])
def test_shared_hessians_keep_the_codes(act_order: bool) -> None:
    """Before/after: the per-weight loop (each weight its own Hessian and factorization, as before sharing)
    and SequentialGPTQ give the same codes and scales in every layer (GPTQ's own scales: ``refine=None``)."""
    ckpt = open_checkpoint(MODEL)
    ids = calibration_ids(ckpt, CAL.read_text(), 128, 8)
    specs = plan_specs(ckpt, QuantizeOptions(format="gguf", method="gptq", symmetric=act_order))
    layers = {n: s for n, s in specs.items() if s is not None and "layers." in n}
    engine = SequentialGPTQ(ckpt, layers, ids, scale_dtype=torch.float16, act_order=act_order, refine=None)
    got = {n: engine.result(n) for n in layers}

    model = Gemma2Model(ckpt.config, WeightStore(ckpt.tensors, ckpt.config, torch.float32, resident=False))
    stream = model.start(ids)
    store, h = model.weights, stream.h
    with torch.no_grad():
        for i in range(ckpt.config.num_hidden_layers):
            hessians: dict[str, torch.Tensor] = {}
            model.observer = lambda n, x: hessians.__setitem__(n, accumulate_hessian(None, 0, x)[0]) \
                if n in layers else None
            model._layer(i, h, stream.cos, stream.sin, stream.q_idx, None, None, None)
            model.observer = None
            for n, hess in hessians.items():
                q, s, z = quantize_weight(store.tensors[n].load(), layers[n], name=n, hessian=hess,
                                          scale_dtype=torch.float16, act_order=act_order)
                for a, b in zip((q, s, z), got[n]):
                    assert (a is None and b is None) or torch.equal(a, b), \
                        f"{n}: {float((a != b).float().mean()):.2%} differ"
                store.replace(n, dequantize(q, s, z))
            h = model._layer(i, h, stream.cos, stream.sin, stream.q_idx, None, None, None)
            for n in hessians:
                store.replace(n, None)
