"""``--method gptq`` with an allocation (``pipeline/typed_gptq.py``): every allocated type written by GPTQ.

Numbers asserted: for the legacy types (Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0) the written blocks hold exactly
GPTQ's fp16 scales and codes (``u = q + 2^(b-1)``, unpacked by ``quant.gguf_blocks``); for the grid types
(Q2_K / Q3_K / Q4_K / …) llama.cpp's scales and GPTQ's codes, decoding to the grid values GPTQ chose; each
weight's layer error ``tr(ΔW H ΔWᵀ)`` is below llama.cpp's importance-weighted quantizer at the same bytes.
End to end, llama.cpp runs a file whose decoder weights are Q2_K / Q3_K / Q5_0 / Q5_1 by GPTQ, agrees with our
decoder of the same file, and its KL is below the same types by llama.cpp's quantizer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gemma2_convert.formats import open_checkpoint
from gemma2_convert.pipeline.typed_gptq import OWN_CODES, TypedGPTQ
from quant.gguf_blocks import codes_from_blocks
from quant.gguf_codec import dequantize_tensor, quantize_tensor
from quant.gptq_scales import refine
from quant.grid_gptq import GRID_TYPES, choose_grid
from quant.methods import quantize_weight
from quant.qparams import dequantize

FIX = Path(__file__).parent / "fixtures"
MODEL, CAL, EVAL = FIX / "gemma2-tiny-trained", FIX / "calibration.txt", FIX / "eval.txt"
NAME = "model.layers.0.self_attn.q_proj.weight"  # [512, 256]


def _hessian(cols: int, seed: int = 0) -> torch.Tensor:
    """``2/n XᵀX`` of correlated inputs (a low-rank mix plus channel scales, as in a layer)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 16, generator=g) @ torch.randn(16, cols, generator=g) \
        + 0.3 * torch.randn(2048, cols, generator=g)
    x = x * (0.2 + 3 * torch.rand(cols, generator=g))
    return 2 * x.T @ x / x.shape[0]


def _layer_error(w: torch.Tensor, approx: torch.Tensor, h: torch.Tensor) -> float:
    d = (w - approx).double()
    return float(((d @ h.double()) * d).sum())


@pytest.fixture(scope="module")
def weight() -> tuple:
    ckpt = open_checkpoint(MODEL)
    w = ckpt.tensors[NAME].load().float()
    h = _hessian(w.shape[1])
    return ckpt, w, h, h.diagonal() / 2  # importance: the mean squared input per column


def _engine(ckpt, qtype: str, imp: torch.Tensor) -> TypedGPTQ:
    return TypedGPTQ(ckpt, {NAME: qtype}, {NAME: imp}, torch.tensor([[2, 5, 6, 7]]))


@pytest.mark.parametrize("qtype", sorted(OWN_CODES))
def test_legacy_blocks_hold_gptqs_scales_and_codes(weight, qtype: str) -> None:
    ckpt, w, h, imp = weight
    typed = _engine(ckpt, qtype, imp)
    data, approx = typed.quantize(NAME, w, h)
    spec, factor = OWN_CODES[qtype], typed.factor(h)
    q, s, z = quantize_weight(w, spec, name=NAME, factor=factor, scale_dtype=torch.float16)
    q, s = refine(w, q, s, z, h, spec.bits, factor)
    c = codes_from_blocks(data, qtype, tuple(w.shape))
    half = 1 << (spec.bits - 1)
    assert torch.equal(c.u.to(torch.int16), q.to(torch.int16) + half)  # GPTQ's codes, not re-rounded
    assert torch.equal(c.scale, s.float())
    if z is not None:  # x = d·u + m, m = fp16(−s·(z + h)): GPTQ's (q − z)·s up to m's rounding
        assert torch.equal(c.offset, (-s.float() * (z.float() + half)).half().float())
        assert (approx - dequantize(q, s.float(), z)).abs().max() <= 2 ** -11 * c.offset.abs().max()
    else:
        assert torch.equal(approx, dequantize(q, s.float(), z))
    assert torch.equal(approx, dequantize_tensor(data, qtype, tuple(w.shape)))  # propagated = written
    stock = dequantize_tensor(quantize_tensor(w, qtype, quant_weights=imp), qtype, tuple(w.shape))
    ratio = _layer_error(w, approx, h) / _layer_error(w, stock, h)
    assert ratio < 0.8, f"{qtype}: layer error {ratio:.3f}× llama.cpp's imatrix quantizer"


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K"])
def test_grid_blocks_keep_llama_cpp_scales_and_take_gptqs_codes(weight, qtype: str) -> None:
    assert qtype in GRID_TYPES
    ckpt, w, h, imp = weight
    data, approx = _engine(ckpt, qtype, imp).quantize(NAME, w, h)
    grid, _ = choose_grid(w, qtype, imp)
    stock_raw = quantize_tensor(w, qtype, quant_weights=imp)
    stock = dequantize_tensor(stock_raw, qtype, tuple(w.shape))
    assert data.shape == stock_raw.shape
    assert torch.equal(approx, dequantize_tensor(data, qtype, tuple(w.shape)))  # propagated = written
    step = torch.where(grid.step != 0, grid.step, torch.ones_like(grid.step))
    q = torch.where(grid.step != 0, grid.nearest((approx - grid.offset) / step), torch.zeros_like(approx))
    assert torch.equal(grid.value(q), torch.where(grid.step != 0, approx, grid.offset))  # on llama.cpp's grid
    moved = float((approx != stock).float().mean())
    ratio = _layer_error(w, approx, h) / _layer_error(w, stock, h)
    assert moved > 0.05 and ratio < 0.8, f"{qtype}: {moved:.1%} values moved, layer error {ratio:.3f}×"


