"""``gemma2-convert demo``: the whole product on an embedded tiny model, each step verified."""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gemma2_convert.formats import open_checkpoint
from gemma2_convert.formats.adapter import write_random_adapter
from gemma2_convert.formats.keras_writer import write_keras_preset
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.formats.orbax_writer import write_orbax
from gemma2_convert.formats.orig_config import ShapeOptions
from gemma2_convert.formats.output import check_output
from gemma2_convert.formats.testing import write_random_orig_ckpt
from gemma2_convert.formats.tokenizer.tiny import make_tiny_spm
from gemma2_convert.pipeline.convert import convert, orig_to_hf
from gemma2_convert.pipeline.gguf import to_gguf
from gemma2_convert.pipeline.llama_runner import llama_cpp_logits
from gemma2_convert.pipeline.load import from_pretrained
from gemma2_convert.pipeline.quantize import QuantizeOptions, quantize_checkpoint
from gemma2_convert.pipeline.verify import verify_paths
from quant.metrics import kl_divergence, top1_agreement
from reference import Gemma2Config, Gemma2ForCausalLM
from reference.weights import expected_shapes


@dataclass
class DemoRow:
    step: str
    artifact: str
    size: int
    check: str
    ok: bool
    seconds: float = 0.0
    skipped: bool = False
    """Not run: an optional dependency is missing (``check`` says which); counts as no failure."""


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def step_make_checkpoint(work: Path, cfg: Gemma2Config, seed: int) -> DemoRow:
    """A tiny model in the original gemma_pytorch format (model.ckpt + tokenizer.model), as downloaded."""
    orig = work / "tiny-orig"
    write_random_orig_ckpt(orig / "model.ckpt", cfg, seed)
    make_tiny_spm(orig / "tokenizer.model", cfg.vocab_size)
    n = sum(math.prod(s) for s in expected_shapes(cfg).values())
    return DemoRow("make tiny gemma_pytorch model", "tiny-orig/model.ckpt", _size(orig),
                   f"{n:,} params, {cfg.num_hidden_layers} layers, seed {seed}", True)


def step_orig_to_hf(work: Path, cfg: Gemma2Config) -> DemoRow:
    """gemma2-convert orig-to-hf, verified: tensors equal and identical reference logits."""
    res = orig_to_hf(work / "tiny-orig", work / "tiny-hf", shape=ShapeOptions(config=cfg))
    rep = res.report
    assert rep is not None
    check = (f"{rep.tensors_equal}/{rep.tensors_total} tensors equal, max |Δ logits| {rep.max_abs_logits:g}, "
             f"top-1 {rep.top1:.0%}")
    return DemoRow("orig-to-hf + verify", "tiny-hf", _size(work / "tiny-hf"), check, rep.passed)


FLAX_PADDING = 64
"""Embedding rows the Flax step adds past the vocabulary, as the released checkpoints pad 256000 to 256128."""


def step_flax_to_hf(work: Path, cfg: Gemma2Config) -> DemoRow:
    """tiny-hf written as a Kaggle-style Flax archive (Orbax, padded embedding, gating [2, I, H]; jax-free),
    then ``gemma2-convert orig-to-hf`` on it, verified, and its tensors compared with tiny-hf's."""
    label = "Flax (Orbax) → HF + verify"
    try:
        import tensorstore  # noqa: F401
    except ImportError:
        return DemoRow(label, "", 0, "skipped: pip install 'gemma2-convert[flax]'", True, skipped=True)

    hf = open_checkpoint(work / "tiny-hf")
    flax = work / "tiny-flax"
    write_orbax(flax / "gemma2-tiny", cfg, hf.tensors, rows=cfg.vocab_size + FLAX_PADDING, gating_transposed=True)
    shutil.copy(work / "tiny-orig" / "tokenizer.model", flax / "tokenizer.model")
    rep = orig_to_hf(flax, work / "tiny-flax-hf", shape=ShapeOptions(config=cfg)).report
    assert rep is not None
    back = open_checkpoint(work / "tiny-flax-hf").tensors
    same = sum(torch.equal(back[k].load(), t.load()) for k, t in hf.tensors.items())
    check = (f"{rep.tensors_equal}/{rep.tensors_total} tensors equal, max |Δ logits| {rep.max_abs_logits:g}, "
             f"top-1 {rep.top1:.0%}; {same}/{len(hf.tensors)} equal tiny-hf")
    return DemoRow(label, "tiny-flax → tiny-flax-hf", _size(flax), check, rep.passed and same == len(hf.tensors))


