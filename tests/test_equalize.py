"""Equalization (``--equalize``): AWQ scales folded exactly into the norms, up_proj and v_proj.

The folded float model computes the same logits as the original (max |Δ| ≤ 1e-4 in fp32), with random scales
on every GQA layout and with the searched scales on the trained fixture; then each method quantizes the
equalized model (KL on held-out text, numbers asserted).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats import open_checkpoint
from gemma2_convert.formats.registry import Checkpoint
from gemma2_convert.pipeline.calibrate import calibration_ids
from gemma2_convert.pipeline.equalize import fold_checkpoint, measure_scales
from gemma2_convert.pipeline.quantize import QuantizeOptions, plan_specs, quantize_checkpoint
from quant.equalize import LayerScales, awq_scales, fold_norm, o_proj_scales, snap_scales
from reference.layers import repeat_kv
from reference.model import Gemma2ForCausalLM
from reference.weights import WeightStore
from tests.conftest import TINY_CONFIGS, hf_state_dict, make_hf_model

FIX = Path(__file__).parent / "fixtures"
MODEL, CAL, EVAL = FIX / "gemma2-tiny-trained", FIX / "calibration.txt", FIX / "eval.txt"


def logits(ckpt: Checkpoint, ids: torch.Tensor) -> torch.Tensor:
    return Gemma2ForCausalLM(ckpt.config, WeightStore(ckpt.tensors, ckpt.config, torch.float32))(ids)


def assert_same_logits(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    d = (a - b).abs()
    idx = tuple(int(i) for i in torch.unravel_index(d.argmax(), d.shape))
    got = float(d.max())
    assert got <= tol, f"max |Δ logits| {got:.3g} at {idx}: {float(a[idx])} vs {float(b[idx])}"


def test_fold_norm_and_o_scales_follow_the_layout() -> None:
    w, s = torch.tensor([0.5, -0.25, 0.0]), torch.tensor([2.0, 0.5, 4.0])
    assert torch.equal(fold_norm(w, s), torch.tensor([-0.25, 0.5, -0.75]))  # (1 + w) / s − 1
    s_v = torch.arange(1.0, 7.0)  # K = 2 kv heads of D = 3
    so = o_proj_scales(s_v, 4, 2)  # N = 4 query heads: 0, 1 read kv head 0; 2, 3 read kv head 1
    v = s_v.view(1, 2, 1, 3)  # [B, K, S, D]: the per-channel factors as repeat_kv lays them out
    assert torch.equal(so, repeat_kv(v, 2).reshape(-1))
    a = awq_scales(torch.tensor([1.0, 4.0, 16.0]), 0.5)
    assert torch.allclose(a, torch.tensor([0.5, 1.0, 2.0]))  # √x, centred so max · min = 1


def test_snapped_scales_make_the_folded_norm_exact_in_bf16() -> None:
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(64, generator=g) * 0.5).to(torch.bfloat16)
    s = torch.exp(torch.randn(64, generator=g))
    snapped = snap_scales(w, s, torch.bfloat16)
    folded = fold_norm(w, snapped)
    assert torch.allclose(snapped, s, rtol=0.1)  # bf16's step near w' = -1 moves a large s by a few %
    assert torch.allclose(folded, folded.to(torch.bfloat16).float(), rtol=0, atol=1e-6)  # representable
    assert torch.allclose((1 + folded) * snapped, 1 + w.float(), rtol=1e-6)  # and still exact


@pytest.mark.parametrize("name", ["mha", "gqa2", "gqa4"])
def test_random_scales_fold_exactly(name: str, tmp_path: Path) -> None:
    cfg = TINY_CONFIGS[name]
    sd = hf_state_dict(make_hf_model(cfg, seed=3))
    ckpt = Checkpoint("hf", tmp_path, cfg, {k: LazyTensor.of(v) for k, v in sd.items()})
    g = torch.Generator().manual_seed(1)

    def rand(n: int) -> torch.Tensor:
        return torch.exp(torch.randn(n, generator=g))  # scales over about two orders of magnitude

    H, I, KD = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    scales = [LayerScales(rand(H), rand(H), rand(I), rand(KD)) for _ in range(cfg.num_hidden_layers)]
    folded = fold_checkpoint(ckpt, scales)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
    assert not torch.equal(folded.tensors["model.layers.0.self_attn.o_proj.weight"].load(),
                           sd["model.layers.0.self_attn.o_proj.weight"])
    assert_same_logits(logits(ckpt, ids), logits(folded, ids))


def fp32(ckpt: Checkpoint) -> Checkpoint:
    return dataclasses.replace(ckpt, tensors={n: t.to(torch.float32) for n, t in ckpt.tensors.items()})


def test_searched_scales_fold_exactly_on_the_trained_model() -> None:
    ckpt = fp32(open_checkpoint(MODEL))
    specs = plan_specs(ckpt, QuantizeOptions(format="gguf", group_size=32))
    scales, report = measure_scales(ckpt, specs, calibration_ids(ckpt, CAL.read_text(), 128, 4), rows=512)
    assert any(a > 0 for layer in report.alphas for a in layer)  # the search did choose scales
    assert all(r <= 1.0 for layer in report.ratios for r in layer)  # never worse than none, on calibration
    ids = calibration_ids(ckpt, EVAL.read_text(), 256, 2)
    assert_same_logits(logits(ckpt, ids), logits(fold_checkpoint(ckpt, scales), ids))


def kl(tmp_path: Path, method: str, fmt: str, equalize: bool) -> float:
    out = tmp_path / f"{method}-{fmt}-{equalize}{'.gguf' if fmt == 'gguf' else ''}"
    r = quantize_checkpoint(MODEL, out, QuantizeOptions(4, "auto", True, method, fmt, calibration=CAL,
                                                        eval_text=EVAL, equalize=equalize))
    return r.quality["mean_kl"]


@pytest.mark.slow
@pytest.mark.parametrize("method,fmt", [("rtn", "hf"), ("mse", "gguf"), ("gptq", "hf")])
def test_every_method_quantizes_the_equalized_model(tmp_path: Path, method: str, fmt: str) -> None:
    """Measured on this fixture (2026-12-07): the AWQ search lowers each layer's output error on the calibration
    text, but not the KL on held-out text (rtn int4 g128: 5.27e-4 equalized vs 4.64e-4), so ``--equalize`` is
    off by default; this holds it to within 1.25× of the plain model's KL with every method."""
    plain, eq = kl(tmp_path, method, fmt, False), kl(tmp_path, method, fmt, True)
    assert eq < 1.25 * plain, f"{method} → {fmt}: KL with --equalize {eq:.3e}, without {plain:.3e}"
