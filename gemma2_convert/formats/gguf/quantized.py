"""``gemma2-quantize --format gguf``: our methods' scales and codes, written as stock GGUF blocks.

Spec → ggml type: 8 bits → Q8_0; 4 bits in groups of 32 → Q4_0 (symmetric) or Q4_1 (asymmetric);
4 bits in other groups → Q4_K (its 32-element sub-blocks under 256-element super-blocks, chosen by
llama.cpp's imatrix search with our activation importance). The method (rtn / mse / hqq / gptq)
picks fp16 scales and integer codes; the blocks decode with llama.cpp's own dequantization, so the
gain comes from better scales, not a new format (../shared/spec/QUANT_FORMATS.md §1.1–1.3).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gemma2_convert.core.errors import UnsupportedError
from gemma2_convert.core.progress import Progress
from gemma2_convert.formats.gguf.mix import TypeChoice
from gemma2_convert.formats.gguf.names import is_query, query_fold_ratio
from gemma2_convert.formats.gguf.output import plan_tensors, prepare_gguf, tensor_order
from gemma2_convert.formats.gguf.values import string
from gemma2_convert.formats.gguf.writer import TensorPlan
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.formats.registry import Checkpoint, WriteJob
from quant import jit
from quant.gguf_codec import dequantize_tensor, quantize_tensor
from quant.gguf_legacy import pack_q4_0, pack_q4_1, pack_q5_0, pack_q5_1, pack_q8_0
from quant.metrics import BLOCK_ELEMENTS, error_sums, rel_rmse_from_sums
from quant.policy import EMBEDDING_NAMES
from quant.spec import QuantSpec

K_QUANTIZATION = "gemma2_convert.quantization"


def gguf_type_for(spec: QuantSpec) -> str:
    if spec.bits == 8:
        return "Q8_0"
    if spec.group_size == 32:
        return {4: ("Q4_0", "Q4_1"), 5: ("Q5_0", "Q5_1")}[spec.bits][0 if spec.symmetric else 1]
    return "Q4_K" if spec.bits == 4 else "Q5_K"


def keep_type(dtype: torch.dtype) -> str:
    """A tensor the policy keeps: its own float type (F32 for anything else)."""
    return {torch.bfloat16: "BF16", torch.float16: "F16"}.get(dtype, "F32")


def blocks(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, qtype: str, w: torch.Tensor,
           keep_codes: bool = False) -> torch.Tensor:
    """Signed codes ``q [rows, cols]`` (int8), fp16 scales ``s [rows, cols/32]`` and zeros → block bytes.

    Q4_0 / Q5_0 store ``x = d·(u − h)`` with ``h = 8`` / ``16``: ``d = s``, ``u = q + h``. Q4_1 / Q5_1 store
    ``x = d·u + m`` with u ∈ [0, 2h − 1]: ``d = s``, ``m = -s·(z + h)``; m is rounded to fp16, so the codes
    are re-rounded against the stored d and m (optimal per weight given them) — unless ``keep_codes``: GPTQ's
    codes carry the error feedback of earlier columns, and re-rounding the original weights would undo it, so
    they are kept (``u = q + h``)."""
    rows, cols = q.shape
    qb = q.reshape(rows, cols // 32, 32)  # [rows, nb, 32]
    d = s.to(torch.float16)  # [rows, nb]
    if qtype == "Q8_0":
        return pack_q8_0(d, qb)
    h = _HALF[qtype]
    if qtype in ("Q4_0", "Q5_0"):
        return _PACK[qtype](d, (qb.to(torch.int16) + h).to(torch.uint8))
    m = (-d.float() * (z.float() + h)).to(torch.float16)  # [rows, nb]
    if keep_codes:
        return _PACK[qtype](d, m, (qb.to(torch.int16) + h).to(torch.uint8))
    x = w.float().reshape(rows, cols // 32, 32)
    u = torch.round((x - m.float()[..., None]) / d.float().clamp_min(1e-30)[..., None]).clamp(0, 2 * h - 1)
    u = torch.where(d.float()[..., None] > 0, u, torch.zeros_like(u))
    return _PACK[qtype](d, m, u.to(torch.uint8))


_HALF = {"Q4_0": 8, "Q4_1": 8, "Q5_0": 16, "Q5_1": 16}
"""Half the code range of the 32-element types :func:`blocks` writes from signed codes."""
_PACK = {"Q4_0": pack_q4_0, "Q4_1": pack_q4_1, "Q5_0": pack_q5_0, "Q5_1": pack_q5_1}


def make_planner(specs: dict[str, QuantSpec | None], mq, embedding: str = "keep",
                 types: dict[str, str] | None = None) -> Callable[[Checkpoint, str], tuple[list, list]]:
    """A ``gguf_convert.plan_tensors`` replacement whose quantized tensors carry our block encoders;
    ``embedding='q6_k'``: the tied embedding as Q6_K by llama.cpp's reference quantizer; ``types``: HF name →
    the GGUF type a measured allocation chose (``pipeline/allocate.py``), encoded by llama.cpp's quantizer
    with the activation importance."""

    def planner(ckpt: Checkpoint, key: str) -> tuple[list[TensorPlan], list[TypeChoice]]:
        base, _ = plan_tensors(ckpt, "f32")
        ratio = query_fold_ratio(ckpt.config)
        plans, choices = [], []
        hf_names = {p.name: n for n, p in zip(tensor_order(ckpt), base)}
        for p in base:
            hf = hf_names[p.name]
            spec = specs.get(hf)
            if types and hf in types:
                encoder = _typed_encoder(hf, types[hf], mq, ratio if is_query(hf) else 1.0)
                plans.append(TensorPlan(p.name, p.source, types[hf], p.transform, encoder))
                choices.append(TypeChoice(p.name, types[hf], "measured allocation"))
                continue
            if spec is None and embedding == "q6_k" and hf in EMBEDDING_NAMES:
                plans.append(TensorPlan(p.name, p.source, "Q6_K", p.transform))
                choices.append(TypeChoice(p.name, "Q6_K", "output head"))
                continue
            if spec is None:
                qtype = "F32" if p.qtype == "F32" and (p.transform is not None or len(p.source.shape) == 1) \
                    else keep_type(p.source.dtype)
                plans.append(TensorPlan(p.name, p.source, qtype, p.transform))
                choices.append(TypeChoice(p.name, qtype, "kept"))
                continue
            qtype = gguf_type_for(spec)
            fold = ratio if is_query(hf) else 1.0
            plans.append(TensorPlan(p.name, p.source, qtype, p.transform, _encoder(hf, spec, qtype, mq, fold)))
            choices.append(TypeChoice(p.name, qtype, ""))
        return plans, choices

    return planner


def _encoder(hf: str, spec: QuantSpec, qtype: str, mq, fold: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Block bytes for one tensor: ``rtn`` is llama.cpp's reference quantizer; ``mse`` llama.cpp's
    importance-weighted search (Q4_0 / Q4_1 / Q4_K ``_impl`` paths) fed our activation importance;
    ``hqq`` / ``gptq`` write their own fp16 scales and codes."""

    def encode(w: torch.Tensor) -> torch.Tensor:  # w: float32 [rows, cols], query fold applied
        if qtype in ("Q4_K", "Q5_K") or spec.method in ("rtn", "mse"):
            qw = mq.importance.get(hf)
            if spec.method == "mse" and qw is None and getattr(mq, "imatrix", None) is None:
                qw = torch.ones(w.shape[1])  # with an imatrix file, a weight it lacks gets the reference path
            data = quantize_tensor(w, qtype, quant_weights=qw if spec.method != "rtn" else None)
        else:
            q, s, z = mq.codes(hf, w, torch.float16, gptq_scale=fold, record=False)
            data = blocks(q, s, z, qtype, w, keep_codes=spec.method in ("gptq", "autoround"))
        mq.record_error(hf, f"{spec.label()}→{qtype}", block_error(w, data, qtype))
        return data

    return encode


