"""``gemma2-convert demo``: the whole product on an embedded tiny model, each step verified."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from reference import Gemma2Config, Gemma2ForCausalLM


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
    from gemma2_convert.formats.hf import write_hf_dir
    from gemma2_convert.synthetic import random_tensors

    out = work / "tiny-hf"
    out.mkdir()
    items = list(random_tensors(cfg, seed, torch.float32).items())
    write_hf_dir(out, cfg, items, provenance={"source": f"random tiny Gemma 2, seed {seed}"})
    n = sum(t.numel for _, t in items)
    return DemoRow("make tiny model", out.name, _size(out), f"{n:,} params, {cfg.num_hidden_layers} layers", True)


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
