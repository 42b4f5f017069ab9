"""The adapter step of the pipeline: PEFT adapters applied to an opened checkpoint (``formats.merge``), and
the ``BASE+ADAPTER`` inputs of ``verify``, opened with the adapter unmerged so the reference checks a merge
independently of it."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gemma2_convert.core.dtypes import dominant_dtype, resolve_dtype
from gemma2_convert.core.errors import UnknownFormatError
from gemma2_convert.core.progress import Progress
from gemma2_convert.formats import Checkpoint, open_checkpoint
from gemma2_convert.formats.adapter import (
    adapter_tokenizer_files,
    is_adapter_dir,
    read_adapter,
)
from gemma2_convert.formats.gguf.lora import (
    check_expressible,
    lora_metadata,
    lora_plans,
)
from gemma2_convert.formats.gguf.metadata import K_QUERY_FOLD, PREFIX
from gemma2_convert.formats.gguf.names import query_fold_ratio
from gemma2_convert.formats.gguf.writer import TensorPlan, header_bytes, write_gguf
from gemma2_convert.formats.merge import adapt
from gemma2_convert.formats.orig_config import ShapeOptions
from gemma2_convert.formats.output import atomic_output, check_output
from gemma2_convert.formats.registry import WriteJob
from gemma2_convert.formats.tolerance import Tolerance

LOGITS_F32 = Tolerance(tensors_equal=False, max_abs=1e-3, max_kl=1e-6, min_top1=1.0)
"""Merged (float32) vs the unmerged reference: only the order of float32 roundings differs."""
LOGITS_CAST = Tolerance(tensors_equal=False, max_abs=float("inf"), max_kl=1e-2, min_top1=0.9)
"""Merged and cast to a 16-bit float vs the unmerged reference in float32."""


def with_adapters(ckpt: Checkpoint, adapters: Sequence[Path], progress: Progress, merge: bool = True,
                  dtype: torch.dtype | None = None) -> tuple[Checkpoint, dict[str, Any]]:
    """``ckpt`` with the PEFT adapters at ``adapters`` applied in order (merged tensors float32, or
    ``dtype``), and what was done (empty when there are none); an untied head is reported as a warning."""
    if not adapters:
        return ckpt, {}
    res = adapt(ckpt, [read_adapter(p) for p in adapters], merge=merge, dtype=dtype)
    if res.untied:
        progress.warn(f"{res.untied}: the merged model has a separate lm_head (tie_word_embeddings false; "
                      "in a GGUF output.weight, which llama.cpp's gemma2 architecture does not load)")
    return res.checkpoint, {"paths": [str(p) for p in adapters], "merged": len(res.merged),
                            "replaced": res.replaced, "untied_head": res.untied}


def carry_tokenizer_files(job: WriteJob, adapters: Sequence[Path]) -> None:
    """An HF output gets the tokenizer files of the last adapter directory that has any (its added tokens), in
    place of those made from tokenizer.model: ``job.write`` copies them in after writing."""
    files = next((f for f in (adapter_tokenizer_files(read_adapter(p)) for p in reversed(adapters)) if f), [])
    if not files:
        return
    write = job.write

    def write_then_copy(tmp: Path, progress: Progress) -> list[str]:
        names = set(write(tmp, progress))
        for f in files:
            shutil.copyfile(f, tmp / f.name)
        return sorted(names | {f.name for f in files})

    job.write = write_then_copy


def split_spec(spec: str | Path) -> tuple[Path, list[Path]]:
    """``BASE+ADAPTER[+ADAPTER2…]`` → (base, adapters); a path that exists as written is a plain input."""
    p = Path(spec)
    if p.exists() or "+" not in str(spec):
        return p, []
    base, *rest = str(spec).split("+")
    adapters = [Path(a) for a in rest]
    bad = [str(a) for a in adapters if not is_adapter_dir(a)]
    if bad or not Path(base).exists():
        what = f"not PEFT adapter directories: {', '.join(bad)}" if bad else f"no such base {base}"
        raise UnknownFormatError(f"BASE+ADAPTER: {what}", spec)
    return Path(base), adapters


def open_spec(spec: str | Path, shape: ShapeOptions | None, progress: Progress) -> Checkpoint:
    """A checkpoint, or ``BASE+ADAPTER`` opened with the adapters unmerged (``Checkpoint.adapters``)."""
    base, adapters = split_spec(spec)
    ckpt = open_checkpoint(base, options=shape)
    return with_adapters(ckpt, adapters, progress, merge=False)[0]


def adapter_tolerance(exact_or_cast: Tolerance) -> Tolerance:
    """What ``verify BASE+ADAPTER MERGED`` demands, from what it would demand of the base against the
    output."""
    if not exact_or_cast.tensors_equal:
        return exact_or_cast  # quantized: the type's own bounds
    return LOGITS_F32 if exact_or_cast.max_abs == 0.0 else LOGITS_CAST


def merged_for_quantizing(ckpt: Checkpoint, adapters: Sequence[Path], progress: Progress) -> Checkpoint:
    """``gemma2-quantize --adapter``: the merge in the dtype ``convert --adapter`` writes by default (the
    source's), so merging and quantizing in one pass gives the bytes of the two commands."""
    if not adapters:
        return ckpt
    dtype = resolve_dtype(ckpt.default_dtype or dominant_dtype([t.dtype for t in ckpt.tensors.values()]))
    return with_adapters(ckpt, adapters, progress, dtype=dtype)[0]


@dataclass
class LoraGGUFResult:
    """What ``lora-to-gguf`` wrote."""

    output: Path
    tensors: int
    """lora_a + lora_b tensors."""
    alpha: float
    query_fold: float
    """The factor attn_q's B carries (the base GGUF's query-scale fold; 1.0: none)."""
    nbytes: int


def base_fold(base: Checkpoint) -> float:
    """The query-scale fold of the model the adapter will run on: what a GGUF base records (llama.cpp's own
    GGUFs: none), else what our GGUF writer applies to this base."""
    if base.format == "gguf":
        return float(base.metadata.get(K_QUERY_FOLD.removeprefix(PREFIX), 1.0))
    return query_fold_ratio(base.config)


def lora_to_gguf(adapter_dir: str | Path, out: str | Path, base: str | Path, *, force: bool = False,
                 shape: ShapeOptions | None = None) -> LoraGGUFResult:
    """Write the PEFT LoRA at ``adapter_dir`` as llama.cpp's LoRA GGUF for ``base`` (any input this tool
    reads: it gives the config, the shapes checked, and the query fold)."""
    out, inputs = Path(out), [Path(adapter_dir), Path(base)]
    check_output(out, force, inputs)
    adapter = read_adapter(adapter_dir)
    check_expressible(adapter)
    ckpt = open_checkpoint(base, options=shape)
    adapt(ckpt, [adapter], merge=False)  # every target exists and every shape fits (one error lists all)
    fold = base_fold(ckpt)
    plans = lora_plans(adapter, fold)
    meta = lora_metadata(adapter, ckpt.path.name, fold)
    with atomic_output(out, force, need_bytes=header_bytes_len(meta, plans), inputs=inputs) as tmp:
        write_gguf(tmp, meta, plans)
    return LoraGGUFResult(out, len(plans), adapter.alpha, fold, out.stat().st_size)


def header_bytes_len(meta: list, plans: list[TensorPlan]) -> int:
    return len(header_bytes(meta, plans)) + sum(p.nbytes + 32 for p in plans)