def step_keras_to_hf(work: Path, cfg: Gemma2Config) -> DemoRow:
    """tiny-hf written as a KerasHub preset (h5py; keras-free), then ``gemma2-convert orig-to-hf`` on it,
    verified, and its tensors compared with tiny-hf's. A KerasHub config states the query scale as head_dim
    or hidden/heads only, so the preset's model takes head_dim (the tensors are tiny-hf's)."""
    label = "Keras (KerasHub) → HF + verify"
    try:
        import h5py  # noqa: F401  (deferred: the optional keras extra)
    except ImportError:
        return DemoRow(label, "", 0, "skipped: pip install 'gemma2-convert[keras]'", True, skipped=True)

    hf = open_checkpoint(work / "tiny-hf")
    keras = work / "tiny-keras"
    write_keras_preset(keras, cfg.replace(query_pre_attn_scalar=cfg.head_dim), hf.tensors,
                       tokenizer=work / "tiny-orig" / "tokenizer.model")
    rep = orig_to_hf(keras, work / "tiny-keras-hf").report
    assert rep is not None
    back = open_checkpoint(work / "tiny-keras-hf").tensors
    same = sum(torch.equal(back[k].load(), t.load()) for k, t in hf.tensors.items())
    check = (f"{rep.tensors_equal}/{rep.tensors_total} tensors equal, max |Δ logits| {rep.max_abs_logits:g}, "
             f"top-1 {rep.top1:.0%}; {same}/{len(hf.tensors)} equal tiny-hf (query scale head_dim)")
    return DemoRow(label, "tiny-keras → tiny-keras-hf", _size(keras), check, rep.passed and same == len(hf.tensors))


def step_generate(work: Path) -> DemoRow:
    model = from_pretrained(work / "tiny-hf", Gemma2ForCausalLM)
    prompt = torch.tensor([[model.config.bos_token_id, 10, 11, 12]])
    n = 2 * model.config.sliding_window + 8  # long enough to wrap the sliding-window ring buffer
    cached = model.generate(prompt, n)
    recomputed = model.generate(prompt, n, use_cache=False)
    ok = torch.equal(cached, recomputed)
    return DemoRow("reference generate", "tiny-hf", 0,
                   f"{cached.shape[1] - prompt.shape[1]} tokens, hybrid cache == recompute", ok)


def step_quantize(work: Path, fmt: str) -> DemoRow:
    """gemma2-quantize int4 (g32, mse), verified against the HF model by the reference; a GGUF output
    is also run by llama.cpp when llama-cpp-python is installed."""
    out = work / ("tiny-int4-ct" if fmt == "hf" else "tiny-q4_0.gguf")
    res = quantize_checkpoint(work / "tiny-hf", out, QuantizeOptions(4, 32, True, "mse", fmt))
    q = res.quality
    check = f"{res.quantized} tensors, KL {q['mean_kl']:.2g}, top-1 {q['top1']:.0%}"
    ok = True
    if fmt == "gguf":
        try:
            kl, top1 = _llama_cpp_kl(work / "tiny-hf", out)
            check += f"; in llama.cpp KL {kl:.2g}, top-1 {top1:.0%}"
            ok = kl <= 2 * q["mean_kl"] + 1e-3 and top1 >= 0.9
        except ImportError:
            check += "; llama-cpp-python not installed"
    label = "quantize int4 → compressed-tensors" if fmt == "hf" else "quantize int4 → GGUF Q4_0"
    return DemoRow(label, out.name, res.output_bytes, check, ok)


LLAMA_CPP_MAX_ABS = 5e-3
"""llama.cpp (F32 GGUF) vs the reference in float32: the acceptance bound on max |Δ logits|."""


def step_gguf(work: Path) -> DemoRow:
    """The HF model → F32 GGUF (verified by reading it back); llama.cpp runs it when installed."""
    src, out = work / "tiny-hf", work / "tiny-f32.gguf"
    tok = src / "tokenizer.model"
    if not tok.is_file():
        tok = make_tiny_spm(work / "tokenizer.model", Gemma2Config.from_json_file(src / "config.json").vocab_size)
    res = to_gguf(src, out, type_name="f32", tokenizer=tok)
    check = f"read back: logits max |Δ| {res.report.max_abs_logits:.2g}" if res.report else "written"
    ok = res.report is None or res.report.passed
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return DemoRow("GGUF (llama.cpp)", out.name, res.nbytes, check + "; llama-cpp-python not installed", ok)
    diff, top1 = llama_cpp_vs_reference(src, out)
    ok = ok and diff <= LLAMA_CPP_MAX_ABS and top1 == 1.0
    return DemoRow("GGUF (llama.cpp)", out.name, res.nbytes,
                   f"{check}; llama.cpp vs reference max |Δ| {diff:.2g}, top-1 {top1:.0%}", ok)