def _typed_encoder(hf: str, qtype: str, mq, fold: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """An allocated type's blocks: from ``mq.typed`` (``pipeline/typed_gptq.py``, ``--method gptq``) for a
    decoder weight the writer does not rescale, else llama.cpp's quantizer with the activation importance."""

    def encode(w: torch.Tensor) -> torch.Tensor:
        typed = getattr(mq, "typed", None)
        if typed is not None and hf in typed.specs and fold == 1.0:
            data = typed.result(hf)
        else:
            data = quantize_tensor(w, qtype, quant_weights=mq.importance.get(hf))
        mq.record_error(hf, f"measured→{qtype}", block_error(w, data, qtype))
        return data

    return encode


def block_error(w: torch.Tensor, data: torch.Tensor, qtype: str) -> float:
    """Relative RMSE of ``w [rows, cols]`` against its ``qtype`` bytes, decoded a block of rows at a time (no
    float copy of the whole tensor: a 27B ``gate_proj`` is 170 M values), the blocks on every CPU (torch
    kernels release the GIL; the GGUF writer keeps torch itself to one thread)."""
    rows, cols = w.shape
    raw = data.reshape(rows, -1)
    step = max(1, BLOCK_ELEMENTS // cols)
    starts = range(0, rows, step)
    sums: list[tuple[float, float]] = [(0.0, 0.0)] * len(starts)

    def one(k: int) -> None:
        i = starts[k]
        sums[k] = error_sums(w[i:i + step], dequantize_tensor(raw[i:i + step], qtype, (min(step, rows - i), cols)))

    jit.parallel_for(one, range(len(starts)), jit.default_threads(), "block-error")
    return rel_rmse_from_sums(sums)


def main_type(specs: dict[str, QuantSpec | None]) -> str:
    """The ``--type`` key for ``general.file_type``: the type most quantized tensors get."""
    types = [gguf_type_for(s) for s in specs.values() if s is not None]
    return max(set(types), key=types.count).lower()


def prepare_gguf_quantized(ckpt: Checkpoint, specs: dict[str, QuantSpec | None], mq: Any, embedding: str,
                           allow_nonfinite: bool, progress: Progress, split_max_size: str | int | None = None,
                           split_max_tensors: int | None = None, imatrix: Path | None = None,
                           types: dict[str, str] | None = None) -> WriteJob:
    """Plan ``ckpt`` as a GGUF whose quantized tensors come from ``mq`` (a ``quantize.ModuleQuantizer``); with a
    split limit, as a split set; ``imatrix``: the file ``mq``'s importance came from, recorded in the metadata;
    ``types``: a measured per-tensor allocation (HF name → GGUF type), listed in the metadata."""
    if ckpt.config.head != "causal_lm":
        raise UnsupportedError(f"llama.cpp's gemma2 has no {ckpt.config.head} head; use --format hf", ckpt.path)
    label = next(s for s in specs.values() if s is not None).label()
    file_type = main_type(specs)
    if types:
        label = "measured allocation: " + ", ".join(f"{n}={t}" for n, t in sorted(types.items()))
        file_type = max(set(types.values()), key=list(types.values()).count).lower()
    opts = ConvertOptions(to="gguf", command="gemma2-quantize", gguf_type=file_type,
                          allow_nonfinite=allow_nonfinite, verify=False, split_max_size=split_max_size,
                          split_max_tensors=split_max_tensors, imatrix=imatrix)
    return prepare_gguf(ckpt, opts, progress, planner=make_planner(specs, mq, embedding, types),
                        extra_metadata=((K_QUANTIZATION, string(label)),))