ALLOCATED = ("Q2_K", "Q3_K", "Q5_0", "Q5_1")


def _assignment(ckpt) -> dict[str, str]:
    """Every decoder matrix of the fixture cycles through ``ALLOCATED``; the tied embedding Q8_0."""
    names = [n for n, t in ckpt.tensors.items() if n.startswith("model.layers.") and len(t.shape) == 2]
    types = {n: ALLOCATED[i % len(ALLOCATED)] for i, n in enumerate(names)}
    return types | {"model.embed_tokens.weight": "Q8_0"}


@pytest.mark.slow  # two calibrated quantizations and three llama.cpp runs of the trained fixture (~1 min)
def test_llama_cpp_runs_gptq_in_every_new_type(tmp_path: Path, monkeypatch) -> None:
    from gemma2_convert.formats.gguf.file import GGUFFile
    from gemma2_convert.formats.gguf.names import gguf_name
    from gemma2_convert.pipeline import quantize as quantize_module
    from gemma2_convert.pipeline.gguf import to_gguf
    from gemma2_convert.pipeline.llama_runner import llama_cpp_logits
    from gemma2_convert.pipeline.load import from_pretrained
    from gemma2_convert.pipeline.quality import eval_prompts
    from gemma2_convert.pipeline.quantize import QuantizeOptions, quantize_checkpoint
    from quant.metrics import kl_divergence
    from reference import Gemma2ForCausalLM
    from tests.gguf_helpers import llama_logits

    ckpt = open_checkpoint(MODEL)
    types = _assignment(ckpt)
    monkeypatch.setattr(quantize_module, "choose_types", lambda *a, **k: types)
    written: dict[str, torch.Tensor] = {}
    quantize = TypedGPTQ.quantize

    def spy(self, name, w, hessian):
        data, approx = quantize(self, name, w, hessian)
        written[name] = data
        return data, approx

    monkeypatch.setattr(TypedGPTQ, "quantize", spy)
    files = {m: tmp_path / f"{m}.gguf" for m in ("gptq", "mse")}
    for m, path in files.items():  # mse: the same types by llama.cpp's quantizer with the same importance
        opts = QuantizeOptions(4, 32, True, m, "gguf", calibration=CAL, verify=False, target_size=10 ** 7)
        quantize_checkpoint(MODEL, path, opts)
    f = GGUFFile(files["gptq"])
    got_types = {t.type_name for n, t in f.tensors.items() if n.startswith("blk.") and n.endswith("weight")
                 and t.type_name != "F32"}
    assert got_types == set(ALLOCATED) and len(written) == len(types) - 1
    for hf, data in written.items():  # the writer wrote GPTQ's bytes
        assert f.tensors[gguf_name(hf)].type_name == types[hf], hf
        assert (f.raw(gguf_name(hf)).reshape(-1) == data.numpy().reshape(-1)).all(), hf
    ids = [p[0].tolist() for p in eval_prompts(ckpt, EVAL.read_text(), 128, max_seqs=8)]
    ours = llama_logits(files["gptq"], ids[0])
    model = from_pretrained(files["gptq"], Gemma2ForCausalLM, dtype=torch.float32)  # our decoder of the file
    with torch.no_grad():
        ref = model(torch.tensor([ids[0]]))[0]
    top1 = float((ours.argmax(-1) == ref.argmax(-1)).float().mean())
    assert top1 >= 0.95, f"llama.cpp vs our decoder of the same file: top-1 {top1:.2%}"
    to_gguf(MODEL, tmp_path / "f32.gguf", type_name="f32", verify=False)
    base = torch.cat(llama_cpp_logits(tmp_path / "f32.gguf", ids))
    kl = {m: kl_divergence(base, torch.cat(llama_cpp_logits(p, ids))) for m, p in files.items()}
    print(f"types {ALLOCATED}: llama.cpp vs our decoder top-1 {top1:.2%}, "
          f"max |Δ| {(ours - ref).abs().max():.3g}; "
          f"KL gptq {kl['gptq']:.4g}, llama.cpp's quantizer {kl['mse']:.4g}")
    assert kl["gptq"] < 0.8 * kl["mse"], kl
