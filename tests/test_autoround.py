"""``--method autoround``: learned rounding, exported exactly into the block layouts, better than rtn / mse.

Numbers asserted: the stored codes decode to what was optimized; on the trained fixture, layer by layer
through the quantized layers, autoround's KL on held-out text beats rtn and mse at the same layout (compressed-tensors
int4 g128 and GGUF Q4_0, which llama.cpp runs).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gemma2_convert.pipeline.autoround import AutoRoundSettings
from gemma2_convert.pipeline.quantize import QuantizeOptions, quantize_checkpoint
from quant.methods import QUANTIZERS, quantize_weight
from quant.methods.autoround import export, fake_quant, optimize, signed_step, start, start_from
from quant.qparams import dequantize
from quant.spec import METHODS, QuantSpec

FIX = Path(__file__).parent / "fixtures"
MODEL, CAL, EVAL = FIX / "gemma2-tiny-trained", FIX / "calibration.txt", FIX / "eval.txt"
QUICK = AutoRoundSettings()  # the defaults: from gptq, 100 steps, 8 of the calibration sequences a step


def test_registered_and_listed() -> None:
    assert "autoround" in QUANTIZERS and list(QUANTIZERS) == list(METHODS)


@pytest.mark.parametrize("symmetric", [True, False])
def test_export_decodes_to_the_optimized_weight(symmetric: bool) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    r = start(w, QuantSpec(4, 32, symmetric, "autoround"))
    with torch.no_grad():
        r.v.uniform_(-0.5, 0.5, generator=g)
        r.m.uniform_(0.8, 1.2, generator=g)
    q, s, z = export(r, torch.float32)
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
    assert torch.equal(dequantize(q, s, z).float(), fake_quant(r).detach())


@pytest.mark.parametrize("symmetric", [True, False])
def test_start_from_gptq_reproduces_its_codes(symmetric: bool) -> None:
    """Started from GPTQ's codes (which can lie more than half a step from W/s), the untrained export gives back
    exactly those codes and scales, and the offsets never leave centre ± 0.5."""
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(32, 256, generator=g) / 8, torch.randn(1024, 256, generator=g)
    spec = QuantSpec(4, 128, symmetric, "gptq")
    q, s, z = quantize_weight(w, spec, hessian=x.T @ x / 512, scale_dtype=torch.bfloat16, act_order=True)
    r = start_from(w, q, s, z, 4)
    assert float(r.centre.abs().max()) > 0.5  # GPTQ moved some codes by more than rounding would
    got = export(r, torch.bfloat16)
    assert torch.equal(got[0], q) and torch.equal(got[1], s)
    assert (z is None and got[2] is None) or torch.equal(got[2], z)
    with torch.no_grad():
        r.v.add_(3.0)
    (fake_quant(r) - w).square().sum().backward()
    signed_step([r], 0.01)
    assert float((r.v - r.centre).abs().max()) <= 0.5 + 1e-6


def test_layer_loss_falls_on_correlated_inputs() -> None:
    """The signed steps lower a matmul's output error below round-to-nearest's when inputs are correlated."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g) / 8
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, 64, generator=g)
    x = x + 0.1 * torch.randn(512, 64, generator=g)  # correlated columns: rank 8 plus a little noise
    r = start(w, QuantSpec(4, 32, True, "autoround"))
    first, best = optimize([r], lambda k: (x @ (fake_quant(r) - w).T).square().mean(), steps=60)
    assert best < 0.8 * first, f"loss {first:.4g} → {best:.4g}"
    h = x.T @ x
    q, s, z = quantize_weight(w, QuantSpec(4, 32, True, "autoround"), hessian=h, scale_dtype=torch.float32,
                              steps=60)
    qm, sm, zm = quantize_weight(w, QuantSpec(4, 32, True, "mse"), scale_dtype=torch.float32)
    err = [float((x @ (dequantize(*t).float() - w).T).square().mean()) for t in ((q, s, z), (qm, sm, zm))]
    assert err[0] < 0.8 * err[1], f"autoround {err[0]:.4g} vs mse {err[1]:.4g}"


def kl(tmp_path: Path, method: str, fmt: str) -> float:
    out = tmp_path / (f"{method}.gguf" if fmt == "gguf" else method)
    r = quantize_checkpoint(MODEL, out, QuantizeOptions(4, "auto", True, method, fmt, calibration=CAL,
                                                        eval_text=EVAL, autoround=QUICK))
    return r.quality["mean_kl"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_autoround_beats_rtn_and_mse(tmp_path: Path, fmt: str) -> None:
    got = {m: kl(tmp_path, m, fmt) for m in ("rtn", "mse", "autoround")}
    assert got["autoround"] < 0.7 * min(got["rtn"], got["mse"]), got
