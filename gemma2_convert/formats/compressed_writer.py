"""The compressed-tensors ``pack-quantized`` HF directory (transformers + compressed-tensors, vLLM), written
from a quantization step: each quantized Linear becomes ``weight_packed`` / ``weight_scale`` (/
``weight_zero_point``) / ``weight_shape``, every other tensor is kept as it is."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from gemma2_convert import __version__
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.core.progress import Progress
from gemma2_convert.formats.dense import (
    checked_cast,
    materialize_tokenizer,
    tokenizer_file,
)
from gemma2_convert.formats.hf import write_hf_dir
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.formats.registry import Checkpoint, WriteJob
from gemma2_convert.formats.tolerance import Tolerance
from gemma2_convert.formats.transcode_items import plan_transcode
from quant.compressed_tensors import pack_quantized, packed_layout, quantization_config
from quant.qparams import scale_dtype_for
from quant.spec import QuantSpec

Codes = Callable[[str], tuple[Tensor, Tensor, "Tensor | None"]]
"""Weight name → (codes, scale, zero) of its quantization (``quant/qparams.py`` layout)."""


def layer_order(name: str) -> tuple[int, str]:
    """Embedding first, then layer by layer, then the rest (what GPTQ's sequential calibration needs)."""
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1, name
    return (0, name) if "embed" in name else (1 << 30, name)


Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


def packed_items(ckpt: Checkpoint, specs: dict[str, QuantSpec | None],
                 layout: Callable[[str, LazyTensor, QuantSpec], Layout],
                 pack: Callable[[str, str, QuantSpec], dict[str, Tensor]]) -> list[tuple[str, LazyTensor]]:
    """The stream of stored tensors in layer order: unquantized ones as they are, each quantized weight as the
    parts ``layout(prefix, tensor, spec)`` names (``part -> (shape, dtype)``), loaded from
    ``pack(name, prefix, spec)`` (``part -> tensor``) when written."""
    items: list[tuple[str, LazyTensor]] = []
    for name in sorted(ckpt.tensors, key=layer_order):
        lt, spec = ckpt.tensors[name], specs[name]
        if spec is None:
            items.append((name, lt))
            continue
        prefix = name.removesuffix(".weight")
        for part, (shape, dtype) in layout(prefix, lt, spec).items():
            def load(part: str = part, name: str = name, prefix: str = prefix, spec: QuantSpec = spec) -> Tensor:
                return pack(name, prefix, spec)[part]
            items.append((part, LazyTensor(shape, dtype, load)))
    return items


def compressed_items(ckpt: Checkpoint, specs: dict[str, QuantSpec | None], codes: Codes) -> list[tuple[str, LazyTensor]]:
    """The stream of stored tensors for the compressed-tensors HF layout, in layer order."""
    def layout(prefix: str, lt: LazyTensor, spec: QuantSpec) -> Layout:
        return packed_layout(prefix, lt.shape, spec, scale_dtype_for(lt.dtype))

    return packed_items(ckpt, specs, layout, lambda name, prefix, spec: pack_quantized(prefix, *codes(name), spec))


def prepare_compressed(ckpt: Checkpoint, specs: dict[str, QuantSpec | None], codes: Codes,
                       need_bytes: int) -> WriteJob:
    """Plan the directory; ``need_bytes`` is the caller's size estimate (it knows the packing)."""
    # every Linear but lm_head must be listed (kept ones go to `ignore`): decoder projections and a classifier
    modules = {n.removesuffix(".weight"): s for n, s in specs.items()
               if s is not None or n.endswith("_proj.weight") or n == "score.weight"}
    qcfg = quantization_config(modules)

    def write(tmp: Path, progress: Progress) -> list[str]:
        files = write_hf_dir(tmp, ckpt.config, compressed_items(ckpt, specs, codes), tokenizer=ckpt.tokenizer,
                             extra_config={"quantization_config": qcfg}, on_tensor=progress.on_tensor,
                             provenance={"source": str(ckpt.path), "quantized_by": f"gemma2-quantize {__version__}"})
        return sorted(p.name for p in files)

    return WriteJob(ckpt.config, need_bytes, ckpt.nbytes, Tolerance.lossy(float("inf"), 0.0), write)


def prepare_compressed_transcode(ckpt: Checkpoint, opts: ConvertOptions, progress: Progress) -> WriteJob | None:
    """``convert --to hf`` of a quantized source kept quantized (``opts.quantized``): its codes as pack-quantized
    modules, recoded without re-quantizing (``formats.transcode_items``); None when nothing is kept."""
    plan = plan_transcode(ckpt, "hf", opts, progress)
    if not plan.targets:
        return None
    dense = dict(checked_cast(ckpt, {n: t for n, t in ckpt.tensors.items() if n not in plan.targets}, None,
                              opts, progress))
    items: list[tuple[str, LazyTensor]] = []
    for name in sorted(ckpt.tensors, key=layer_order):
        if name not in plan.targets:
            items.append((name, dense[name]))
            continue
        t, prefix = plan.targets[name], name.removesuffix(".weight")
        spec = QuantSpec(t.bits, t.group_size, t.kind == "sym")
        for part, (shape, dtype) in packed_layout(prefix, ckpt.tensors[name].shape, spec, t.scale_dtype).items():
            items.append((part, LazyTensor(shape, dtype, lambda part=part, name=name: plan.compressed(name)[part])))
    modules = {n.removesuffix(".weight"): (QuantSpec(t.bits, t.group_size, t.kind == "sym") if t else None)
               for n in ckpt.tensors if (t := plan.targets.get(n)) or n.endswith("_proj.weight") or n == "score.weight"}
    qcfg = quantization_config(modules)
    tok = tokenizer_file(ckpt, opts, progress)

    def write(tmp: Path, progress: Progress) -> list[str]:
        files = write_hf_dir(tmp, ckpt.config, items, tokenizer=materialize_tokenizer(ckpt, tok, tmp),
                             extra_config={"quantization_config": qcfg}, on_tensor=progress.on_tensor,
                             provenance={"source": str(ckpt.path), "transcoded_by": f"{opts.command} {__version__}"})
        plan.finish()
        return sorted(p.name for p in files)

    size = sum(t.nbytes for _, t in items)
    return WriteJob(ckpt.config, size + (64 << 20), ckpt.nbytes, plan.tolerance(), write, {"transcode": plan.details})
