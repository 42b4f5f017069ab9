"""GPTQ's cost at the 2B shape: one ``XᵀX`` per input, shared by the weights it feeds, factored once.

Numbers asserted: the block-triangular ``XᵀX`` equals the full product bit for bit; the feedback matrix (one
factorization, no inverse) is the textbook ``U``'s inverse, column-scaled, to float32 precision; the float32
column loop on it agrees with the paper's float64 loop (``tests/gptq_textbook.py``: ≥ 97 % of codes equal, the
layer error within 0.5 % — rounding ties flip, so not bit for bit); q/k/v and gate/up share one Hessian
object; and sequential GPTQ with shared Hessians gives the codes of the per-weight loop it replaced, bit for
bit (same factorization on both sides).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gemma2_convert.formats import open_checkpoint
from gemma2_convert.pipeline.calibrate import (
    InputHessians,
    SequentialGPTQ,
    calibration_ids,
)
from gemma2_convert.pipeline.quantize import QuantizeOptions, plan_specs
from quant.methods import quantize_weight
from quant.methods.gptq import (
    XTX_BLOCK,
    add_xtx,
    error_feedback,
    feedback_factor,
    mirror_upper,
)
from quant.qparams import dequantize
from reference.model import Gemma2Model
from reference.weights import WeightStore
from tests.gptq_textbook import (
    accumulate_hessian,
    layer_error,
    textbook_gptq,
    textbook_u,
)

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


def correlated(n: int, seed: int) -> torch.Tensor:
    """A Hessian ``2/m XᵀX [n, n]`` of inputs with a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, n, generator=g) * torch.logspace(0, -2, n)
    return 2 / x.shape[0] * (x.T @ x)


@pytest.mark.parametrize("n", [96, 1100])
def test_feedback_factor_is_the_textbook_inverse(n: int) -> None:
    """``T = U⁻¹ · diag(U)`` (``U⁻¹`` is ``R``, ``R_jj = 1 / U_jj``), ``U`` from factor–invert–factor in
    float64."""
    h = correlated(n, 1)
    t, u = feedback_factor(h, 0.01), textbook_u(h, 0.01)
    ref = torch.linalg.solve_triangular(u, torch.eye(n, dtype=torch.float64), upper=True) * u.diagonal()
    assert torch.equal(t, t.triu()) and bool((t.diagonal() == 1).all())
    err = float((t.double() - ref).abs().max() / ref.abs().max())
    assert err < 1e-4, f"max relative difference {err:.3g}"


@pytest.mark.parametrize("block", [128, 50])
def test_column_loop_agrees_with_the_textbook(block: int) -> None:
    """The float32 loop on ``T`` (lazy blocks, a partial last block) vs the paper's float64 loop on ``U``,
    each column rounded on a fixed int4 grid (scale per row and 32 columns)."""
    g = torch.Generator().manual_seed(3)
    w, h = torch.randn(300, 320, generator=g), correlated(320, 4) + 0.05 * torch.eye(320)
    scale = w.abs().view(300, 10, 32).amax(-1).repeat_interleave(32, 1) / 7         # [out, in]

    def column(c: int, col: torch.Tensor, _blk) -> tuple[torch.Tensor, torch.Tensor]:
        s = scale[:, c].to(col.dtype)
        q = torch.clamp(torch.round(col / s), -8, 7)
        return q, q * s

    got = error_feedback(w.clone(), feedback_factor(h, 0.01), block, column)
    ref = textbook_gptq(w, h, column)
    same = float((got.double() == ref).float().mean())
    e_got, e_ref = layer_error(w, got * scale, h), layer_error(w, ref * scale, h)
    print(f"codes equal {same:.2%}, layer error {e_got / e_ref:.5f}× the textbook's")
    assert same >= 0.97, f"{same:.2%} of codes equal the textbook's"
    assert abs(e_got / e_ref - 1) < 0.005, f"layer error {e_got:.5g} vs textbook {e_ref:.5g}"
    plain = layer_error(w, torch.clamp(torch.round(w / scale), -8, 7) * scale, h)
    assert e_got < 0.95 * plain, f"GPTQ {e_got:.4g} vs round-to-nearest {plain:.4g}"


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


def test_observe_layer_sees_what_the_full_layer_sees() -> None:
    """The observation pass (``Gemma2Model.observe_layer``) feeds the observer the very inputs a full forward
    does, bit for bit, and never multiplies by down_proj."""
    ckpt = open_checkpoint(MODEL)
    ids = calibration_ids(ckpt, CAL.read_text(), 128, 4)
    model = Gemma2Model(ckpt.config, WeightStore(ckpt.tensors, ckpt.config, torch.float32))
    s = model.start(ids)
    full: dict[str, torch.Tensor] = {}
    part: dict[str, torch.Tensor] = {}
    products: list[str] = []
    linear = model.packer.linear
    model.packer.linear = lambda name, *a: products.append(name) or linear(name, *a)  # type: ignore
    with torch.no_grad():
        model.observer = lambda n, x: full.__setitem__(n, x.clone())
        out = model._layer(1, s.h, s.cos, s.sin, s.q_idx, None, None, None)
        products.clear()
        model.observer = lambda n, x: part.__setitem__(n, x.clone())
        h0 = s.h.clone()
        model.observe_layer(1, s.h, s.cos, s.sin, s.q_idx)
    assert sorted(full) == sorted(part) and len(full) == 7
    for n in full:
        assert torch.equal(full[n], part[n]), f"{n}: max |Δ| {float((full[n] - part[n]).abs().max()):.3g}"
    assert [n.split(".")[-2] for n in products] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                    "up_proj"]
    assert torch.equal(s.h, h0) and not torch.equal(out, h0)


@pytest.mark.slow  # GPTQ over the fixture's 4 layers twice (~10 s quiet; 500 s at load 17)
@pytest.mark.parametrize("act_order", [True, False])
def test_shared_hessians_keep_the_codes(act_order: bool) -> None:
    """Before/after: the per-weight loop (each weight its own Hessian and factorization, as before sharing)
    and SequentialGPTQ give the same codes and scales in every layer (GPTQ's own scales: ``refine=None``)."""
    ckpt = open_checkpoint(MODEL)
    ids = calibration_ids(ckpt, CAL.read_text(), 128, 8)
    specs = plan_specs(ckpt, QuantizeOptions(format="gguf", method="gptq", symmetric=act_order))
    layers = {n: s for n, s in specs.items() if s is not None and "layers." in n}
    engine = SequentialGPTQ(ckpt, layers, ids, scale_dtype=torch.float16, act_order=act_order, refine=None,
                           forward_dtype=torch.float32)
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
