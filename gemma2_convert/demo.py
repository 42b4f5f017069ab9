"""``gemma2-convert demo``: the whole product on an embedded tiny model, each step verified."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

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


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def step_make_checkpoint(work: Path, cfg: Gemma2Config, seed: int) -> DemoRow:
    """A tiny model in the original gemma_pytorch format (model.ckpt + tokenizer.model), as downloaded."""
    from gemma2_convert.testing import write_random_orig_ckpt
    from gemma2_convert.tiny_tokenizer import make_tiny_spm

    orig = work / "tiny-orig"
    write_random_orig_ckpt(orig / "model.ckpt", cfg, seed)
    make_tiny_spm(orig / "tokenizer.model", cfg.vocab_size)
    n = sum(math.prod(s) for s in expected_shapes(cfg).values())
    return DemoRow("make tiny gemma_pytorch model", "tiny-orig/model.ckpt", _size(orig),
                   f"{n:,} params, {cfg.num_hidden_layers} layers, seed {seed}", True)


def step_orig_to_hf(work: Path, cfg: Gemma2Config) -> DemoRow:
    """gemma2-convert orig-to-hf, verified: tensors equal and identical reference logits."""
    from gemma2_convert.convert import orig_to_hf
    from gemma2_convert.formats.orig_config import ShapeOptions

    res = orig_to_hf(work / "tiny-orig", work / "tiny-hf", shape=ShapeOptions(config=cfg), quiet=True)
    rep = res.report
    assert rep is not None
    check = (f"{rep.tensors_equal}/{rep.tensors_total} tensors equal, max |Δ logits| {rep.max_abs_logits:g}, "
             f"top-1 {rep.top1:.0%}")
    return DemoRow("orig-to-hf + verify", "tiny-hf", _size(work / "tiny-hf"), check, rep.passed)


def step_generate(work: Path) -> DemoRow:
    model = Gemma2ForCausalLM.from_pretrained(str(work / "tiny-hf"))
    prompt = torch.tensor([[model.config.bos_token_id, 10, 11, 12]])
    n = 2 * model.config.sliding_window + 8  # long enough to wrap the sliding-window ring buffer
    cached = model.generate(prompt, n)
    recomputed = model.generate(prompt, n, use_cache=False)
    ok = torch.equal(cached, recomputed)
    return DemoRow("reference generate", "tiny-hf", 0,
                   f"{cached.shape[1] - prompt.shape[1]} tokens, hybrid cache == recompute", ok)


def run_demo(work: Path, seed: int = 0, on_row: Callable[[DemoRow], None] | None = None) -> list[DemoRow]:
    """Run every step in ``work`` (an empty directory); returns one row per step."""
    cfg = Gemma2Config.preset("tiny")
    plan: list[Callable[[], DemoRow]] = [
        lambda: step_make_checkpoint(work, cfg, seed),
        lambda: step_orig_to_hf(work, cfg),
        lambda: step_generate(work),
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
