"""GGUF from a quantized source without re-quantizing: each kept ``QuantTensor`` is written as the
``--type``'s blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) from its own codes (``formats.transcode_items``), or — a
GGUF K-quant the ``--type`` stores in its own type (``--type q4_k_m`` on llama.cpp's Q4_K_M) — as its stored
bytes; every other tensor keeps its float type (norms F32), so the file holds exactly the source's numbers and
verification demands equality.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from gemma2_convert.core.progress import Progress
from gemma2_convert.formats.gguf.mix import TypeChoice, check_type, choose_type
from gemma2_convert.formats.gguf.names import gguf_name, is_query, query_fold_ratio
from gemma2_convert.formats.gguf.writer import TensorPlan
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.formats.registry import Checkpoint, WriteJob
from gemma2_convert.formats.transcode_items import TranscodePlan, plan_transcode
from quant.gguf_blocks import blocks_from_codes
from quant.gguf_kcodes import K_TYPES, super_scales
from quant.qtensor import QuantTensor

Planner = Callable[[Checkpoint, str], tuple[list[TensorPlan], list[TypeChoice]]]
FLOAT_TYPES = {torch.bfloat16: "BF16", torch.float16: "F16"}


def gguf_transcode(ckpt: Checkpoint, opts: ConvertOptions, progress: Progress) -> TranscodePlan | None:
    """The transcode plan for ``ckpt`` (None when nothing is kept quantized)."""
    ratio = query_fold_ratio(ckpt.config)
    scale = {n: ratio for n in ckpt.tensors if is_query(n) and ratio != 1.0}
    plan = plan_transcode(ckpt, "gguf", opts, progress, scale, _chosen_types(ckpt, opts, set(scale)))
    return plan if plan.targets else None


def _chosen_types(ckpt: Checkpoint, opts: ConvertOptions, folded: set[str]) -> dict[str, str]:
    """HF name → the ggml type ``--type`` stores each K-quant source tensor as (not a folded query: its scales
    change, so its bytes cannot be copied)."""
    cfg, key = ckpt.config, check_type(opts.gguf_type)
    gqa = cfg.num_attention_heads // cfg.num_key_value_heads
    weighted = opts.imatrix is not None
    return {n: choose_type(gguf_name(n), t.shape, key, cfg.num_hidden_layers, gqa, weighted).qtype
            for n, t in ckpt.tensors.items()
            if isinstance(t, QuantTensor) and t.layout.removeprefix("gguf:") in K_TYPES and n not in folded}


def transcode_planner(plan: TranscodePlan, base: Planner, order: Callable[[Checkpoint], list[str]]) -> Planner:
    """A ``plan_tensors`` replacement: kept tensors as blocks of their codes, the rest in their own float type."""

    def planner(ckpt: Checkpoint, key: str) -> tuple[list[TensorPlan], list[TypeChoice]]:
        plans, choices = [], []
        base_plans, _ = base(ckpt, "f32")
        for hf, p in zip(order(ckpt), base_plans):
            if hf in plan.targets:
                qtype = plan.targets[hf].name.removeprefix("gguf:")
                move = _copied if qtype in K_TYPES else _moved
                plans.append(TensorPlan(p.name, plan.decoded(hf), qtype, p.transform,
                                        from_codes=partial(move, plan, hf, qtype)))
                choices.append(TypeChoice(p.name, qtype, f"from {plan.sources[hf].label}"))
                continue
            qtype = "F32" if p.transform is not None or len(p.source.shape) == 1 \
                else FLOAT_TYPES.get(p.source.dtype, "F32")
            plans.append(TensorPlan(p.name, p.source, qtype, p.transform))
            choices.append(TypeChoice(p.name, qtype, "kept"))
        return plans, choices

    return planner


def _moved(plan: TranscodePlan, hf: str, qtype: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``TensorPlan.from_codes`` of ``hf``: the source's codes (the parts that fingerprint it) and their blocks."""
    src = plan.sources[hf].codes()  # type: ignore[misc]
    parts = {".codes": src.u, ".scale": src.scale} | ({} if src.offset is None else {".offset": src.offset})
    return parts, blocks_from_codes(plan.recode(hf, src), qtype)


def _copied(plan: TranscodePlan, hf: str, qtype: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``TensorPlan.from_codes`` of a K-quant kept in its own type: its stored bytes, fingerprinted as they are,
    and its fp16 super-block scales (checked for NaN/Inf: every sub-block scale is one times a small integer)."""
    raw = plan.copied(hf)
    return {".blocks": raw} | super_scales(raw, qtype), raw


def with_transcode(job: WriteJob, plan: TranscodePlan | None) -> WriteJob:
    """``job`` demanding what a transcode promises (equal tensors, unless re-quantized), refusing inexact groups
    once all are counted, and reporting them in its details."""
    if plan is None:
        return job
    write = job.write

    def checked(tmp: Path, progress: Progress) -> list[str]:
        files = write(tmp, progress)
        plan.finish()
        return files

    job.tolerance, job.write = plan.tolerance(), checked
    job.details["transcode"] = plan.details
    return job