def step_adapter(work: Path, seed: int) -> DemoRow:
    """convert --adapter: a tiny LoRA (attention and the tied head) merged, then verified against the reference
    running it unmerged (``verify BASE+ADAPTER``)."""
    cfg = open_checkpoint(work / "tiny-hf").config
    lora = write_random_adapter(work / "tiny-lora", cfg, seed)
    res = convert(work / "tiny-hf", work / "tiny-merged", ConvertOptions(to="hf", adapters=(lora,)))
    rep = verify_paths(f"{work / 'tiny-hf'}+{lora}", work / "tiny-merged")
    untied = ", head untied" if res.details["adapters"]["untied_head"] else ""
    check = (f"{res.details['adapters']['merged']} weights merged{untied}; vs unmerged reference: max |Δ logits| "
             f"{rep.max_abs_logits:.2g}, top-1 {rep.top1:.0%}")
    return DemoRow("convert --adapter + verify BASE+ADAPTER", "tiny-merged", _size(work / "tiny-merged"), check,
                   rep.passed)


def llama_cpp_vs_reference(ref_path: Path, gguf: Path, n_tokens: int = 64, seed: int = 0) -> tuple[float, float]:
    """max |Δ logits| and top-1 agreement of llama.cpp on ``gguf`` vs the reference (float32) on ``ref_path``,
    over a seeded random sequence of ``n_tokens`` starting with <bos>."""
    ref = from_pretrained(ref_path, Gemma2ForCausalLM, dtype=torch.float32)
    cfg = ref.config
    g = torch.Generator().manual_seed(seed)
    ids = [cfg.bos_token_id] + torch.randint(3, cfg.vocab_size, (n_tokens - 1,), generator=g).tolist()
    got = llama_cpp_logits(gguf, [ids])[0]  # [T, V]
    with torch.no_grad():
        want = ref(torch.tensor([ids]))[0]  # [T, V]
    return (got - want).abs().max().item(), (got.argmax(-1) == want.argmax(-1)).float().mean().item()


def _llama_cpp_kl(src: Path, gguf: Path) -> tuple[float, float]:
    """KL(reference on src ‖ llama.cpp on gguf) and top-1 agreement on a seeded random prompt."""
    import llama_cpp  # noqa: F401  (ImportError when the test extra is missing)

    ref = from_pretrained(src, Gemma2ForCausalLM)
    ids = [ref.config.bos_token_id] + torch.randint(3, ref.config.vocab_size, (47,),
                                                    generator=torch.Generator().manual_seed(0)).tolist()
    got = llama_cpp_logits(gguf, [ids])[0]
    want = ref(torch.tensor([ids]))[0]
    return kl_divergence(want, got), top1_agreement(want, got)


def run_demo(work: Path | None, seed: int = 0, on_row: Callable[[DemoRow], None] | None = None) -> list[DemoRow]:
    """Run every step in ``work`` (empty or absent, else refused), or in a temporary directory deleted after
    (``work`` None); returns one row per step, each also passed to ``on_row`` as it finishes."""
    if work is not None:
        check_output(work, force=False)
        work.mkdir(parents=True, exist_ok=True)
        return run_steps(work, seed, on_row)
    tmp = Path(tempfile.mkdtemp(prefix="gemma2-demo-"))
    try:
        return run_steps(tmp, seed, on_row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_steps(work: Path, seed: int, on_row: Callable[[DemoRow], None] | None) -> list[DemoRow]:
    """Every step of the demo in the directory ``work``."""
    cfg = Gemma2Config.preset("tiny")
    plan: list[Callable[[], DemoRow]] = [
        lambda: step_make_checkpoint(work, cfg, seed),
        lambda: step_orig_to_hf(work, cfg),
        lambda: step_flax_to_hf(work, cfg),
        lambda: step_keras_to_hf(work, cfg),
        lambda: step_generate(work),
        lambda: step_adapter(work, seed),
        lambda: step_gguf(work),
        lambda: step_quantize(work, "hf"),
        lambda: step_quantize(work, "gguf"),
    ]
    rows = []
    for step in plan:
        t0 = time.perf_counter()
        row = step()
        row.seconds = time.perf_counter() - t0
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows
